"""tensord: a daemon that serves PyTorch models to local processes over shared memory."""

__version__ = "0.1.0"
