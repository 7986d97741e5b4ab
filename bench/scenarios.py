"""The measurements.  Each returns plain dicts of raw samples (seconds, bytes)
that the report turns into medians and ratios; nothing here decides pass/miss."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.daemon import bench_daemon, parse_ts, write_config
from bench.images import tiny_raw
from bench.inotify import DirWatch, QueueOverflow
from convd_testing.daemon import Daemon, Spool, stage_private

__all__ = [
    "backlog",
    "bare_convert",
    "bare_decompress",
    "bare_sequential",
    "convd_once",
    "drain",
    "durable",
    "hashlib_sha256",
    "pickup_latency",
    "quiesce",
    "rate_limited",
    "settle_fs",
    "sha256sum",
    "warm",
]

Log = Callable[[str], None]
LARGE_TIMEOUT = 1800.0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle_fs(path: Path) -> None:
    """``syncfs`` of the bench filesystem, untimed, between runs: the previous run's
    deletions (and their discards) are committed before the next run's clock starts."""
    subprocess.run(["sync", "-f", str(path)], check=False)


def durable(path: Path) -> None:
    """Sources are on disk before any run, as a producer's finished upload would be."""
    _fsync(path)


def warm(path: Path) -> None:
    """Read a file once so its pages are cached, as for every run after it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.read(fd, 8 << 20):
            pass
    finally:
        os.close(fd)


def _bare_run(src: Path, dst: Path, argv: Sequence[str], *, to_dst: bool = False,
              precreate: int | None = None) -> dict[str, float]:
    """Run ``argv`` (``{src}`` standing for the source) on a fresh private copy of ``src``
    staged beside ``dst`` (untimed, removed after, as convd's runs get theirs), then
    ``fsync(dst)``: {"bare": until the command exits, "sync": until dst is durable}.
    ``to_dst``: the command writes dst on its standard output."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    staged = stage_private(src, dst.parent / f".source-{dst.name}")
    settle_fs(dst.parent)
    if precreate is not None:
        with open(dst, "wb") as fh:
            fh.truncate(precreate)
    argv = [str(staged) if a == "{src}" else a for a in argv]
    try:
        with open(dst, "wb") if to_dst else contextlib.nullcontext(subprocess.DEVNULL) as out:
            t0 = time.monotonic()
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE)
            t1 = time.monotonic()
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {res.stderr.decode(errors='replace').strip()}")
        _fsync(dst)
        t2 = time.monotonic()
    finally:
        staged.unlink(missing_ok=True)
        settle_fs(dst.parent)  # the copy's discards land before anything else is timed
    return {"bare": t1 - t0, "sync": t2 - t0}


def bare_convert(src: Path, fmt: str, target: str, dst: Path, args: Sequence[str] = (),
                 precreate: int | None = None) -> dict[str, float]:
    """``qemu-img convert -f FMT -O TARGET [ARGS] SRC DST`` as Glance runs it, then
    ``fsync(DST)``, on a fresh copy of SRC (see ``_bare_run``)."""
    return _bare_run(src, dst, ["qemu-img", "convert", "-f", fmt, "-O", target, *args, "{src}", str(dst)],
                     precreate=precreate)


def bare_decompress(tool: str, src: Path, dst: Path) -> dict[str, float]:
    """``TOOL -dc SRC > DST`` then ``fsync(DST)``, as an operator unpacks a download by
    hand, on a fresh copy of SRC (see ``_bare_run``)."""
    return _bare_run(src, dst, [tool, "-dc", "{src}"], to_dst=True)


def sha256sum(path: Path) -> tuple[float, str]:
    """Wall time of ``sha256sum PATH`` (coreutils), and the digest it printed."""
    t0 = time.monotonic()
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout
    return time.monotonic() - t0, out.split()[0]


def hashlib_sha256(path: Path) -> float:
    """The same pass through Python's hashlib (OpenSSL), for comparison with convd's own."""
    t0 = time.monotonic()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    return time.monotonic() - t0


def quiesce(spool: Spool, timeout: float = 120.0) -> None:
    """Wait until the daemon has cleaned up after its last item (it does so after the record)."""
    claims = spool.work / "bench"
    deadline = time.monotonic() + timeout
    while True:
        try:
            busy = [n for n in os.listdir(claims) if not n.startswith(".")]
        except FileNotFoundError:
            busy = []
        if not busy:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"convd still holds {busy[:5]} in {claims}")
        time.sleep(0.01)


