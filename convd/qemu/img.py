"""The one way convd runs qemu-img: argument building, limits, progress, killing.

Every source is named by :func:`source_args`: a ``json:`` filename that names
the format driver (qemu-img never probes a format), the ``file`` protocol
driver (never nbd, http, ssh, …) and no backing or data file, whatever the
image's header says; the file itself is a descriptor the daemon opened
(``/proc/self/fd/3`` in the child), so no name the producer chose reaches
qemu.  Children are
started by ``convd.qemu.launcher``: each runs in its own session, dies with the
daemon (the launcher's ``PR_SET_PDEATHSIG``), and reads unvetted files under
CPU and address-space limits in force from ``execve`` (no exec wrappers).

While an item runs, ``phase_timings`` holds its ``timings`` dict: every run
adds ``spawn`` (the launcher's round trip, seconds) and ``qemu_<command>``
(the qemu-img process's life, seconds), for the record and the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio

from convd.errors import CorruptImage, StartupError, Timeout, TransientError
from convd.qemu import launcher

if TYPE_CHECKING:  # annotations only: qemu/ does not import the daemon's configuration at run time
    from convd.config import DetectConfig, TargetConfig

__all__ = [
    "SOURCE_FILENAME",
    "TARGET_OPTIONS",
    "QemuResult",
    "check",
    "check_tools",
    "convert",
    "convert_args",
    "data_bytes",
    "info",
    "layout_args",
    "measure",
    "phase_timings",
    "qemu_img",
    "reason",
    "source_args",
    "terminate",
]

_PROGRESS = re.compile(rb"\(\s*([0-9]+(?:\.[0-9]+)?)/100%\)")
# qemu-img.c: a failed read of the source (or of its block status) is
# "error while reading ..."; write failures say "error while writing".
_SOURCE_UNREADABLE = re.compile(rb"error while reading")
_KILL_GRACE = 3.0
phase_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "phase_timings", default=None)


def check_tools() -> None:
    """Refuse to start without qemu-img, or without the launcher that applies its limits."""
    if shutil.which("qemu-img") is None:
        raise StartupError("qemu-img not found on PATH (Debian: apt-get install qemu-utils)")
    try:
        launcher.get(_child_env)
    except OSError as exc:
        raise StartupError(f"cannot start the qemu-img launcher: {exc}") from None


_qemu_img: str | None = None


def qemu_img() -> str:
    global _qemu_img
    if _qemu_img is None:
        _qemu_img = shutil.which("qemu-img")
    if _qemu_img is None:
        raise RuntimeError("qemu-img not found on PATH (Debian: apt-get install qemu-utils)")
    return _qemu_img


# How a child names the source: the descriptor the launcher hands it (fd 3).
SOURCE_FILENAME = "/proc/self/fd/3"
# Formats whose driver takes an external data file ("data-file", block/qcow2.c);
# the others refuse the option.
_DATA_FILE_DRIVERS = ("qcow2",)
_NO_OPTIONS: Mapping[str, str] = MappingProxyType({})


def source_args(path: str, fmt: str, options: Mapping[str, str] = _NO_OPTIONS) -> list[str]:
    """The qemu-img arguments that open ``path`` as ``fmt`` and nothing else.

    convd's own runs pass :data:`SOURCE_FILENAME` as ``path`` (the file goes
    to the child as a descriptor: qemu's JSON takes no name that is not
    UTF-8, and the child never resolves a name in the spool).

    One ``json:`` filename: the format driver named (no probing), the
    ``file`` protocol driver under it (a header or name can reach no nbd,
    http or ssh), ``"backing": null`` (qemu 7.2 accepts it for every driver;
    the dotted ``--image-opts`` form cannot say null) and, for qcow2,
    ``"data-file": null``: whatever the header names, qemu-img opens no other
    file.  ``options`` are further options of the format driver (e.g.
    ``{"force_size_calc": "current_size"}`` for vpc).  Use it without ``-f``.
    """
    spec: dict[str, Any] = {"driver": fmt, **options, "file": {"driver": "file", "filename": path},
                            "backing": None}
    if fmt in _DATA_FILE_DRIVERS:
        spec["data-file"] = None
    return ["json:" + json.dumps(spec, separators=(",", ":"))]


def reason(stderr: bytes, returncode: int, paths: dict[str, str]) -> str:
    """qemu-img's own reason for a failure, with ``paths`` (e.g. work/… → NAME) replaced.

    qemu reports errors as ``qemu-img: message`` lines and follows them with
    hints (``To replay the log, run: qemu-img check -r all '…'``); the hints
    name commands and paths meant for someone at the file, so only the
    ``qemu-img:`` lines are kept.
    """
    text = stderr.decode(errors="replace")
    for path, label in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, label)
    # qemu nests "Could not open 'X': " once per layer (format, then file).
    text = re.sub(r"(Could not open '[^'\n]*': )(?:\1)+", r"\1", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("qemu-img:")]
    if errors:
        return "; ".join(errors)
    return lines[0] if lines else f"exit status {returncode}"


@dataclass
class QemuResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    paths: dict[str, str]

    @property
    def error_text(self) -> str:
        return reason(self.stderr, self.returncode, self.paths)


def _child_env() -> dict[str, str]:
    # systemd's notify/watchdog variables are the daemon's alone.  (The
    # launcher adds MALLOC_ARENA_MAX for children under a memory limit.)
    return {k: v for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                         "CEPH_ARGS")}


async def terminate(proc: launcher.Child, grace: float = _KILL_GRACE) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; always reaps, even when cancelled."""
    if proc.returncode is not None:
        return
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            await proc.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _note(key: str, seconds: float) -> None:
    timings = phase_timings.get()
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + seconds


