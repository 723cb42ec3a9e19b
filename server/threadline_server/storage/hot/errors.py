"""What the driver-level writers raise besides domain errors."""

from __future__ import annotations


class WriteRaced(Exception):
    """A unique key another writer (another node) committed first: the batch rolled back whole.
    The caller retries item by item, so the one that raced answers from the other's record."""