def _item_events(daemon: Daemon, names: set[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """From the daemon's log: when each item was claimed, and the timings of its
    ``converted``/``passed through`` event (the record's, plus ``handoff``)."""
    claimed: dict[str, float] = {}
    timings: dict[str, dict[str, float]] = {}
    for ev in daemon.new_events():
        item = ev.get("item")
        if item not in names:
            continue
        if ev.get("event") == "claimed" and "timestamp" in ev:
            claimed[item] = parse_ts(ev["timestamp"])
        elif ev.get("event") in ("converted", "passed through") and isinstance(ev.get("timings"), dict):
            timings[item] = ev["timings"]
    return claimed, timings


def convd_once(daemon: Daemon, src: Path, name: str, timeout: float = LARGE_TIMEOUT) -> dict[str, Any]:
    """One image through a running daemon: pre-staged, renamed in, timed until ``NAME.json``."""
    spool = daemon.spool
    staged = spool.stage_copy(src, name)
    settle_fs(spool.root)  # as bare_convert does after staging its copy
    with DirWatch([spool.outgoing, spool.failed]) as watch:
        wall0 = time.time()
        t0 = time.monotonic()
        spool.drop_staged(staged, name)
        seen = watch.wait_for([f"{name}.json"], timeout)
    directory, t1 = seen[f"{name}.json"]
    rec = spool.result(directory, name)
    spool.consume(name)
    quiesce(spool)  # after the clean-up: the item's log events are all written
    claimed_at, logged = _item_events(daemon, {name})
    claimed = claimed_at.get(name)
    settle_fs(spool.root)
    return {
        "e2e": t1 - t0,
        "claimed": None if claimed is None else claimed - wall0,
        "status": rec["status"],
        "timings": {**rec.get("timings", {}), **{k: v for k, v in logged.get(name, {}).items()
                                                  if k not in rec.get("timings", {})}},
        "sha256": (rec.get("target") or {}).get("checksums", {}).get("sha256"),
        "target_size": (rec.get("target") or {}).get("size"),
    }


def drain(daemon: Daemon, sources: Sequence[Path], tag: str) -> dict[str, Any]:
    """All ``sources`` renamed in at once; time until the last record."""
    spool = daemon.spool
    names = [f"{tag}-{i:04d}" for i in range(len(sources))]
    staged = [spool.stage_copy(src, n) for src, n in zip(sources, names)]
    settle_fs(spool.root)  # as bare_sequential does after staging its copies
    cpu0 = daemon.cpu()
    with DirWatch([spool.outgoing, spool.failed]) as watch:
        wall0 = time.time()
        t0 = time.monotonic()
        for s, n in zip(staged, names):
            spool.drop_staged(s, n)
        seen = watch.wait_for([f"{n}.json" for n in names], timeout=600)
    t_last = max(t for _, t in seen.values())
    quiesce(spool)
    cpu1 = daemon.cpu()
    timings: list[dict[str, float]] = []
    claimed, logged = _item_events(daemon, set(names))
    for n in names:
        d, _ = seen[f"{n}.json"]
        t = spool.result(d, n).get("timings", {})
        timings.append({**logged.get(n, {}), **t})
    for n in names:
        spool.consume(n)
    quiesce(spool)
    return {"total": t_last - t0, "timings": timings,
            "claimed": sorted(ts - wall0 for ts in claimed.values()),
            "cpu_self": cpu1[0] - cpu0[0], "cpu_children": cpu1[1] - cpu0[1]}


def bare_sequential(sources: Sequence[Path], fmt: str, outdir: Path, sync: bool) -> dict[str, float]:
    """Each source through bare ``qemu-img convert -O raw``, one after another."""
    outdir.mkdir(parents=True, exist_ok=True)
    outs = [outdir / f"out-{i:04d}.raw" for i in range(len(sources))]
    for o in outs:
        o.unlink(missing_ok=True)
    # Fresh private copies, as convd's drain gets (untimed).
    sources = [stage_private(src, outdir / f".source-{i:04d}") for i, src in enumerate(sources)]
    settle_fs(outdir)
    try:
        c0 = os.times()
        t0 = time.monotonic()
        for src, dst in zip(sources, outs):
            subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(src), str(dst)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
            if sync:
                _fsync(dst)
        total = time.monotonic() - t0
        c1 = os.times()
    finally:
        for o in [*outs, *sources]:
            o.unlink(missing_ok=True)
    return {"total": total, "cpu_children": (c1.children_user + c1.children_system)
            - (c0.children_user + c0.children_system)}


def pickup_latency(daemon: Daemon, src: Path, samples: int, log: Log) -> dict[str, list[float]]:
    """Tiny images one at a time, idle between: rename → claimed (log) and rename → record."""
    rng = random.Random(6)
    claimed: list[float] = []
    record: list[float] = []
    for i in range(samples):
        r = convd_once(daemon, src, f"latency-{i:04d}", timeout=60)
        record.append(r["e2e"])
        if r["claimed"] is not None:
            claimed.append(r["claimed"])
        # An idle daemon between drops, at an irregular rhythm.
        time.sleep(rng.uniform(0.05, 0.15))
        if (i + 1) % 25 == 0:
            log(f"  pick-up latency: {i + 1}/{samples}")
    return {"claimed": claimed, "record": record}


def backlog(root: Path, config: Path, files: int, size: int, log: Log) -> dict[str, Any]:
    """``files`` tiny raw images already in ``incoming/`` when convd starts; drain them all."""
    spool = Spool(root)
    spool.create()
    log(f"  writing {files} × {size // 1024} KiB raw files into incoming/")
    for i in range(files):
        part = spool.incoming / f".backlog-{i:05d}.part"
        tiny_raw(part, size, seed=1000 + i)
        os.rename(part, spool.incoming / f"backlog-{i:05d}")
    done: dict[str, float] = {}
    failed = 0
    rss: list[tuple[float, int]] = []
    watching_wall: float | None = None
    with DirWatch([spool.outgoing, spool.failed]) as watch:
        mono_to_wall = time.time() - time.monotonic()
        daemon = bench_daemon(config, spool, "backlog")
        try:
            next_sample = 0.0
            next_note = time.monotonic() + 10
            deadline = time.monotonic() + 3600
            while len(done) < files:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"backlog: {len(done)}/{files} after an hour")
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"convd exited {daemon.proc.returncode}:\n{daemon.tail()}")
                try:
                    events = watch.read(0.05)
                except QueueOverflow:
                    events = [(str(d), e.name, time.monotonic())
                              for d in (spool.outgoing, spool.failed) for e in os.scandir(d)]
                for d, name, t in events:
                    if name.endswith(".json") and name[:-5] not in done:
                        done[name[:-5]] = t
                        failed += d == str(spool.failed)
                now = time.monotonic()
                if now >= next_sample:
                    v = daemon.status("VmRSS")
                    if v:
                        rss.append((now - daemon.started, v))
                    next_sample = now + 0.25
                if watching_wall is None:
                    for ev in daemon.new_events():
                        if ev.get("event") == "watching":
                            watching_wall = parse_ts(ev["timestamp"])
                if now >= next_note:
                    log(f"  backlog: {len(done)}/{files} done")
                    next_note = now + 10
            hwm = daemon.status("VmHWM")
        finally:
            rc = daemon.stop(15.0, strict=False)
    if watching_wall is None:
        for ev in daemon.new_events():
            if ev.get("event") == "watching":
                watching_wall = parse_ts(ev["timestamp"])
    last_wall = max(done.values()) + mono_to_wall
    first_wall = min(done.values()) + mono_to_wall
    statuses: dict[str, int] = {}
    for d in (spool.outgoing, spool.failed):
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith(".json"):
                    st = json.loads(Path(e.path).read_text()).get("status", "?")
                    statuses[st] = statuses.get(st, 0) + 1
    return {
        "files": files,
        "size": size,
        "failed": failed,
        "statuses": statuses,
        "peak_rss": hwm,
        "rss_samples": rss,
        "startup": (watching_wall - daemon.started_wall) if watching_wall else None,
        "drain": (last_wall - watching_wall) if watching_wall else None,
        "first_to_last": last_wall - first_wall,
        "exit": rc,
    }


