"""msgpack-over-Unix-socket baseline: tensord without shared memory. Each message is a frame
(u32 little-endian length + one msgpack map) and carries the tensor bytes inline as msgpack
bin. One thread per connection, as tensord has one thread per session; one process.

Request:  {"model": str, "inputs": [{"name", "dtype", "shape", "data": bin}]}
Response: {"outputs": [{"name", "dtype", "shape", "data": bin}]} or {"error": str}

    python msgpack_server.py --socket PATH"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import socketserver
import struct
import sys
import threading

import msgpack

import models

MAX_FRAME = 1 << 30
_LEN = struct.Struct("<I")


def _recv_exactly(sock: socket.socket, buf: bytearray, n: int) -> memoryview | None:
    """Read n bytes into buf (reused across requests, so large frames do not pay for fresh
    pages every time); returns a view of them, or None at EOF."""
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return view


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        head_buf, buf = bytearray(4), bytearray(1 << 16)
        while True:
            head = _recv_exactly(sock, head_buf, 4)
            if head is None:
                return
            (n,) = _LEN.unpack(head)
            if n == 0 or n > MAX_FRAME:
                return
            if n > len(buf):
                buf = bytearray(n)
            body = _recv_exactly(sock, buf, n)
            if body is None:
                return
            reply = msgpack.packb(self._serve(body))
            sock.sendall(_LEN.pack(len(reply)))
            sock.sendall(reply)

    @staticmethod
    def _serve(body: memoryview) -> dict:
        try:
            req = msgpack.unpackb(body)
            inputs = [models.tensor_from_buffer(t["data"], t["dtype"], t["shape"])
                      for t in req["inputs"]]
            outputs = models.run(req["model"], inputs)
        except Exception as e:  # every failure goes back to the caller
            return {"error": f"{type(e).__name__}: {e}"}
        return {"outputs": [
            {"name": n, "dtype": dt, "shape": list(t.shape), "data": t.numpy().data}
            for n, dt, t in outputs
        ]}


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's default backlog of 5 refuses 64 callers at once


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    args = p.parse_args()
    models.warm_up()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = Server(args.socket, Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.shutdown).start())
    print("msgpack_server: ready", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if os.path.exists(args.socket):
            os.unlink(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
