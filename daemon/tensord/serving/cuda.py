"""CUDA specifics: page-locking shared memory in place and the per-session side stream. The
session only uses them for models placed on a CUDA device, so nothing here runs on a host
without a GPU."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# cudaHostRegisterPortable: the pinned range is usable from every CUDA context of the process.
_REGISTER_PORTABLE = 1


class HostRegistration:
    """Page-locks an existing host range (the session segment) so H2D and D2H copies go
    straight from and to shared memory with `non_blocking=True`, no staging copy. Registration
    costs milliseconds per GiB: done once per session, undone before the segment is unmapped."""

    def __init__(self, ptr: int, nbytes: int):
        self.ptr = ptr
        self.nbytes = nbytes
        rt = torch.cuda.cudart()
        err = rt.cudaHostRegister(ptr, nbytes, _REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister({nbytes} bytes) failed with error {int(err)}")
        self.active = True

    def release(self) -> None:
        if self.active:
            err = torch.cuda.cudart().cudaHostUnregister(self.ptr)
            if int(err) != 0:
                log.warning("cudaHostUnregister failed with error %d", int(err))
            self.active = False


class SideStream:
    """A session's CUDA stream for its copies and compute: requests of one session run in
    order on it, and never wait behind other sessions' work on the default stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.done = torch.cuda.Event()

    def context(self):
        """Make the stream current in the calling thread (streams are per thread)."""
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        """Block until everything queued on the stream (including D2H copies into the response
        ring) has finished; a response is never signalled while its bytes are in flight."""
        self.done.record(self.stream)
        self.done.synchronize()
