"""Control-channel framing (SPEC §2.2): u32 little-endian length + one msgpack map."""

from __future__ import annotations

import os
import socket
import struct
import time

from .codec import packb, unpackb
from .errors import ErrorCode, ProtocolError
from .messages import Message, decode_message, encode_message

MAX_FRAME = 1 << 20
_LEN = struct.Struct("<I")


class PeerClosed(EOFError):
    """The other side closed the socket (EOF)."""


def encode_frame(msg: Message) -> bytes:
    body = packb(encode_message(msg))
    if len(body) > MAX_FRAME:
        raise ProtocolError(
            f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit",
            code=ErrorCode.TOO_LARGE,
        )
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict:
    """Frame body -> decoded map; BAD_FRAME (fatal) when it is not a msgpack map."""
    try:
        value = unpackb(body)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(
            f"frame body is not valid msgpack ({type(e).__name__}: {e})",
            code=ErrorCode.BAD_FRAME, fatal=True,
        ) from None
    if not isinstance(value, dict):
        raise ProtocolError(
            f"frame body is a msgpack {type(value).__name__}, not a map",
            code=ErrorCode.BAD_FRAME, fatal=True,
        )
    if not all(isinstance(k, str) for k in value):
        raise ProtocolError("frame map has a non-string key", code=ErrorCode.BAD_FRAME, fatal=True)
    return value


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            # One deadline for the whole frame: a peer trickling a byte at a time must not
            # stretch a per-recv timeout forever.
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out reading a frame")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed("peer closed the connection")
        got += k
    return bytes(buf)


def send_frame_with_fds(sock: socket.socket, msg: Message, fds: list[int]) -> None:
    """Send a frame with file descriptors attached to its first byte (SCM_RIGHTS)."""
    data = encode_frame(msg)
    sent = socket.send_fds(sock, [data], fds)
    if sent < len(data):
        sock.sendall(data[sent:])


def read_frame_with_fds(sock: socket.socket, maxfds: int = 8) -> tuple[Message, list[int]]:
    """Read one frame and the file descriptors that came with it (the welcome carries the
    session's). The caller owns the descriptors."""
    head, fds, _, _ = socket.recv_fds(sock, 4, maxfds)
    if not head:
        raise PeerClosed("peer closed the connection")
    try:
        if len(head) < 4:
            head += _recv_exact(sock, 4 - len(head))
        return _read_body(sock, head), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def read_frame(sock: socket.socket, deadline: float | None = None) -> Message:
    """Read one frame and decode it into a message dataclass; `deadline` (time.monotonic)
    bounds the whole read."""
    return _read_body(sock, _recv_exact(sock, 4, deadline), deadline)


def _read_body(sock: socket.socket, head: bytes, deadline: float | None = None) -> Message:
    (n,) = _LEN.unpack(head)
    _check_length(n)
    return _decode(_recv_exact(sock, n, deadline))


def _check_length(n: int) -> None:
    if n == 0 or n > MAX_FRAME:
        raise ProtocolError(
            f"frame length {n} is outside 1..{MAX_FRAME}", code=ErrorCode.BAD_FRAME, fatal=True
        )


class FrameBuffer:
    """Frames out of a byte stream that arrives in pieces (a non-blocking socket). The length
    is checked as soon as its 4 bytes are in, so no more than one frame is ever buffered."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def next(self) -> Message | None:
        """The next whole message, or None until more bytes arrive. Raises ProtocolError."""
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        _check_length(n)
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        return _decode(body)


def _decode(body: bytes) -> Message:
    value = decode_body(body)
    try:
        return decode_message(value)
    except ProtocolError as e:
        rid = value.get("id")
        # Only a valid id is echoed (SPEC §2.2): a positive integer that fits a u64.
        valid = type(rid) is int and 0 < rid < 1 << 64
        e.request_id = rid if valid else 0
        raise
