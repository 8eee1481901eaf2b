"""Shared-memory transport: the session segment, its two rings and the wait protocol."""
