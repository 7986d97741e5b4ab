"""``python -m bench --rbd``: a qcow2 into a Ceph RBD pool, convd against converting and importing by hand.

A one-node Ceph cluster on loopback (convd_testing/sharedfs.py, no file system: mon,
mgr, one memstore OSD) with an ``images`` pool.  Alternating, ``--reps``
times each, every method on a freshly staged private copy of the same
``--size``-virtual qcow2 (bench.images' layout: 40 % random data, 15 %
written zeros, the rest holes):

- **convd**: ``[publish] to = "rbd"`` with the default sha256 checksum (read
  back from RBD: the data extents, holes hashed as zeros) and snapshot; from the rename into ``incoming/`` until
  ``outgoing/NAME.json`` exists (the image renamed into place, protected
  snapshot, record durable);
- **by hand**: ``qemu-img convert -f qcow2 -O raw -t none -W`` to a file,
  ``sync``, then ``rbd import`` of that file (which skips zero blocks), as
  an operator does today; no checksum, no snapshot.

Each image is removed from the pool (untimed) before the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import images
from bench.daemon import bench_daemon, write_config
from bench.machine import describe
from convd_testing.daemon import Daemon, Spool, stage_private

__all__ = ["RBD_BEGIN", "RBD_END", "rbd_block", "report_rbd", "run_rbd"]

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
POOL = "images"
TARGET = 0.70

# docs/benchmarks.md keeps this section between these markers; a plain
# `make bench` rewrites the rest of the page and carries the block over.
RBD_BEGIN = "<!-- bench --rbd: begin -->"
RBD_END = "<!-- bench --rbd: end -->"


def rbd_block(page: str) -> str:
    """The --rbd section of a benchmarks page, markers included ("" if none)."""
    a, b = page.find(RBD_BEGIN), page.find(RBD_END)
    return page[a:b + len(RBD_END)] + "\n" if a >= 0 and b > a else ""


def _splice(path: Path, text: str) -> None:
    block = f"{RBD_BEGIN}\n{text.rstrip()}\n{RBD_END}\n"
    page = path.read_text() if path.exists() else ""
    old = rbd_block(page)
    page = page.replace(old, block) if old else page.rstrip() + "\n\n" + block
    path.write_text(page)


def _log(msg: str) -> None:
    print(f"[bench --rbd] {msg}", file=sys.stderr, flush=True)


def _rbd(conf: Path, *args: str) -> str:
    return subprocess.run(["rbd", "--conf", str(conf), "--id", "admin", *args], check=True,
                          capture_output=True, text=True).stdout


def _remove(conf: Path, name: str) -> None:
    snaps = json.loads(_rbd(conf, "snap", "ls", "--format", "json", f"{POOL}/{name}") or "[]")
    for s in snaps:
        if s.get("protected") == "true":
            _rbd(conf, "snap", "unprotect", f"{POOL}/{name}@{s['name']}")
    if snaps:
        _rbd(conf, "snap", "purge", "--no-progress", f"{POOL}/{name}")
    _rbd(conf, "rm", "--no-progress", f"{POOL}/{name}")


def _used(conf: Path, name: str) -> int:
    du = json.loads(_rbd(conf, "du", "--format", "json", f"{POOL}/{name}"))
    # The head and its snapshot (convd's protected one holds the data, the head then shows none).
    return sum(int(i["used_size"]) for i in du["images"] if i.get("name") == name)


def _by_hand(src: Path, work: Path, conf: Path, name: str) -> dict[str, float]:
    raw = work / f"{name}.raw"
    staged = stage_private(src, work / f".source-{name}")
    subprocess.run(["sync", "-f", str(work)], check=False)
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-t", "none", "-W", str(staged), str(raw)],
                   check=True)
    subprocess.run(["sync", "-f", str(raw)], check=True)
    t1 = time.monotonic()
    _rbd(conf, "import", "--no-progress", str(raw), f"{POOL}/{name}")
    t2 = time.monotonic()
    # Not in the total (the baseline has none): what a checksum of the raw file, as convd's
    # record gives, would add by hand.  OpenSSL's sha256, as convd's hashlib uses (coreutils'
    # sha256sum has no SHA extensions here: about 6 times slower).
    subprocess.run(["openssl", "sha256", str(raw)], check=True, capture_output=True)
    t3 = time.monotonic()
    staged.unlink()
    raw.unlink()
    return {"total": t2 - t0, "convert": t1 - t0, "import": t2 - t1, "sha256": t3 - t2}


def _convd(d: Daemon, spool: Spool, src: Path, name: str) -> dict[str, float]:
    staged = spool.stage_copy(src, name)
    subprocess.run(["sync", "-f", str(spool.root)], check=False)
    t0 = time.monotonic()
    spool.drop_staged(staged, name)
    rec_path = spool.outgoing / f"{name}.json"
    deadline = t0 + 1800
    while not rec_path.exists():
        if (spool.failed / f"{name}.json").exists():
            raise RuntimeError(f"convd rejected {name}: {(spool.failed / f'{name}.json').read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no record for {name}: {d.tail()}")
        time.sleep(0.02)
    total = time.monotonic() - t0
    rec = json.loads(rec_path.read_text())
    spool.consume(name)
    t = rec["timings"]
    time.sleep(0.2)  # the last "stage done" (publish's) is logged just after the record
    # Each stage's wall time from the daemon's debug log ("stage done"), e.g. stage_unpack.
    stages = {f"stage_{e['stage']}": float(e["duration"]) for e in d.new_events()
              if e.get("event") == "stage done" and e.get("item") == name and "stage" in e}
    # Every stage's own time (the record's timings) and what lies outside them: from the drop until the
    # item is claimed, and from the record's making until the bench sees outgoing/NAME.json.
    return {"total": total, **{k: float(v) for k, v in t.items() if k != "total"}, "item": t.get("total", 0.0),
            "outside": total - t.get("total", 0.0), **stages}


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    med = {k: statistics.median(r["total"] for r in v) for k, v in res["runs"].items()}
    ratio = med["convd"] / med["by hand"]
    lines = [
        "## Straight into Ceph RBD (`python -m bench --rbd`)",
        "",
        f"Measured {res['started_at']} on {m.get('CPU', '?')}, {m.get('cores', '?')}, {m.get('memory', '?')}, "
        f"{m.get('qemu-img', '?')}, Ceph {res['ceph']}, convd {m.get('convd', '?')}; load average "
        f"{res['load'][0]:.2f} at the start and {res['load'][1]:.2f} at the end (a shared machine: other "
        "suites ran meanwhile). A one-node cluster on loopback (one memstore OSD), pool `images`.",
        "",
        f"One qcow2 of {res['size'] / 2**30:g} GiB virtual ({res['layout']}), {res['reps']} runs of each "
        "method, alternating, each on a freshly staged copy. **convd**: `[publish] to = \"rbd\"`, sha256 "
        "of the whole image read back from RBD (`rbd export-diff`: the data extents read, the holes hashed as "
        "zeros), protected snapshot, from the rename into `incoming/` to `outgoing/NAME.json`. "
        "**By hand**: `qemu-img convert -O raw -t none -W` to a file + `sync`, then `rbd import`.",
        "",
        "Reproduce: `python -m bench --rbd` (as root, with `make sharedfs-deps`; `make bench` runs it after "
        "the main run; a few minutes). `--size` and `--reps` apply. It rewrites only this section of the page.",
        "",
        "| method | median s | runs s | pool bytes used |",
        "|---|---:|---|---:|",
    ]
    for k, v in res["runs"].items():
        runs = ", ".join(f"{r['total']:.2f}" for r in v)
        lines.append(f"| {k} | {med[k]:.2f} | {runs} | {res['used'][k] / MiB:.0f} MiB |")
    hashes = ", ".join(f"{r['hash']:.2f}" for r in res["runs"]["convd"])
    imports = ", ".join(f"{r['import']:.2f}" for r in res["runs"]["by hand"])
    summed = statistics.median(r["total"] + r.get("sha256", 0.0) for r in res["runs"]["by hand"])
    stages = ("rbd_space", "convert", "hash", "rbd_calls", "publish", "item", "outside")
    stage_med = {k: statistics.median(r.get(k, 0.0) for r in res["runs"]["convd"]) for k in stages}
    lines += [
        "",
        f"convd / by hand: **{ratio:.2f}** (target ≤ {TARGET:.2f}: {'met' if ratio <= TARGET else 'missed'}). "
        f"convd's read-back and sha256 took {hashes} s of its runs; the by-hand import's "
        f"share: {imports} s.",
        "",
        "Where convd's time goes (medians, s, from the records' `timings`): the pool's space and the "
        f"map {stage_med['rbd_space']:.2f}, `qemu-img convert` into RBD {stage_med['convert']:.2f}, the "
        f"read-back with sha256 {stage_med['hash']:.2f}, with the snapshot and lookups beside it "
        f"{stage_med['rbd_calls']:.2f}, publish in all {stage_med['publish']:.2f}; the item "
        f"{stage_med['item']:.2f}, outside it (pick-up, claim, the record's last write) "
        f"{stage_med['outside']:.2f}.  By hand with `openssl sha256` of the raw file (the checksum convd's "
        f"record gives) added: {summed:.2f} s, ratio {med['convd'] / summed:.2f}.",
    ]
    walls = [k for k in res["runs"]["convd"][0] if k.startswith("stage_")]
    if walls:
        per = ", ".join(f"{k[6:]} {statistics.median(r.get(k, 0.0) for r in res['runs']['convd']):.2f}"
                        for k in walls)
        lines += ["", f"convd's stages, wall time from its debug log (medians, s): {per}."]
    return "\n".join(lines) + "\n"


def report_rbd(res: dict[str, Any], out: Path | None) -> int:
    """Render a saved ``rbd-results.json`` to stdout and (its section only) ``out``."""
    text = render(res)
    print(text)
    if out is not None:
        _splice(out, text)
    return 0


def run_rbd(size: int, reps: int, workdir: Path, out: Path | None) -> int:
    from convd_testing.sharedfs import CephCluster, ceph_missing  # the test suite's cluster, not a second copy

    why = ceph_missing()
    if why:
        _log(f"cannot run: {why}")
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    workdir.mkdir(parents=True, exist_ok=True)
    imgset = images.build_set(workdir / "rbd-images", size, ("qcow2",), progress=_log)
    src = imgset.files["qcow2"]
    res: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size": size,
                           "reps": reps, "layout": imgset.describe(), "machine": describe(workdir, REPO),
                           "load": [os.getloadavg()[0]]}
    res["ceph"] = subprocess.run(["ceph", "--version"], capture_output=True, text=True).stdout.split()[2]
    base = workdir / "rbd-ceph"
    shutil.rmtree(base, ignore_errors=True)
    cluster = CephCluster(base, clients=0, memstore_bytes=max(4 << 30, 2 * size))
    _log("starting the Ceph cluster")
    cluster.start()
    d = None
    try:
        cluster.rbd_pool(POOL)
        conf = cluster.conf
        root = workdir / "rbd-spool"
        shutil.rmtree(root, ignore_errors=True)
        # Debug log: each stage's "stage done" duration goes into the results.
        sections: dict[str, dict[str, Any]] = {
            "publish": {"to": "rbd"}, "log": {"format": "json", "level": "debug"},
            "publish.rbd": {"pool": POOL, "ceph_conf": str(conf), "user": "admin"}}
        cfg = write_config(root, target="raw", algorithms=["sha256"], max_workers=2, **sections)
        spool = Spool(root)
        d = bench_daemon(cfg, spool, "rbd")
        d.wait_ready(timeout=60)
        hand = workdir / "rbd-hand"
        hand.mkdir(parents=True, exist_ok=True)
        res["runs"] = {"convd": [], "by hand": []}
        res["used"] = {}
        # A warm-up of each, untimed: the first run pays for loading code and the OSD's first objects.
        _convd(d, spool, src, "warm-convd")
        d.new_events()
        _remove(conf, "warm-convd")
        _by_hand(src, hand, conf, "warm-hand")
        _remove(conf, "warm-hand")
        for i in range(reps):
            for method in (("convd", "by hand") if i % 2 == 0 else ("by hand", "convd")):
                name = f"{'c' if method == 'convd' else 'h'}{i}"
                r = _convd(d, spool, src, name) if method == "convd" else _by_hand(src, hand, conf, name)
                res["used"][method] = _used(conf, name)
                _remove(conf, name)
                res["runs"][method].append(r)
                _log(f"{method} run {i + 1}: {r['total']:.2f} s")
    finally:
        if d is not None:
            d.stop(15.0, strict=False)
        cluster.stop()
        imgset.remove()
    res["load"].append(os.getloadavg()[0])
    (workdir / "rbd-results.json").write_text(json.dumps(res, indent=2))
    return report_rbd(res, out)
