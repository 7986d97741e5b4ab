"""The Glance scenario: qcow2 images imported through a real glance-api, with the built-in
``image_conversion`` and with the ``convd`` plugin, end to end (stage → import → active).

Two glance-api servers (from ``make glance-venv``) on one filesystem, each with
its own database (on one private MariaDB, as the tests run it) and stores; the
convd one hands off to a daemon (``max_workers = 2``) whose spool shares that
filesystem, so the hand-off is a rename as the docs advise.  Two parts:

* one import at a time, ``reps`` per method;
* a burst: ``burst`` images staged, then imported at the same moment, as a
  cloud sees them; wall time until all are ``active``, the peak memory (PSS)
  of Glance's processes plus the converters (qemu-img under Glance, or the
  convd daemon and its children), and the peak bytes allocated in Glance's
  staging directory plus convd's spool.

Runs alternate (built-in first, then convd first) so drift on a shared
machine falls on both alike.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.daemon import bench_daemon, write_config
from convd_testing.daemon import Daemon, Spool
from convd_testing.glance_server import GlanceClient, GlanceServer, MariaDB, glance_venv_problem, mariadb_problem

REPO = Path(__file__).resolve().parent.parent

__all__ = ["run_glance"]

METHODS = ("image_conversion", "convd")


def _one(client: GlanceClient, src: Path, tag: str) -> dict[str, float]:
    t0 = time.monotonic()
    image_id = client.create(tag, "qcow2")
    client.stage(image_id, src)
    t1 = time.monotonic()
    client.import_(image_id)
    while True:
        tasks = client.tasks(image_id)
        if tasks and tasks[0]["status"] in ("success", "failure"):
            break
        time.sleep(0.05)
    t2 = time.monotonic()
    img = client.image(image_id)
    if tasks[0]["status"] != "success" or img["status"] != "active" or img["disk_format"] != "raw":
        raise RuntimeError(f"{tag}: import failed: {tasks[0]['message']} ({img['status']}, {img['disk_format']})")
    client.request("DELETE", f"/v2/images/{image_id}")  # frees the store for the next run
    return {"stage": t1 - t0, "import": t2 - t1, "total": t2 - t0}


def _tree(roots: list[int]) -> list[int]:
    """``roots`` and every process below them, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between their users), 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _allocated(directory: Path) -> int:
    """Bytes allocated (st_blocks) to the files under ``directory``."""
    total = 0
    for dirpath, _, filenames in os.walk(directory):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


class _Peaks(threading.Thread):
    """Samples memory of the process trees under ``roots`` and bytes under ``dirs``
    every 0.2 s; ``mem``/``disk`` hold the peaks."""

    def __init__(self, roots: list[int], dirs: list[Path]) -> None:
        super().__init__(daemon=True)
        self.roots, self.dirs = roots, dirs
        self.mem = self.disk = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.mem = max(self.mem, sum(_pss(p) for p in _tree(self.roots)))
            self.disk = max(self.disk, sum(_allocated(d) for d in self.dirs))
            self._stop_event.wait(0.2)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _burst(client: GlanceClient, server: GlanceServer, daemon: Daemon | None, spool: Path | None,
           src: Path, count: int, tag: str) -> dict[str, Any]:
    """``count`` images staged (untimed), then imported at the same moment; wall time until
    all are active, peak PSS of Glance plus converters, peak staging + spool bytes."""
    ids = [client.create(f"{tag}-{i}", "qcow2") for i in range(count)]
    for image_id in ids:
        client.stage(image_id, src)
    assert server.proc is not None
    peaks = _Peaks([server.proc.pid] + ([daemon.pid] if daemon else []),
                   [server.staging] + ([spool] if spool else []))
    peaks.mem = sum(_pss(p) for p in _tree(peaks.roots))
    idle_mem = peaks.mem
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def one(image_id: str) -> None:
        try:
            barrier.wait(60)
            client.import_(image_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in ids]
    for t in threads:
        t.start()
    peaks.start()
    barrier.wait(60)
    t0 = time.monotonic()
    for t in threads:
        t.join()
    if errors:
        peaks.stop()
        raise RuntimeError(f"{tag}: import request failed: {errors[0]}")
    active: dict[str, float] = {}
    failed: dict[str, str] = {}
    while len(active) + len(failed) < count:
        for image_id in ids:
            if image_id in active or image_id in failed:
                continue
            img = client.image(image_id)
            if img["status"] == "active":
                active[image_id] = time.monotonic() - t0
            elif img.get("os_glance_failed_import"):
                failed[image_id] = str(img.get("os_glance_failed_import"))
        time.sleep(0.2)
    wall = max(active.values(), default=float("nan"))
    for image_id in ids:  # the flows end after active (the staged file's removal): wait for them
        while client.image(image_id).get("os_glance_import_task"):
            time.sleep(0.2)
    peaks.stop()
    tasks = [t for i in ids for t in client.tasks(i)]
    if failed or any(t["status"] != "success" for t in tasks):
        raise RuntimeError(f"{tag}: imports failed: {failed} {[t['message'] for t in tasks]}")
    for image_id in ids:
        client.request("DELETE", f"/v2/images/{image_id}")
    return {"wall": wall, "active": sorted(active.values()), "peak_mem": peaks.mem, "idle_mem": idle_mem,
            "peak_bytes": peaks.disk}