def rate_limited(root: Path, sources: Sequence[Path], data: int, cap: int, log: Log) -> dict[str, Any]:
    """``len(sources)`` qcow2 → raw conversions at once (max_workers as many) under
    ``[convert] rate_limit = cap``: the bytes they move together per second.

    ``data``: guest bytes each source holds (what qemu-img copies and ``-r``
    counts; holes are not copied).  Checksums off: the figure is the
    conversions'.  The rate is all the data over the time from the drop to
    the last record, so detection and publishing count against it.
    """
    if root.exists():
        shutil.rmtree(root)
    spool = Spool(root)
    spool.create()
    cfg = write_config(root, target="raw", algorithms=[], max_workers=len(sources),
                       convert={"rate_limit": cap})
    daemon = bench_daemon(cfg, spool, "rate_limit")
    try:
        daemon.wait_ready(timeout=30.0)
        res = drain(daemon, sources, "rate")
    finally:
        daemon.stop(15.0, strict=False)
    moved = data * len(sources)
    rate = moved / res["total"]
    log(f"rate_limit {cap / 2**20:.0f} MiB/s, {len(sources)} at once: {rate / 2**20:.1f} MiB/s in total")
    return {"cap": cap, "items": len(sources), "data": data, "total": res["total"], "rate": rate,
            "convert": [t.get("convert") for t in res["timings"]]}
