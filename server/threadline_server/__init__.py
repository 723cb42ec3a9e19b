"""Threadline server: a gRPC-first realtime messaging backend."""

__version__ = "0.1.0"