def run_glance(src: Path, workdir: Path, reps: int, log: Callable[[str], None], *, burst: int = 8,
               burst_src: Path | None = None, burst_reps: int = 2) -> dict[str, Any]:
    """``reps`` imports of ``src`` per method, one at a time: seconds per phase, and
    the medians' ratio; then ``burst_reps`` bursts per method of ``burst`` imports of
    ``burst_src`` started at the same moment (alternating): wall time, peak memory
    and peak staging/spool bytes, and the ratios of the medians."""
    problem = glance_venv_problem() or mariadb_problem()
    if problem:
        raise SystemExit(f"Glance scenario: {problem}")
    root = workdir / "glance"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    spool = Spool(root / "spool")
    spool.create()
    # Glance hashes what it stores itself: the record's checksum would be a second read.
    daemon = bench_daemon(write_config(root / "spool", target="raw", algorithms=[], max_workers=2), spool, "glance")
    db = MariaDB(root / "mariadb")
    servers = {
        "image_conversion": GlanceServer(root / "builtin", plugins=["image_conversion"], db=db,
                                         import_conf={"image_conversion": {"output_format": "raw"}}),
        "convd": GlanceServer(root / "convd", plugins=["convd"], db=db,
                              import_conf={"convd": {"spool": root / "spool", "timeout": 3600}}),
    }
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    bursts: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    try:
        daemon.wait_ready(timeout=30.0)
        db.start()
        for s in servers.values():
            s.start()
        clients = {m: s.client() for m, s in servers.items()}
        for m in METHODS:  # warm-up: first imports load lazily imported code
            _one(clients[m], src, f"warmup-{m}")
        for rep in range(reps):
            order = METHODS if rep % 2 == 0 else METHODS[::-1]
            for m in order:
                r = _one(clients[m], src, f"{m}-{rep}")
                runs[m].append(r)
                log(f"glance {m} #{rep + 1}: stage {r['stage']:.1f} s, import→active {r['import']:.1f} s")
        for rep in range(burst_reps if burst_src is not None else 0):
            assert burst_src is not None
            order = METHODS if rep % 2 == 0 else METHODS[::-1]
            for m in order:
                b = _burst(clients[m], servers[m], daemon if m == "convd" else None,
                           spool.root if m == "convd" else None, burst_src, burst, f"burst-{m}-{rep}")
                bursts[m].append(b)
                log(f"glance burst {m} #{rep + 1}: {burst} imports at once, all active in {b['wall']:.1f} s, "
                    f"peak memory {b['peak_mem'] / 2**20:.0f} MiB, "
                    f"peak staging+spool {b['peak_bytes'] / 2**30:.2f} GiB")
    finally:
        for s in servers.values():
            s.stop()
        db.stop()
        daemon.stop(15.0, strict=False)
        shutil.rmtree(root, ignore_errors=True)
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("stage", "import", "total")}
           for m in METHODS}
    out: dict[str, Any] = {"runs": runs, "median": med,
                           "ratio_import": med["convd"]["import"] / med["image_conversion"]["import"],
                           "ratio_total": med["convd"]["total"] / med["image_conversion"]["total"]}
    if all(bursts.values()):
        bmed = {m: {k: statistics.median(b[k] for b in bursts[m]) for k in ("wall", "peak_mem", "peak_bytes")}
                for m in METHODS}
        assert burst_src is not None
        info = subprocess.run(["qemu-img", "info", "--output=json", str(burst_src)], capture_output=True,
                              text=True, check=True)
        out["burst"] = {"count": burst, "source": str(burst_src),
                        "virtual_size": json.loads(info.stdout)["virtual-size"],
                        "file_size": burst_src.stat().st_size, "runs": bursts, "median": bmed,
                        "ratio_wall": bmed["convd"]["wall"] / bmed["image_conversion"]["wall"]}
    return out
