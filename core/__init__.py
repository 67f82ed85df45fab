"""Shared infrastructure: errors with key/value/hint, atomic I/O, content hashing."""
