"""``python -m bench --shared``: 1, 2 and 3 daemons on one CephFS spool, and the take-over time.

A one-node Ceph cluster on loopback (convd_testing/sharedfs.py) with one ceph-fuse
client per daemon, as separate API nodes would mount it, and one more for
the producer and consumer.  Each run stages
``--shared-count`` qcow2 images beside the spool, renames them all into
``incoming/`` (time zero) and waits until a listing of ``outgoing/`` shows
every record.  The take-over run kills one of three daemons with SIGKILL
while it holds claims and times how long until the survivors have published
all of them (no restart).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.daemon import bench_daemon, parse_ts, write_config
from bench.machine import describe
from convd_testing.daemon import Daemon, Spool

__all__ = ["SHARED_BEGIN", "SHARED_END", "run_shared", "shared_block", "splice"]

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TAKEOVER_INTERVAL = 10.0  # the default [spool] takeover_interval


# docs/benchmarks.md keeps the --shared section between these markers; a
# plain `make bench` rewrites the rest of the page and carries the block over.
SHARED_BEGIN = "<!-- bench --shared: begin -->"
SHARED_END = "<!-- bench --shared: end -->"


def shared_block(page: str) -> str:
    """The --shared section of a benchmarks page, markers included ("" if none)."""
    a, b = page.find(SHARED_BEGIN), page.find(SHARED_END)
    return page[a:b + len(SHARED_END)] + "\n" if a >= 0 and b > a else ""


def splice(path: Path, text: str) -> None:
    """Put ``text`` as the --shared section of ``path`` (replacing the old one, else appended)."""
    block = f"{SHARED_BEGIN}\n{text.rstrip()}\n{SHARED_END}\n"
    page = path.read_text() if path.exists() else ""
    old = shared_block(page)
    page = page.replace(old, block) if old else page.rstrip() + "\n\n" + block
    path.write_text(page)


def _log(msg: str) -> None:
    print(f"[bench --shared] {msg}", file=sys.stderr, flush=True)


def _make_images(d: Path, count: int, size: int) -> list[Path]:
    """qcow2 images with half their clusters written (distinct patterns), made by qemu-io."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        p = d / f"img{i:03d}.qcow2"
        if not p.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), str(size)], check=True)
            cmds = []
            for off in range(0, size, 2 * MiB):
                cmds += ["-c", f"write -P {(i + off // MiB) % 251 + 1} {off} {MiB}"]
            subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(p)], check=True, capture_output=True)
        out.append(p)
    return out


def _records(spool: Spool) -> set[str]:
    # A listing, not stat() polling: the way consumers on a shared filesystem must look.
    return {n[:-5] for n in os.listdir(spool.outgoing) if n.endswith(".json") and not n.startswith(".")}


def _start(cluster: Any, root: Path, n: int, conf: Path) -> list[Daemon]:
    shutil.rmtree(conf, ignore_errors=True)  # bench.daemon appends to daemon.log
    daemons = []
    for k in range(n):
        node_root = cluster.mounts[k] / root.relative_to(cluster.mounts[0])
        cfg_dir = conf / f"node{k + 1}"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        cfg = write_config(cfg_dir, target="raw", algorithms=["sha256"],
                           spool={"root": str(node_root), "instance": f"node{k + 1}"},
                           limits={"workspace": "2GiB", "min_free": "256MiB"},
                           watch={"settle": 2.0, "rescan_interval": "10s"})
        d = bench_daemon(cfg, Spool(node_root), f"node{k + 1}")
        d.wait_ready(timeout=60)
        daemons.append(d)
    return daemons


def _producer(cluster: Any, root: Path) -> Spool:
    """The spool as Glance on another API node sees it: through a client of its own
    (the last mount), so every daemon reads what it writes across clients."""
    spool = Spool(cluster.mounts[-1] / root.relative_to(cluster.mounts[0]))
    spool.create()
    return spool


def _drop(spool: Spool, imgs: list[Path]) -> tuple[list[str], float]:
    names = []
    staged = []
    for i, src in enumerate(imgs):
        name = f"s{i:03d}"
        staged.append((spool.stage_copy(src, name), name))
        names.append(name)
    t0 = time.monotonic()
    for path, name in staged:
        spool.drop_staged(path, name)
    return names, t0


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _throughput(cluster: Any, imgs: list[Path], size: int, n: int, work: Path) -> dict[str, Any]:
    root = cluster.mounts[0] / f"spool-{n}"
    shutil.rmtree(root, ignore_errors=True)
    spool = _producer(cluster, root)
    daemons = _start(cluster, root, n, work / f"conf-{n}")
    try:
        names, t0 = _drop(spool, imgs)
        _wait(lambda: _records(spool) >= set(names), 1800, f"{len(names)} records with {n} daemon(s)")
        elapsed = time.monotonic() - t0
    finally:
        rcs = [d.stop(15.0, strict=False) for d in daemons]
    failed = os.listdir(spool.failed)
    per_daemon = {d.label: sum(1 for line in d.log_path.read_text().splitlines() if '"event": "claimed"' in line)
                  for d in daemons}
    shutil.rmtree(root, ignore_errors=True)  # memstore keeps it all in RAM
    return {"daemons": n, "images": len(names), "seconds": round(elapsed, 1),
            "images_per_s": round(len(names) / elapsed, 2),
            "virtual_mib_per_s": round(len(names) * size / MiB / elapsed, 1),
            "claims_per_daemon": per_daemon, "failed": len(failed), "exit_codes": rcs}


