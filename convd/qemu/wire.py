"""The launcher's wire protocol: one JSON datagram with its descriptors on an ``AF_UNIX``
``SOCK_SEQPACKET`` socket, in both directions (see :mod:`convd.qemu.launcher`)."""

from __future__ import annotations

import array
import json
import socket
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_MSG", "recv_fds", "send"]

MAX_MSG = 64 << 10


def recv_fds(sock: socket.socket, maxfds: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One datagram and its descriptors, close-on-exec (``socket.recv_fds`` of
    Python 3.11 drops its ``flags``)."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(MAX_MSG, socket.CMSG_LEN(maxfds * fds.itemsize),
                                       socket.MSG_CMSG_CLOEXEC | flags)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    try:
        socket.send_fds(sock, [json.dumps(msg).encode()], list(fds))
    except OSError:
        pass  # the daemon dropped the request; the child is reaped all the same