def _open_source(path: str) -> int:
    """The source for a child, opened without following a link and without blocking
    (what it is, the stages have vetted: detect refuses anything but a regular file)."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


async def _spawn(argv: list[str], cpu_time: float | None = None,
                 address_space: int | None = None, source: str | None = None,
                 network: bool = False) -> launcher.Child:
    limits: dict[str, int] = {}
    if cpu_time:
        limits["cpu_time"] = max(1, int(cpu_time))
    if address_space:
        limits["address_space"] = int(address_space)
    fd = _open_source(source) if source is not None else None
    try:
        # OSError (qemu-img not startable): an internal error, as a failed exec always was.
        proc = await launcher.get(_child_env, network=network).spawn(argv, limits, pass_fd=fd)
    finally:
        if fd is not None:
            os.close(fd)
    _note("spawn", proc.spawn_seconds)
    return proc


def _ran(proc: launcher.Child, what: str) -> None:
    _note(f"qemu_{what}", time.monotonic() - proc.started)


@contextlib.asynccontextmanager
async def _supervised(proc: launcher.Child, timeout: float, what: str) -> AsyncIterator[None]:
    """Kill ``proc`` (SIGTERM, then SIGKILL) on timeout, cancellation or error."""
    try:
        with anyio.fail_after(timeout):
            yield
    except TimeoutError:
        await terminate(proc)
        raise Timeout(f"qemu-img {what} exceeded its {timeout:g} s limit") from None
    except BaseException:
        await terminate(proc)
        raise


async def _run(argv: list[str], timeout: float, *, path: str, name: str | None = None,
               **limits: Any) -> QemuResult:
    proc = await _spawn(argv, source=path, **limits)
    async with _supervised(proc, timeout, argv[1]):
        out, err = await proc.communicate()
    _ran(proc, argv[1])
    label = name or os.path.basename(path)
    # qemu names the source by its json: filename (argv[-1]) or by the file in it.
    return QemuResult(proc.returncode or 0, out, err, {argv[-1]: label, SOURCE_FILENAME: label, path: label})


def _limited(res: QemuResult) -> bool:
    return res.returncode < 0 or res.returncode in (128 + signal.SIGKILL, 128 + signal.SIGXCPU)


async def info(path: str, fmt: str, *, cpu_time: float, address_space: int,
               name: str | None = None, options: Mapping[str, str] = _NO_OPTIONS) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` as ``fmt`` (:func:`source_args`) under resource limits.

    ``name`` stands for ``path`` in messages (the item's name, not its work/ path);
    ``options`` are the driver's (:func:`source_args`).
    """
    res = await _run(
        [qemu_img(), "info", "--output=json", *source_args(SOURCE_FILENAME, fmt, options)],
        timeout=cpu_time * 2 + 10, cpu_time=cpu_time, address_space=address_space, path=path, name=name,
    )
    if res.returncode != 0:
        if _limited(res):
            raise CorruptImage(f"qemu-img info as {fmt} hit its resource limits ({res.error_text})")
        raise CorruptImage(f"qemu-img cannot read it as {fmt}: {res.error_text}")
    try:
        return json.loads(res.stdout)
    except ValueError:
        raise CorruptImage(f"qemu-img info as {fmt} printed no JSON") from None


