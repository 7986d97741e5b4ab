"""The one way convd talks to Ceph: the ``rbd`` and ``ceph`` command-line tools.

Every call is a child started by ``convd.qemu.launcher`` (its own session, dies
with the daemon), bounded by a timeout, with ``--conf``/``--id``/``--keyring``
from ``[publish.rbd]``.  A failure raises :class:`CephError` carrying the
errno Ceph printed (``rbd: error opening pool 'images': (2) No such file or
directory``) and Ceph's own words; :func:`item_error` turns it into what
the runner acts on: a retry for what may pass (cluster unreachable, a full
pool), a ``convert_failed`` record for what will not (pool missing,
permission denied).

Image names: an item ``NAME`` is written as ``.convd-tmp.INSTANCE+ATTEMPT+NAME``
(``+`` cannot occur in an instance name, so one instance's prefix never
matches another's) and renamed to ``NAME`` when complete; RBD renames
atomically within a pool, and refuses (EEXIST) when ``NAME`` exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from convd.config import RbdConfig
from convd.errors import ConvertFailed, ItemError, Stopped, TransientError
from convd.qemu import launcher

__all__ = [
    "TMP_PREFIX",
    "CephError",
    "PoolSpace",
    "Readback",
    "check_tools",
    "fsid",
    "image_id",
    "item_error",
    "list_images",
    "location",
    "name_refused",
    "pool_space",
    "qemu_target",
    "readback",
    "remove",
    "rename",
    "snapshot",
    "stale_images",
    "sweep",
    "tmp_name",
    "together",
]

log = structlog.get_logger(__name__)

TMP_PREFIX = ".convd-tmp."
_TIMEOUT = 120.0
# "rbd: error opening pool 'x': (2) No such file or directory"; the ceph
# tool prints "[errno 2] RADOS object not found (...)" or a monitor's
# "Error ENOENT: unrecognized pool 'x'".
_ERRNO = re.compile(r"\((\d+)\) ([^\n]*)|\[errno (\d+)\] ([^\n]*)|Error (E[A-Z]+): ([^\n]*)")
# What may pass by itself: the cluster unreachable or busy, a full pool.
_TRANSIENT = {errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EAGAIN, errno.EINTR,
              errno.ESHUTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO, errno.EDQUOT, errno.ENOSPC,
              errno.EBUSY}


class CephError(Exception):
    """A ``rbd``/``ceph`` command failed; ``errno`` as Ceph printed it (0: none printed)."""

    def __init__(self, what: str, returncode: int, stderr: str) -> None:
        self.what = what
        self.errno = 0
        self.returncode = returncode
        found = list(_ERRNO.finditer(stderr))
        m = found[-1] if found else None  # the last one: the innermost cause
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        if m is not None:
            if m.group(5):
                self.errno = getattr(errno, m.group(5), 0)
            else:
                self.errno = int(m.group(1) or m.group(3))
            self.reason = lines[-1] if lines else m.group(0).strip()
            for ln in lines:  # the line that carries the errno says most
                if m.group(0) in ln:
                    self.reason = ln
        else:
            self.reason = lines[-1] if lines else f"exit status {returncode}"
        if "error connecting to the cluster" in stderr or "failed to fetch mon config" in stderr:
            self.errno = self.errno or errno.ETIMEDOUT
        super().__init__(f"{what}: {self.reason}")

    @property
    def transient(self) -> bool:
        return self.errno in _TRANSIENT or self.returncode < 0


def item_error(exc: CephError) -> ItemError | TransientError:
    """The runner's error for a Ceph failure: retried when it may pass, else ``convert_failed``."""
    if exc.transient:
        return TransientError(f"Ceph: {exc}")
    return ConvertFailed(f"Ceph: {exc}")


def tmp_name(instance: str, name: str, attempt: str = "") -> str:
    """The temporary image an attempt of ``name`` writes: ``.convd-tmp.INSTANCE+ATTEMPT+NAME``.

    Each attempt has a name of its own: a crashed attempt's image keeps its
    dead writer's watch for up to 30 s (``osd_client_watch_timeout``), and
    RBD removes no image that is watched.
    """
    return f"{TMP_PREFIX}{instance}+{attempt}+{name}"


