"""The code that runs inside the launcher process (``python -m convd.qemu.launcher_process``):
single-threaded, it starts every qemu-img child with its limits already in force.

Why a process of its own, and what each child gets, is told in
:mod:`convd.qemu.launcher`, the daemon's client of this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import resource
import select
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from convd.qemu.wire import recv_fds, send

__all__ = ["main", "serve"]

_PR_SET_PDEATHSIG = 1
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522
_LIMITS = {"cpu_time": "RLIMIT_CPU", "address_space": "RLIMIT_AS"}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


def _leave_network(libc: ctypes.CDLL) -> bool:
    """Move this process (and so every child it starts) into an empty network namespace.

    With ``CAP_SYS_ADMIN`` (a root daemon) a network namespace alone;
    without it (the unit's convd user) in a user namespace of its own as
    well, which owns the new network namespace and nothing else.  Its
    user and group map this process's own ids onto themselves, so files and
    ``stat()`` look the same from inside; its capabilities there reach only
    that empty network namespace, and a qemu-img it starts (not root there)
    has none.  Returns False where neither is allowed (unprivileged user
    namespaces turned off, ``RestrictNamespaces=`` without ``user net``):
    the children then share the daemon's network.
    """
    if libc.unshare(_CLONE_NEWNET) == 0:
        return True
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return False
    # An unprivileged process may map only its own ids, and its group only
    # once setgroups(2) is denied (user_namespaces(7)); the supplementary
    # groups it has keep their effect on file access.
    with contextlib.suppress(OSError):
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    return True


def _drop_inheritable_caps(libc: ctypes.CDLL) -> None:
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capget(ctypes.byref(hdr), data), "capget")
    for d in data:
        d.inheritable = 0
    _check(libc.capset(ctypes.byref(hdr), data), "capset")
    # Ambient capabilities must be inheritable too; clear them explicitly
    # (EINVAL: a kernel without ambient capabilities has none to clear).
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
        _check(-1, "PR_CAP_AMBIENT_CLEAR_ALL")


_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXCPU, signal.SIGXFSZ)


def _spawn_limited(argv: list[str], fds: list[int], limits: dict[str, int]) -> int:
    """``posix_spawn`` with this process's soft limits set to ``limits`` for the instant."""
    saved = {}
    try:
        for key, value in limits.items():
            which = getattr(resource, _LIMITS[key])
            saved[which] = resource.getrlimit(which)
            resource.setrlimit(which, (int(value), saved[which][1]))
        env: Mapping[str, str] = os.environ
        if "address_space" in limits:
            # glibc reserves 64 MiB of address space per malloc arena, one per
            # thread up to 8 × cores: under the address-space limit, qemu-img's
            # worker threads then fail to start now and then ("qemu_thread_create:
            # Resource temporarily unavailable", abort), and a healthy image
            # would be rejected.  One arena is plenty for info/check/map.
            env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
        pid = os.posix_spawn(
            argv[0], argv, env, setsid=True, setsigdef=_RESET_SIGNALS,
            # 0-2, and 3 when given: the file the child reads (fds[3] is the reply socket).
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, target)
                          for target, fd in enumerate([*fds[:3], *fds[4:5]])],
        )
    finally:
        for which, old in saved.items():
            resource.setrlimit(which, old)
    for key, value in limits.items():
        # Hard as well, so a child cannot raise them; it has run under the
        # soft ones since execve.  ESRCH: it is already gone.
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, getattr(resource, _LIMITS[key]), (int(value), int(value)))
    return pid


def serve(ctl: socket.socket, daemon: int, *, network: bool = False) -> None:
    """The launcher's loop: one request in, one child out, each reaped and reported."""
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, reply socket)

    def end(*_: Any) -> None:
        for pidfd in children:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGHUP, end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A soft RLIMIT_CPU set for a child's sake may lie below our own usage.
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    libc = _libc()
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != daemon:
        return
    if not network:  # the launcher for Ceph's tools (convd.rbd) keeps the daemon's network
        _leave_network(libc)
    _drop_inheritable_caps(libc)
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    dropped: dict[int, int] = {}  # reply socket fd -> pidfd, while the daemon still holds the child
    try:
        while True:
            for fd, _ in poller.poll():
                if fd in dropped:
                    # The daemon closed its end before the child ended (a cancelled
                    # spawn, a lost handle): nobody will stop that child but us.
                    poller.unregister(fd)
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(dropped.pop(fd), signal.SIGKILL)
                    continue
                if fd != ctl.fileno():
                    pid, reply = children.pop(fd)
                    poller.unregister(fd)
                    if dropped.pop(reply.fileno(), None) is not None:
                        poller.unregister(reply.fileno())
                    os.close(fd)
                    _, status = os.waitpid(pid, 0)
                    send(reply, {"returncode": os.waitstatus_to_exitcode(status)})
                    reply.close()
                    continue
                data, fds = recv_fds(ctl, 5)
                if not data:
                    return  # the daemon is gone
                reply = socket.socket(fileno=fds[3])
                pid = 0
                try:
                    req = json.loads(data)
                    pid = _spawn_limited(req["argv"], fds, req.get("limits") or {})
                    pidfd = os.pidfd_open(pid)
                except Exception as exc:  # noqa: BLE001 - a bad request must not end the launcher
                    if pid:  # started but not trackable: not left running unwatched
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    send(reply, {"error": f"{type(exc).__name__}: {exc}"})
                    reply.close()
                    continue
                finally:
                    for f in [*fds[:3], *fds[4:]]:
                        os.close(f)
                send(reply, {"pid": pid}, [pidfd])
                children[pidfd] = (pid, reply)
                poller.register(pidfd, select.POLLIN)
                dropped[reply.fileno()] = pidfd
                poller.register(reply, select.POLLHUP)  # the daemon sends nothing more on it
    finally:
        end()


def main(argv: list[str]) -> int:
    daemon, fd = int(argv[0]), int(argv[1])
    os.set_inheritable(fd, False)  # pass_fds made it inheritable: children must not get it
    serve(socket.socket(fileno=fd), daemon, network=argv[2:3] == ["net"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