def _takeover(cluster: Any, imgs: list[Path], work: Path) -> dict[str, Any]:
    root = cluster.mounts[0] / "spool-kill"
    shutil.rmtree(root, ignore_errors=True)
    spool = _producer(cluster, root)
    daemons = _start(cluster, root, 3, work / "conf-kill")
    victim = daemons[0]
    try:
        names, _t0 = _drop(spool, imgs)
        vdir = root / "work" / victim.label

        def held() -> list[str]:
            return sorted(n for n in os.listdir(vdir) if not n.startswith("."))

        _wait(lambda: len(held()) >= 2, 600, "the victim to hold two claims")
        os.killpg(victim.pid, signal.SIGKILL)
        killed_wall, killed = time.time(), time.monotonic()
        victim.proc.wait()
        orphans = held()
        _wait(lambda: _records(spool) >= set(orphans), 600, "the killed daemon's claims to be published")
        done = time.monotonic() - killed
        first_adopt = None
        for d in daemons[1:]:
            for line in d.log_path.read_text().splitlines():
                if "adopted an item of a stopped instance" in line:
                    t = parse_ts(json.loads(line)["timestamp"]) - killed_wall
                    first_adopt = t if first_adopt is None else min(first_adopt, t)
        _wait(lambda: _records(spool) >= set(names), 1800, "all records after the kill")
    finally:
        for d in daemons:
            d.stop(15.0, strict=False)
    shutil.rmtree(root, ignore_errors=True)
    return {"orphans": len(orphans), "first_adoption_s": None if first_adopt is None else round(first_adopt, 1),
            "all_orphans_published_s": round(done, 1), "takeover_interval": TAKEOVER_INTERVAL}


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "## Several daemons on one CephFS spool (`make bench-shared`)",
        "",
        f"Measured {res['started_at']} with `{res['command']}` on {m.get('CPU', '?')}, "
        f"{m.get('cores', '?')}, {m.get('memory', '?')}, {m.get('qemu-img', '?')}, convd {m.get('convd', '?')}; "
        f"load average {res['load'][0]:.2f} at the start and {res['load'][1]:.2f} at the end. "
        "**One run on a shared, noisy machine**: other test suites ran at "
        "the same time, so treat the figures as rough.",
        "",
        f"CephFS: a one-node Ceph {res['ceph']} cluster on loopback (mon, mgr, one memstore OSD, one MDS), "
        "one `ceph-fuse` client per daemon and one more for the producer and consumer (Glance on another "
        "node), so every daemon reads and publishes across clients. Each daemon: `max_workers = 2`, "
        "sha256 checksums. "
        f"{res['count']} qcow2 images of {res['size'] // MiB} MiB virtual (half written) → raw."
        + (f" Ceph options: client {res['client_options']}, mds {res['mds_options']}."
           if res.get("client_options") or res.get("mds_options") else ""),
        "",
        "| daemons | images | wall s | images/s | virtual MiB/s | claims per daemon | failed |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in res["runs"]:
        per = ", ".join(f"{k} {v}" for k, v in r["claims_per_daemon"].items())
        lines.append(f"| {r['daemons']} | {r['images']} | {r['seconds']} | {r['images_per_s']} | "
                     f"{r['virtual_mib_per_s']} | {per} | {r['failed']} |")
    t = res["takeover"]
    lines += [
        "",
        f"Take-over: 3 daemons, one killed with SIGKILL while it held {t['orphans']} claims; nobody restarted. "
        f"First adoption {t['first_adoption_s']} s after the kill (bound: lock expiry, immediate when only the "
        f"process dies, + `takeover_interval` = {t['takeover_interval']:.0f} s); all its claims published "
        f"{t['all_orphans_published_s']} s after the kill.",
    ]
    return "\n".join(lines) + "\n"


def run_shared(count: int, size: int, workdir: Path, out: Path | None) -> int:
    from convd_testing.sharedfs import CephCluster, ceph_missing  # the test suite's cluster, not a second copy

    why = ceph_missing()
    if why:
        _log(f"cannot run: {why}")
        return 1
    # A SIGTERM (or SIGINT, even when ignored by a background shell) still tears the cluster down.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    workdir.mkdir(parents=True, exist_ok=True)
    imgs = _make_images(workdir / "shared-images", count, size)
    res: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": "python -m bench --shared", "count": count, "size": size,
                           "machine": describe(workdir, REPO), "load": [os.getloadavg()[0]]}
    res["ceph"] = subprocess.run(["ceph", "--version"], capture_output=True, text=True).stdout.split()[2]
    base = workdir / "ceph"
    shutil.rmtree(base, ignore_errors=True)
    # Tuning experiments: BENCH_CEPH_CLIENT / BENCH_CEPH_MDS = "option=value,option=value".
    opts, mds = ({k.strip(): v.strip()
                  for k, _, v in (o.partition("=") for o in os.environ.get(var, "").split(",")) if v}
                 for var in ("BENCH_CEPH_CLIENT", "BENCH_CEPH_MDS"))
    res["client_options"], res["mds_options"] = opts, mds
    cluster = CephCluster(base, clients=4, memstore_bytes=10 << 30, client_options=opts, mds_options=mds)
    _log("starting the Ceph cluster")
    cluster.start()
    try:
        res["runs"] = []
        for n in (1, 2, 3):
            _log(f"{count} images with {n} daemon(s)")
            res["runs"].append(_throughput(cluster, imgs, size, n, workdir))
            _log(json.dumps(res["runs"][-1]))
        _log("take-over after kill -9")
        res["takeover"] = _takeover(cluster, imgs, workdir)
        _log(json.dumps(res["takeover"]))
    finally:
        cluster.stop()
    res["load"].append(os.getloadavg()[0])
    (workdir / "shared-results.json").write_text(json.dumps(res, indent=2))
    text = render(res)
    print(text)
    if out is not None:
        splice(out, text)
    return 0