async def check(path: str, fmt: str, *, limits: DetectConfig, name: str | None = None,
                options: Mapping[str, str] = _NO_OPTIONS) -> dict[str, Any]:
    """``qemu-img check --output=json`` of ``path`` as ``fmt`` (read-only) under resource limits.

    Returns qemu's report (``corruptions``, ``leaks``, ``check-errors``, …);
    exit 2 (corruptions) and 3 (leaks only) are reports, not failures.
    Raises ``CorruptImage`` when qemu-img cannot check the image at all.
    """
    res = await _run([qemu_img(), "check", "--output=json", *source_args(SOURCE_FILENAME, fmt, options)],
                     timeout=600,
                     path=path, name=name, **_estimate_limits(limits))
    if _limited(res):
        raise CorruptImage(f"qemu-img check as {fmt} hit its resource limits ({res.error_text})")
    try:
        report = json.loads(res.stdout)
    except ValueError:
        raise CorruptImage(f"qemu-img check as {fmt}: {res.error_text}") from None
    if res.returncode not in (0, 2, 3) and not report.get("check-errors"):
        raise CorruptImage(f"qemu-img check as {fmt}: {res.error_text}")
    first = next((ln.strip() for ln in res.stderr.decode(errors="replace").splitlines() if ln.strip()), "")
    for shown in sorted(res.paths, key=len, reverse=True):
        first = first.replace(shown, res.paths[shown])
    report["first_error"] = first
    return report


def _estimate_limits(limits: DetectConfig) -> dict[str, Any]:
    # A crafted image can make map's JSON huge: the same memory cap as info,
    # and ten times its CPU (a big, honest image has many extents).
    return {"cpu_time": limits.cpu_time * 10, "address_space": limits.address_space}


