"""The qemu-img launcher: one small process, started once, that starts every
qemu-img child with its limits already in force, so no exec wrapper runs.

Why a process of its own: the daemon is threaded (anyio worker threads), so
it cannot run code between ``fork`` and ``exec`` (a ``preexec_fn`` may
deadlock on a lock another thread held), ``os.posix_spawn`` cannot set
resource limits, and ``prlimit(2)`` on a running child races its first read
of the image.  The launcher is single-threaded and holds nothing else, so it
can put the limits on *itself* for the instant of a ``posix_spawn``: the
child inherits them through ``vfork`` and ``execve`` and runs under them
from its first instruction.  (A Python ``fork`` per child, which could set
everything in the child, costs more CPU than the two exec wrappers it
would replace: measured in docs/benchmarks.md.)

What each child gets:

- its own session (a terminal's Ctrl-C is the daemon's to handle);
- no network: the launcher takes an empty network namespace at start,
  holding only a loopback that is down (``unshare(CLONE_NEWNET)``; without
  ``CAP_SYS_ADMIN``, as under the unit, inside a user namespace of its own,
  which the unit's ``RestrictNamespaces=user net`` allows), so no qemu-img
  it starts can reach an NBD, HTTP or SSH server whatever an image names.
  Where no namespace may be made (user namespaces turned off)
  :func:`convd.qemu.img.source_args` alone keeps qemu-img to its file;
- as descriptor 3, when the daemon sends one, the file it is to read
  (``convd.qemu.img`` names it ``/proc/self/fd/3``, never by path);
- ``RLIMIT_CPU`` and ``RLIMIT_AS`` when asked: inherited as soft limits at
  ``execve``, then made hard too (``prlimit`` on the new pid, so it cannot
  raise them again);
- no inheritable or ambient capabilities (the launcher drops them from
  itself at start, what ``setpriv --inh-caps=-all`` did per child);
- death when the daemon lets go of it: a child whose reply socket the daemon
  closes before it ended (a cancelled spawn) is SIGKILLed;
- death with the daemon: the launcher has ``PR_SET_PDEATHSIG(SIGTERM)`` to
  the daemon's main thread, and on that signal, on the end of its socket or
  on any error of its own it SIGKILLs every child it started before it
  exits.  (Only a SIGKILL of the launcher alone would leave them running,
  within their limits; under systemd the unit's cgroup still ends them.)

Wire protocol (``AF_UNIX``/``SOCK_SEQPACKET``, one datagram per message):
the daemon sends ``{"argv": [...], "limits": {...}}`` with four descriptors
(stdin, stdout, stderr, and one end of a fresh reply socket pair), and a
fifth when the child is to read a file through it (its descriptor 3); the
launcher answers on the reply socket ``{"pid": N}`` with a pidfd once the
child has exec'd (or ``{"error": "..."}``), then ``{"returncode": N}``
(negative: killed by that signal) when it has reaped the child.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from convd.qemu.wire import recv_fds

__all__ = ["Child", "Launcher", "get", "shutdown"]

_CHUNK = 64 << 10


class Child:
    """A qemu-img process started by the launcher; the subset of
    ``asyncio.subprocess.Process`` that convd uses, on a pidfd (no pid reuse race)."""

    def __init__(self, pid: int, pidfd: int, reply: socket.socket, stdout: int, stderr: int,
                 spawn_seconds: float) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.spawn_seconds = spawn_seconds
        self.started = time.monotonic()
        self._pidfd = pidfd
        self._reply = reply
        self._stdout = stdout
        self._stderr = stderr

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None or self._pidfd < 0:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """The exit status, as the launcher reaped it (negative: the signal that killed it)."""
        if self.returncode is None:
            data, _ = await _recv(self._reply)
            msg = json.loads(data) if data else {"returncode": -signal.SIGKILL}
            self.returncode = int(msg["returncode"])
            self._close()
        return self.returncode

    async def read_stdout(self, on_chunk: Any = None) -> bytes:
        return await _read_all(self._take("_stdout"), on_chunk)

    async def read_stderr(self) -> bytes:
        return await _read_all(self._take("_stderr"), None)

    async def communicate(self) -> tuple[bytes, bytes]:
        out, err, _ = await asyncio.gather(self.read_stdout(), self.read_stderr(), self.wait())
        return out, err

    def _take(self, attr: str) -> int:
        fd = getattr(self, attr)
        setattr(self, attr, -1)
        return fd

    def _close(self) -> None:
        for attr in ("_pidfd", "_stdout", "_stderr"):
            fd = self._take(attr)
            if fd >= 0:
                os.close(fd)
        self._reply.close()

    def __del__(self) -> None:
        if self._pidfd >= 0:
            self._close()


def _wait_readable(fd: int) -> asyncio.Future[None]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        loop.remove_reader(fd)
        if not fut.done():
            fut.set_result(None)

    fut.add_done_callback(lambda _: loop.remove_reader(fd))
    loop.add_reader(fd, ready)
    return fut


async def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    while True:
        try:
            return recv_fds(sock, 1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            await _wait_readable(sock.fileno())


async def _read_all(fd: int, on_chunk: Any) -> bytes:
    if fd < 0:
        return b""
    parts: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                await _wait_readable(fd)
                continue
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
    finally:
        os.close(fd)


class Launcher:
    """The daemon's handle on its launcher process (start it from the main thread:
    the launcher's parent-death signal follows the thread that forked it)."""

    def __init__(self, env: dict[str, str] | None = None, *, network: bool = False) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "convd.qemu.launcher_process", str(os.getpid()), str(theirs.fileno()),
             *(["net"] if network else [])],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )
        theirs.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def spawn(self, argv: list[str], limits: dict[str, int] | None = None,
                    pass_fd: int | None = None) -> Child:
        """Start ``argv`` (argv[0] an absolute path) with stdout and stderr piped to us,
        and ``pass_fd`` (if given; still ours to close) as its descriptor 3.

        Raises ``OSError`` if the child could not be started; by then it never exec'd.
        """
        t0 = time.monotonic()
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The child's ends must block: qemu-img does not expect O_NONBLOCK.
        os.set_blocking(out_w, True)
        os.set_blocking(err_w, True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            msg = json.dumps({"argv": argv, "limits": limits or {}}).encode()
            with self._lock:
                socket.send_fds(self._sock, [msg], [devnull, out_w, err_w, theirs.fileno(),
                                                    *([] if pass_fd is None else [pass_fd])])
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            ours.close()
            raise
        finally:
            for fd in (devnull, out_w, err_w):
                os.close(fd)
            theirs.close()
        try:
            data, fds = await _recv(ours)
        except BaseException:
            ours.close()
            os.close(out_r)
            os.close(err_r)
            raise
        msg_in = json.loads(data) if data else {"error": "the launcher exited"}
        if "pid" not in msg_in:
            ours.close()
            os.close(out_r)
            os.close(err_r)
            for fd in fds:
                os.close(fd)
            raise OSError(f"cannot start {os.path.basename(argv[0])}: {msg_in.get('error')}")
        return Child(int(msg_in["pid"]), fds[0], ours, out_r, err_r, time.monotonic() - t0)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the launcher (its remaining children get SIGKILL) and reap it."""
        self._sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_instances: dict[bool, Launcher] = {}


def get(env: Callable[[], dict[str, str]] | None = None, *, network: bool = False) -> Launcher:
    """This process's launcher, started on first use (or again if it died) with
    the environment ``env()`` gives (which its children inherit).

    ``network``: the launcher whose children keep the daemon's network (Ceph's
    tools and a conversion into RBD); the other, for every qemu-img run on an
    unvetted source, takes an empty network namespace where it may.
    """
    current = _instances.get(network)
    if current is None or not current.alive():
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the qemu-img launcher must be started from the main thread")
        if current is not None:
            current.close()
        current = _instances[network] = Launcher(env() if env else None, network=network)
        atexit.register(shutdown)
    return current


def shutdown() -> None:
    for key in list(_instances):
        _instances.pop(key).close()
