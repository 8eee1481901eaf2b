"""The ring core's former module name: serving/dispatcher.py still imports `spin_any` from here.
The implementation is tensord._core (daemon/native); import from there, and delete this file
once nothing imports it."""

from .._core import Consumer, CorruptError, Producer, Shm, spin_any

__all__ = ["Consumer", "CorruptError", "Producer", "Shm", "spin_any"]
