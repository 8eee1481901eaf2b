"""Claiming a Unix socket path for a listener: one rule for the daemon's socket and the
metrics socket. A socket file left by a dead process is removed; anything else at the path
(a live listener, a file that is not a socket, a dead socket this user may not remove) is
refused with what to do about it."""

from __future__ import annotations

import os
import socket
import stat
import time


class AddressInUse(RuntimeError):
    pass


def claim(path: str, option: str = "--socket") -> None:
    """Make `path` free to bind, or raise AddressInUse. `option` is how the user names the
    path (the command-line flag or config key), for the messages."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(f"{path} exists and is not a socket; remove it or change {option}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another process removed it meanwhile: free all the same
        except PermissionError as e:
            raise AddressInUse(f"{path} is a dead socket this user cannot remove ({e}): "
                               f"remove it, or change {option} to a directory only the "
                               "daemon's user may write (e.g. /run/tensord)") from None
        return
    except OSError as e:
        raise AddressInUse(f"{path} exists and is not a usable socket ({e}): remove it, or "
                           f"change {option} to a directory only the daemon's user may write "
                           "(e.g. /run/tensord)") from None
    finally:
        probe.close()
    raise AddressInUse(f"something is listening on {path} already (another daemon?); stop it "
                       f"or change {option}")


def connect_daemon(path: str, timeout: float, where: str = "TENSORD_SOCKET") -> socket.socket:
    """A stream socket connected to the daemon at `path` (clients and operator commands), or
    an error in the caller's terms. A full listen backlog (EAGAIN: a burst of connections the
    daemon has not accepted yet) is waited out within `timeout`, as a blocking connect would."""
    from .contract.errors import ConnectionClosedError, PermissionDeniedError

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise TimeoutError from None
                time.sleep(0.005)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise ConnectionClosedError(
            f"no tensord daemon at {path} ({e.strerror}): start it with `tensord serve`, or "
            f"point {where} at its socket") from None
    except PermissionError:
        sock.close()
        raise PermissionDeniedError(
            f"not allowed to connect to {path}: add this user to the socket's group (the "
            "systemd unit uses `tensord`), or run as the daemon's user") from None
    except TimeoutError:
        sock.close()
        raise ConnectionClosedError(f"the daemon at {path} did not accept the connection "
                                    f"within {timeout:g} s") from None
