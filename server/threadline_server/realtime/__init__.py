"""Live delivery: the broker and per-stream sessions (pre-encoded frames only)."""