def name_refused(name: str, instance: str) -> str | None:
    """Why RBD cannot hold ``name`` as an image (the reason), or None.

    librbd keeps image names in an omap of the pool's directory object:
    ``/`` and ``@`` would be read as pool and snapshot separators by every
    tool, and qemu's ``rbd:`` syntax gives ``:`` and ``\\`` meanings too;
    names of temporary images are convd's own.
    """
    if any(c in name for c in "/@:\\") or any(ord(c) < 32 or c.isspace() for c in name):
        return "contains /, @, :, \\, white space or a control character"
    if name.startswith(TMP_PREFIX):
        return f"starts with {TMP_PREFIX}, convd's prefix for images being written"
    if len(tmp_name(instance, name, "0" * 8).encode()) > 250:
        return "is too long for an RBD image name with convd's temporary prefix"
    return None


def _common(cfg: RbdConfig) -> list[str]:
    args = ["--conf", str(cfg.ceph_conf), "--id", cfg.user]
    if cfg.keyring:
        args += ["--keyring", cfg.keyring]
    return args


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                         "CEPH_ARGS")}


async def _terminate(proc: launcher.Child) -> None:
    from convd.qemu.img import (
        terminate,  # the same SIGTERM, grace, SIGKILL as every qemu-img child
    )
    await terminate(proc)