async def data_bytes(path: str, fmt: str, block: int, *, limits: DetectConfig,
                     name: str | None = None, options: Mapping[str, str] = _NO_OPTIONS) -> int:
    """Bytes a sparse raw copy needs: data extents, each rounded out to ``block``."""
    res = await _run([qemu_img(), "map", "--output=json", *source_args(SOURCE_FILENAME, fmt, options)],
                     timeout=600,
                     path=path, name=name, **_estimate_limits(limits))
    if res.returncode != 0:
        raise CorruptImage(f"qemu-img map as {fmt}: {res.error_text}")
    total = 0
    for ext in json.loads(res.stdout):
        if ext.get("data"):
            start = ext["start"] // block * block
            end = -(-(ext["start"] + ext["length"]) // block) * block
            total += end - start
    return total


async def measure(path: str, fmt: str, target: str, *, limits: DetectConfig,
                  name: str | None = None, options: Mapping[str, str] = _NO_OPTIONS,
                  target_options: Sequence[str] = ()) -> int:
    """``qemu-img measure`` required size, in bytes, for a ``target`` image of this source.

    ``options`` are the source driver's (:func:`source_args`);
    ``target_options``: ``-o`` pairs the output is created with
    (``layout_args``'s ``-o`` arguments; measure takes no ``-c``: for a
    compressed qcow2 it gives the size of the uncompressed clusters, an upper
    bound).
    """
    res = await _run(
        [qemu_img(), "measure", "--output=json", "-O", target, *target_options,
         *source_args(SOURCE_FILENAME, fmt, options)],
        timeout=600, path=path, name=name, **_estimate_limits(limits),
    )
    if res.returncode != 0:
        raise CorruptImage(f"qemu-img measure as {fmt}: {res.error_text}")
    return int(json.loads(res.stdout)["required"])


# Tuned defaults, from `make bench --variants` (docs/benchmarks.md), every
# method converting a freshly staged copy of its source: out-of-order writes
# (-W) help every raw and qcow2 target; writing with O_DIRECT (-t none)
# makes the durable total shorter and steadier, and leaves convd's own fsync
# almost nothing to do.  VMDK is the exception: qemu's vmdk driver issues
# one 64 KiB grain at a time, which O_DIRECT turns into as many synchronous
# device writes, so VMDK outputs go through the page cache (the variants
# tables of docs/benchmarks.md, 2 GiB, medians of 3, seconds to durable:
# VMDK → raw with qemu-img's defaults 1.22, -W 1.21, -m 16 -W 1.29, -t none
# -m 16 -W 1.61; streamOptimized 1.43, 1.54, 1.58, 1.69; VMDK → qcow2 with
# -W 1.24 against 2.86 with no flags and 1.59 with -t none -W;
# streamOptimized 1.53, 2.44, 1.68).
_TUNED: dict[tuple[str, str], tuple[str, ...]] = {
    ("vmdk", "raw"): (),
    ("vmdk", "qcow2"): ("-W",),
}
_DIRECT_TARGETS = ("raw", "qcow2")
# What a target needs so that the output keeps the source's virtual size
# exactly; not tuning, so added whatever [convert] qemu_args says.  vpc
# otherwise rounds the size up to a CHS geometry (block/vpc.c, and Azure
# refuses such disks); the other targets keep it (tests/test_integrity.py).
TARGET_OPTIONS: dict[str, tuple[str, ...]] = {"vpc": ("-o", "force_size=on")}


def layout_args(dst_fmt: str, target: TargetConfig, *, compress: bool = True) -> list[str]:
    """The output side of ``qemu-img convert`` for ``[target.FMT]``: ``-o`` pairs, and ``-c``.

    Option names are qemu-img 7.2's creation options (``qemu-img create -f
    FMT -o help``); ``compress=False`` leaves out ``-c`` (for ``measure``).
    """
    opts: list[str] = []
    if dst_fmt == "raw":
        opts.append(f"preallocation={target.raw.preallocation}")
    elif dst_fmt == "qcow2":
        q = target.qcow2
        opts += [f"compat={q.compat}", f"cluster_size={q.cluster_size}", f"preallocation={q.preallocation}"]
        if q.compression != "none":
            opts.append(f"compression_type={q.compression}")
    elif dst_fmt == "vpc":
        opts.append(f"subformat={target.vpc.subformat}")
    elif dst_fmt == "vmdk":
        opts.append(f"subformat={target.vmdk.subformat}")
    args = ["-o", ",".join(opts)] if opts else []
    if compress and dst_fmt == "qcow2" and target.qcow2.compression != "none":
        args.append("-c")
    return args


def convert_args(src_fmt: str, dst_fmt: str, override: Sequence[str] | None, *,
                 direct_io: bool = True) -> list[str]:
    """``qemu-img convert`` flags: the operator's override, else convd's tuned defaults."""
    if override is not None:
        return list(override)
    if (src_fmt, dst_fmt) in _TUNED:
        return list(_TUNED[src_fmt, dst_fmt])
    if dst_fmt not in _DIRECT_TARGETS:
        return []
    return ["-t", "none", "-W"] if direct_io else ["-W"]


async def convert(
    src: str, src_fmt: str, dst: str, dst_fmt: str, *,
    extra_args: Sequence[str], timeout: float,
    on_progress: Callable[[float], None] | None = None,
    name: str | None = None,
    options: Mapping[str, str] = _NO_OPTIONS,
    network: bool = False,
) -> None:
    """Run one ``qemu-img convert``.

    ``network``: the output is on the network (``rbd:``), so the child keeps
    the daemon's; the source is still opened by :func:`source_args` (the file
    protocol only), whatever its header names.

    Raises ``CorruptImage`` when qemu-img cannot read the source (a damaged
    compressed grain, say: it fails the same way every time) and
    ``TransientError`` for the rest (ENOSPC or EIO writing the output, a
    killed child), which may pass on retry.  ``name`` stands for ``src`` in
    messages; ``options`` are the source driver's (:func:`source_args`).
    """
    source = source_args(SOURCE_FILENAME, src_fmt, options)
    argv = [qemu_img(), "convert", "-p", "-O", dst_fmt, *extra_args,
            *TARGET_OPTIONS.get(dst_fmt, ()), *source, dst]
    proc = await _spawn(argv, source=src, network=network)

    def progress(chunk: bytes) -> None:
        if on_progress:
            found = _PROGRESS.findall(chunk)
            if found:
                on_progress(float(found[-1]) / 100.0)

    async with _supervised(proc, timeout, "convert"):
        _, err, returncode = await asyncio.gather(proc.read_stdout(progress), proc.read_stderr(), proc.wait())
    _ran(proc, "convert")
    if returncode != 0:
        label = name or os.path.basename(src)
        why = reason(err, returncode, {source[-1]: label, SOURCE_FILENAME: label, src: label,
                                       dst: "the output"})
        if returncode < 0:
            raise TransientError(f"qemu-img convert killed by signal {-returncode}")
        if _SOURCE_UNREADABLE.search(err):
            raise CorruptImage(f"qemu-img convert cannot read the source: {why}")
        raise TransientError(f"qemu-img convert exited {returncode}: {why}")
