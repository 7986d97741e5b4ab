"""The Glance scenario: one qcow2 imported through a real glance-api, with the built-in
``image_conversion`` and with the ``convd`` plugin, end to end (stage → import → active).

Two glance-api servers (from ``make glance-venv``) on one filesystem, each with
its own database and stores; the convd one hands off to a daemon whose spool
shares that filesystem, so the hand-off is a rename as the docs advise.  Runs
alternate (built-in first, then convd first) so drift on a shared machine
falls on both alike.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.daemon import Daemon, Spool, write_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from glance_server import GlanceClient, GlanceServer, glance_venv_problem  # noqa: E402

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


def run_glance(src: Path, workdir: Path, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``reps`` imports of ``src`` per method; seconds per phase, and the medians' ratio."""
    problem = glance_venv_problem()
    if problem:
        raise SystemExit(f"Glance scenario: {problem}")
    root = workdir / "glance"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    spool = Spool(root / "spool")
    spool.create()
    # Glance hashes what it stores itself: the record's checksum would be a second read.
    daemon = Daemon(write_config(root / "spool", target="raw", algorithms=[]), spool, "glance")
    servers = {
        "image_conversion": GlanceServer(root / "builtin", plugins=["image_conversion"],
                                         import_conf={"image_conversion": {"output_format": "raw"}}),
        "convd": GlanceServer(root / "convd", plugins=["convd"],
                              import_conf={"convd": {"spool": root / "spool", "timeout": 3600}}),
    }
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    try:
        daemon.wait_ready()
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
    finally:
        for s in servers.values():
            s.stop()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("stage", "import", "total")}
           for m in METHODS}
    return {"runs": runs, "median": med,
            "ratio_import": med["convd"]["import"] / med["image_conversion"]["import"],
            "ratio_total": med["convd"]["total"] / med["image_conversion"]["total"]}