async def _run(tool: str, cfg: RbdConfig, *args: str, timeout: float = _TIMEOUT) -> bytes:
    """``tool`` (rbd or ceph) with the cluster arguments; stdout, or CephError."""
    argv = [_tool(tool), *_common(cfg), *args]
    what = f"{tool} {args[0]}"
    proc = await launcher.get(_env, network=True).spawn(argv, {})
    try:
        with anyio.fail_after(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        await _terminate(proc)
        raise CephError(what, -1, f"no answer within {timeout:g} s (the cluster is unreachable?) "
                                  f"({errno.ETIMEDOUT}) Connection timed out") from None
    except BaseException:
        await _terminate(proc)
        raise
    if proc.returncode != 0:
        raise CephError(what, proc.returncode or 0, err.decode(errors="replace"))
    return out


def _tool(name: str) -> str:
    # The launcher executes a path, as given: no PATH search of its own.
    return shutil.which(name) or name


async def together(*calls: Awaitable[Any]) -> list[Any]:
    """Await ``calls`` side by side; all finish, then the first failure (if any) is raised as itself."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


def check_tools() -> str | None:
    """Why RBD publishing cannot work on this machine, or None."""
    missing = [t for t in ("rbd", "ceph") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH (Debian: apt-get install ceph-common)"
    if not any(os.path.exists(f"/usr/lib/{d}/qemu/block-rbd.so") for d in _multiarch()):
        return "qemu's rbd driver (block-rbd.so) is not installed (Debian: apt-get install qemu-block-extra)"
    return None


def _multiarch() -> list[str]:
    try:
        return [d for d in os.listdir("/usr/lib") if d.endswith("-linux-gnu")] + ["."]
    except OSError:
        return ["."]


async def fsid(cfg: RbdConfig) -> str:
    """The cluster's fsid (``ceph fsid``; a monitor read that ``profile rbd`` allows)."""
    out = await _run("ceph", cfg, "fsid", "--format", "json")
    try:
        return str(json.loads(out)["fsid"])
    except (ValueError, KeyError, TypeError):
        return out.decode(errors="replace").strip()


async def image_id(cfg: RbdConfig, name: str) -> str | None:
    """The image's RBD id (fixed for its life, kept across renames), or None if no such image.

    Raises CephError for anything else, a missing pool included.
    """
    try:
        out = await _run("rbd", cfg, "info", "--format", "json", f"{cfg.pool}/{name}")
    except CephError as exc:
        if exc.errno == errno.ENOENT and "error opening pool" not in exc.reason:
            return None
        raise
    return str(json.loads(out)["id"])


async def list_images(cfg: RbdConfig) -> list[str]:
    out = await _run("rbd", cfg, "ls", "--format", "json", cfg.pool)
    return [str(n) for n in json.loads(out or b"[]")]


async def remove(cfg: RbdConfig, name: str) -> bool:
    """Remove an image and its snapshots (unprotected first); False if there was none."""
    spec = f"{cfg.pool}/{name}"
    try:
        snaps = json.loads(await _run("rbd", cfg, "snap", "ls", "--format", "json", spec) or b"[]")
    except CephError as exc:
        if exc.errno == errno.ENOENT and "error opening pool" not in exc.reason:
            return False
        raise
    for s in snaps:
        if str(s.get("protected")) == "true":
            await _run("rbd", cfg, "snap", "unprotect", f"{spec}@{s['name']}")
    if snaps:
        await _run("rbd", cfg, "snap", "purge", "--no-progress", spec)
    try:
        await _run("rbd", cfg, "rm", "--no-progress", spec)
    except CephError as exc:
        if exc.errno == errno.ENOENT and "error opening pool" not in exc.reason:
            return False
        raise
    return True


async def rename(cfg: RbdConfig, src: str, dst: str) -> None:
    """``rbd rename`` within the pool: atomic; CephError with EEXIST if ``dst`` exists."""
    await _run("rbd", cfg, "rename", f"{cfg.pool}/{src}", f"{cfg.pool}/{dst}")


async def snapshot(cfg: RbdConfig, name: str, snap: str, *, fresh: bool = False) -> None:
    """Create ``name@snap`` and protect it (as Glance's RBD store does), unless already so.

    ``fresh``: the image was just created by convd and has no snapshot (one
    round trip fewer).
    """
    spec = f"{cfg.pool}/{name}"
    snaps: dict[str, Any] = {}
    if not fresh:
        snaps = {s["name"]: s for s in json.loads(
            await _run("rbd", cfg, "snap", "ls", "--format", "json", spec) or b"[]")}
    if snap not in snaps:
        await _run("rbd", cfg, "snap", "create", f"{spec}@{snap}")
    if str(snaps.get(snap, {}).get("protected")) != "true":
        await _run("rbd", cfg, "snap", "protect", f"{spec}@{snap}")


def location(fsid_: str, pool: str, name: str, snap: str) -> str:
    """Glance's RBD location form: ``rbd://FSID/POOL/IMAGE/SNAP`` (no ``/SNAP`` without one)."""
    return f"rbd://{fsid_}/{pool}/{name}" + (f"/{snap}" if snap else "")


def _escape(value: str) -> str:
    # qemu's block/rbd.c splits its filename on ':' and '@' and takes '\' as the escape.
    return re.sub(r"([\\:@])", r"\\\1", value)


def qemu_target(cfg: RbdConfig, name: str) -> str:
    """qemu's ``rbd:POOL/IMAGE:id=USER:conf=PATH[:keyring=PATH]`` filename for an image."""
    spec = f"rbd:{cfg.pool}/{name}:id={_escape(cfg.user)}:conf={_escape(str(cfg.ceph_conf))}"
    if cfg.keyring:
        spec += f":keyring={_escape(cfg.keyring)}"
    return spec


# -- space -------------------------------------------------------------------


async def pool_space(cfg: RbdConfig) -> tuple[int, int, int]:
    """``(stored, max_avail, quota_max_bytes)`` of the pool, bytes (quota 0: none).

    ``stored`` and the quota are ``ceph osd pool get-quota``'s (the bytes
    Ceph compares with the quota); ``max_avail`` is ``ceph df``'s (user
    bytes, replication already divided out; 0 until the manager has
    reported on a new pool).
    """
    # Two round trips of the ceph tool (most of a second each: it is Python), side by side.
    q, d = await together(_run("ceph", cfg, "osd", "pool", "get-quota", cfg.pool, "--format", "json"),
                          _run("ceph", cfg, "df", "--format", "json"))
    quota, df = json.loads(q), json.loads(d)
    stats: dict[str, Any] = next(
        (p.get("stats", {}) for p in df.get("pools", []) if p.get("name") == cfg.pool), {})
    return (int(quota.get("current_num_bytes", 0)), int(stats.get("max_avail", 0)),
            int(quota.get("quota_max_bytes", 0)))


class PoolSpace:
    """What the pool can still take, in the shape the ledger asks of a filesystem.

    ``free``/``total`` answer from the last :meth:`refresh` (the ledger asks
    from the event loop, a ``ceph df`` takes a round trip): free is the
    smaller of what ``ceph df`` says is available and what the quota leaves.
    """

    def __init__(self, cfg: RbdConfig) -> None:
        self.cfg = cfg
        self.stored = 0
        self.max_avail = 0
        self.quota = 0
        self.refreshed = 0.0

    async def refresh(self) -> None:
        self.stored, self.max_avail, self.quota = await pool_space(self.cfg)
        self.refreshed = time.monotonic()

    def free(self) -> int:
        if self.quota:
            return max(0, min(self.max_avail, self.quota - self.stored))
        return self.max_avail

    def total(self) -> int:
        return self.quota if self.quota else self.stored + self.max_avail


# -- read back -------------------------------------------------------------


@dataclass
class Readback:
    size: int
    checksums: dict[str, str]
    head: bytes  # the first bytes, for the output's inspection


def _hash_pipe(fd: int, algorithms: Sequence[str], head_bytes: int, stop: threading.Event,
               on_bytes: Callable[[int], None] | None) -> tuple[int, dict[str, str], bytes]:
    os.set_blocking(fd, True)
    hashers = [hashlib.new(a) for a in algorithms]
    head = bytearray()
    size = 0
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    try:
        while True:
            if stop.is_set():
                raise Stopped("read-back interrupted by shutdown")
            n = os.readv(fd, [view])
            if n == 0:
                break
            for h in hashers:
                h.update(view[:n])
            if len(head) < head_bytes:
                head += view[: min(n, head_bytes - len(head))]
            size += n
            if on_bytes:
                on_bytes(n)
    finally:
        os.close(fd)
    return size, {a: h.hexdigest() for a, h in zip(algorithms, hashers)}, bytes(head)


class _Unordered(Exception):
    """``rbd export-diff`` gave a record before one already read (the stream cannot be hashed in one pass)."""


class _Truncated(Exception):
    """The stream ended before its end record."""


_DIFF_HEADER = b"rbd diff v1\n"
# Hashed for every unallocated byte: a 2 GiB hole costs sha256's CPU
# (about 1 s), no read from the cluster and no pipe copy.
_ZEROS = memoryview(bytes(4 << 20))


# Data read ahead of the hashing thread, at most (the holes between cost nothing to queue).
_AHEAD_BYTES = 64 << 20


class _Hasher:
    """The digests computed in a thread of their own, beside the thread that reads the stream.

    hashlib lets go of the GIL while it hashes, so reading the next extents
    from ``rbd`` overlaps hashing the last ones and the holes: the read-back
    takes about the longer of the two, not their sum.  ``update`` takes a
    chunk (kept, not copied: the caller must not reuse it) or a count of
    zeros; at most ``_AHEAD_BYTES`` of data wait at a time.
    """

    def __init__(self, algorithms: Sequence[str], stop: threading.Event) -> None:
        self.algorithms = list(algorithms)
        self._stop = stop
        self._queue: queue.SimpleQueue[bytes | int | None] = queue.SimpleQueue()
        self._room = threading.Semaphore(_AHEAD_BYTES >> 20)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="convd-rbd-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        hashers = [hashlib.new(a) for a in self.algorithms]
        while (item := self._queue.get()) is not None:
            try:
                if self._error is not None:
                    continue  # drained only: the reader is told at its next update
                if self._stop.is_set():
                    raise Stopped("read-back interrupted by shutdown")
                if isinstance(item, int):
                    while item > 0:
                        if self._stop.is_set():  # a long hole: seconds of hashing
                            raise Stopped("read-back interrupted by shutdown")
                        n = min(item, len(_ZEROS))
                        for h in hashers:
                            h.update(_ZEROS[:n])
                        item -= n
                else:
                    for h in hashers:
                        h.update(item)
            except Exception as exc:  # noqa: BLE001 - handed to the reader's thread by update(), finish()
                self._error = exc
            finally:
                if isinstance(item, bytes) and item:
                    self._room.release(-(-len(item) >> 20))
        self.digests = {a: h.hexdigest() for a, h in zip(self.algorithms, hashers)}

    def update(self, chunk: bytes | int) -> None:
        if self._error is not None:
            raise self._error
        if not isinstance(chunk, int) and chunk:
            for _ in range(-(-len(chunk) >> 20)):
                self._room.acquire()
        self._queue.put(chunk)

    def finish(self) -> dict[str, str]:
        """Wait for the hashing to end; the hex digests.  Raises what the thread raised."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.digests

    def abandon(self) -> None:
        self._error = self._error or Stopped("read-back abandoned")
        self._queue.put(None)


def _hash_diff(fd: int, algorithms: Sequence[str], head_bytes: int, stop: threading.Event,
               on_bytes: Callable[[int], None] | None) -> tuple[int, dict[str, str], bytes, bool]:
    """Hash the image from an ``rbd export-diff IMAGE -`` stream (format v1, Ceph's doc/dev/rbd-diff.rst).

    The stream carries the size (``s``) and only the allocated extents
    (``w``: offset, length, data; ``z``: a zeroed extent), in offset order
    as ``rbd export-diff`` writes them; every byte between them reads as
    zero, so zeros are hashed there.  Returns ``(size, digests, head,
    complete)``; without algorithms it stops (``complete`` False) once the
    head is read.  Raises ``_Unordered`` for a record behind the position,
    ``_Truncated`` for a stream cut short.
    """
    os.set_blocking(fd, True)
    # A deeper pipe lets rbd run ahead with data while a long hole is hashed.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    hasher = _Hasher(algorithms, stop) if algorithms else None
    head = bytearray()
    pos = 0
    size: int | None = None
    chunk_bytes = len(_ZEROS)

    def feed(chunk: bytes) -> None:
        nonlocal pos
        if stop.is_set():
            raise Stopped("read-back interrupted by shutdown")
        if hasher is not None:
            hasher.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
        if len(head) < head_bytes:
            head.extend(chunk[: head_bytes - len(head)])
        pos += len(chunk)

    def zeros_to(end: int) -> None:
        nonlocal pos
        if end <= pos:
            return
        if hasher is not None:
            hasher.update(end - pos)
            if on_bytes:
                on_bytes(end - pos)
        if len(head) < head_bytes:
            head.extend(bytes(min(end - pos, head_bytes - len(head))))
        pos = end

    try:
        with io.FileIO(fd, "rb") as raw, io.BufferedReader(raw, 1 << 20) as f:
            def exact(n: int) -> bytes:
                b = f.read(n)
                if len(b) != n:
                    raise _Truncated()
                return b

            def u64() -> int:
                return int.from_bytes(exact(8), "little")

            if exact(len(_DIFF_HEADER)) != _DIFF_HEADER:
                raise _Truncated()
            while True:
                if hasher is None and size is not None and len(head) >= head_bytes:
                    return size, {}, bytes(head), False
                tag = exact(1)
                if tag in (b"f", b"t"):
                    exact(int.from_bytes(exact(4), "little"))
                elif tag == b"s":
                    size = u64()
                elif tag in (b"w", b"z"):
                    off, length = u64(), u64()
                    if size is None or off < pos or off + length > size:
                        raise _Unordered(f"{tag.decode()} {off}+{length} at {pos} of {size}")
                    zeros_to(off)
                    if tag == b"z":
                        zeros_to(off + length)
                        continue
                    while length:
                        # A new buffer each time: the hashing thread keeps it until hashed.
                        chunk = f.read(min(length, chunk_bytes))
                        if not chunk:
                            raise _Truncated()
                        feed(chunk)
                        length -= len(chunk)
                elif tag == b"e":
                    break
                else:
                    raise _Unordered(f"unknown record {tag!r}")
            if size is None:
                raise _Truncated()
            zeros_to(size)
        digests = hasher.finish() if hasher is not None else {}
    except BaseException:
        if hasher is not None:
            hasher.abandon()
        raise
    return size, digests, bytes(head), True


async def readback(cfg: RbdConfig, name: str, algorithms: Sequence[str], *, head_bytes: int,
                   stop: threading.Event, timeout: float,
                   on_bytes: Callable[[int], None] | None = None) -> Readback:
    """Read the image back from RBD: its size (bytes), digests (hex, per hashlib name) and first bytes.

    The digests are of the bytes a consumer of ``POOL/NAME`` reads, holes
    as zeros, but only the allocated extents cross the network: ``rbd
    export-diff IMAGE -`` (no ``--from-snap``: everything written) streams
    them and the holes between are hashed as zeros without being read, so
    the read costs the data, the hashing the virtual size.  With no
    ``algorithms``, the stream is cut once the first ``head_bytes`` are in.
    Should a stream come out of offset order, the image is read whole
    (``rbd export IMAGE -``) instead.  Raises CephError, Stopped.
    """
    try:
        size, sums, head, _ = await _stream(
            cfg, "export-diff", name, lambda fd: _hash_diff(fd, algorithms, head_bytes, stop, on_bytes),
            stop, timeout)
    except _Unordered as exc:
        log.warning("rbd export-diff came out of order; reading the whole image", image=name, record=str(exc))
        size, sums, head = await _stream(
            cfg, "export", name, lambda fd: _hash_pipe(fd, algorithms, head_bytes, stop, on_bytes), stop, timeout)
    return Readback(size, sums, head)


async def _stream(cfg: RbdConfig, verb: str, name: str, work: Callable[[int], Any], stop: threading.Event,
                  timeout: float) -> Any:
    """``rbd VERB --no-progress POOL/NAME -``, its stdout handed to ``work`` in a worker thread.

    ``work`` returning a tuple whose last item is False has stopped early
    on purpose: the child is then ended, its status not asked.
    """
    argv = [_tool("rbd"), *_common(cfg), verb, "--no-progress", f"{cfg.pool}/{name}", "-"]
    what = f"rbd {verb}"
    proc = await launcher.get(_env, network=True).spawn(argv, {})
    fd = proc._take("_stdout")  # read in a worker thread: hashing must not hold the event loop
    errs = asyncio.ensure_future(proc.read_stderr())
    try:
        with anyio.fail_after(timeout):
            try:
                res = await anyio.to_thread.run_sync(work, fd)
            except _Truncated:
                await proc.wait()
                err = (await errs).decode(errors="replace")
                raise CephError(what, proc.returncode or 0,
                                err if proc.returncode else "the stream ended early (5) Input/output error") \
                    from None
            if isinstance(res, tuple) and res[-1] is False:
                await _terminate(proc)
                await errs
                return res
            await proc.wait()
            err = (await errs).decode(errors="replace")
    except TimeoutError:
        await _terminate(proc)
        raise CephError(what, -1, f"no end within {timeout:g} s ({errno.ETIMEDOUT}) Connection timed out") \
            from None
    except BaseException:
        stop_here = stop.is_set()
        await _terminate(proc)
        if stop_here:
            raise Stopped("read-back interrupted by shutdown") from None
        raise
    finally:
        if not errs.done():
            errs.cancel()
    if proc.returncode != 0:
        raise CephError(what, proc.returncode or 0, err)
    return res


# -- temporary images -----------------------------------------------------------


async def stale_images(cfg: RbdConfig, instances: Sequence[str], keep: set[str]) -> list[str]:
    """The temporary images of ``instances`` now in the pool (unfinished attempts), except ``keep``.

    An attempt whose record was staged (``keep``) is finished by its
    handoff instead: its image is complete.
    """
    prefixes = tuple(f"{TMP_PREFIX}{i}+" for i in instances)
    return [n for n in await list_images(cfg) if n.startswith(prefixes) and n not in keep]


async def sweep(cfg: RbdConfig, names: Sequence[str], patience: float = 120.0) -> list[str]:
    """Remove ``names``; an image still watched by its crashed writer (EBUSY) is tried again
    every 5 s for ``patience`` seconds (Ceph drops a dead client's watch after 30 s).

    Returns the names removed (or found gone).
    """
    removed = []
    deadline = time.monotonic() + patience
    for name in names:
        while True:
            try:
                await remove(cfg, name)
                removed.append(name)
                break
            except CephError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("cannot remove a temporary image; the next start tries again", image=name,
                                error=str(exc))
                    break
                await anyio.sleep(5.0)
    return removed


def config_of(pending: dict[str, Any]) -> RbdConfig:
    """The ``[publish.rbd]`` a staged handoff was written with (recovery uses that one)."""
    r = pending["rbd"]
    return RbdConfig(pool=r["pool"], ceph_conf=r["ceph_conf"], user=r["user"], keyring=r["keyring"],
                     snapshot=r["snapshot"])
