"""Control-channel framing (SPEC §2.2): u32 little-endian length + one msgpack map."""

from __future__ import annotations

import socket
import struct

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


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed("peer closed the connection")
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket) -> Message:
    """Read one frame and decode it into a message dataclass."""
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n == 0 or n > MAX_FRAME:
        raise ProtocolError(
            f"frame length {n} is outside 1..{MAX_FRAME}", code=ErrorCode.BAD_FRAME, fatal=True
        )
    value = decode_body(_recv_exact(sock, n))
    try:
        return decode_message(value)
    except ProtocolError as e:
        rid = value.get("id")
        e.request_id = rid if isinstance(rid, int) and not isinstance(rid, bool) else 0
        raise
