"""Chaos suite: kill -9, broker restarts, PMS faults, bad input (see README.md)."""
