"""The wire contract (protocol/SPEC.md): errors, dtypes, messages, frames, descriptors, layout.

Nothing here does I/O on shared memory; the transport layer builds on it.
"""
