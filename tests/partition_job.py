"""The job tests/test_partition.py runs inside the UML guest: node1 cut off NFS while it converts, alive.

Run with the host's venv python (the guest sees the host's files through
hostfs).  Two daemons on two NFSv4.2 clients; once node1 (its conversions
slowed by ``[convert] rate_limit``) holds claims, its link goes down for
``--partition`` seconds (its daemon is never signalled), then up again.
After everything dropped has a record, node2 stops and a second batch is
dropped for node1 alone: it must take it without a restart.  Writes its
observations as JSON to ``--out``; the host test judges.

    partition_job.py --mounts M1 M2 --images DIR --later DIR --workdir DIR --out FILE --partition S
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nfs_job import CONVD, config, events, records

WATCHED = ("claimed", "adopted an item of a stopped instance", "took over the items of stopped instances",
           "starting", "watching", "converted")


def drop(src: Path, incoming: Path) -> float:
    tmp = incoming / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.rename(tmp, incoming / src.name)
    return time.time()


def wait_records(root: Path, names: set[str], timeout: float) -> bool:
    # A listing, as consumers on NFS must: stat() may see new names 30 s late.
    deadline = time.monotonic() + timeout
    while not records(root) >= names:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mounts", nargs=2, type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True, help="dropped before the cut")
    ap.add_argument("--later", type=Path, required=True, help="dropped for node1 alone after the link is back")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--partition", type=float, required=True, help="seconds node1's link stays down")
    args = ap.parse_args()
    roots = [m / "spool" for m in args.mounts]
    for d in ("incoming", "work", "outgoing", "failed"):
        (roots[0] / d).mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i, root in enumerate(roots, start=1):
        cfg = config(args.workdir / f"node{i}.toml", root, f"node{i}", 1.0)
        if i == 1:  # node1 converts slowly, so the cut finds it mid-conversion
            cfg.write_text(cfg.read_text().replace("[convert]\n", "[convert]\nrate_limit = \"1MiB\"\n"))
        log = args.workdir / f"node{i}.log"
        logs.append(log)
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen([CONVD, "run", "-c", str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    result: dict = {"dropped": {}, "partition": args.partition}
    try:
        deadline = time.monotonic() + 60
        while not all(any(e.get("event") == "watching" for e in events(log)) for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("daemons did not start: " + " / ".join(log.read_text()[-1500:] for log in logs))
            time.sleep(0.1)
        first = sorted(args.images.iterdir())

        def drop_first() -> None:
            for src in first:
                result["dropped"][src.name] = drop(src, roots[1] / "incoming")  # node2's link stays up

        # node1 is watched while the producer drops, and cut at once, not after the
        # drops: it could finish what it holds meanwhile and find nothing left.
        dropping = threading.Thread(target=drop_first, daemon=True)
        dropping.start()
        vdir = roots[0] / "work" / "node1"
        deadline = time.monotonic() + 60
        while not (seen := [n for n in os.listdir(vdir) if not n.startswith(".")]):
            if time.monotonic() > deadline:
                raise RuntimeError("node1 claimed nothing")
            time.sleep(0.02)
        subprocess.run(["ip", "-n", "node1", "link", "set", "n1", "down"], check=True)
        cut = time.time()
        # What node1 held at the cut, as the server has it (node1's own mount hangs now).
        # With what node1 itself listed just before: node2's client may show the directory as
        # it cached it a moment ago, without the claim just made (a CI run saw none so).
        held = sorted(set(seen) | {n for n in os.listdir(roots[1] / "work" / "node1") if not n.startswith(".")})
        time.sleep(args.partition)
        during = sorted(n for n in os.listdir(roots[1] / "work" / "node1") if not n.startswith("."))
        subprocess.run(["ip", "-n", "node1", "link", "set", "n1", "up"], check=True)
        result["cut"] = {"at": cut, "restored_at": time.time(), "held": held, "held_at_restore": during,
                         "node1_alive": procs[0].poll() is None}
        dropping.join(timeout=120)
        if dropping.is_alive():
            raise RuntimeError("the producer's drops did not finish")
        names = {src.name for src in first}
        result["first_batch_done"] = wait_records(roots[1], names, 150)
        result["first_batch_done_at"] = time.time()
        # node2 leaves; what is dropped now only node1 can take, and it never restarted.
        procs[1].send_signal(signal.SIGTERM)
        procs[1].wait(timeout=60)
        later = sorted(args.later.iterdir())
        for src in later:
            result["dropped"][src.name] = drop(src, roots[0] / "incoming")
        result["later_done"] = wait_records(roots[1], {s.name for s in later}, 120)
        result["node1_alive_at_end"] = procs[0].poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    root = roots[1]
    result["records"] = {}
    sources = {p.name: p for d in (args.images, args.later) for p in d.iterdir()}
    for name in sorted(records(root)):
        d = "outgoing" if (root / "outgoing" / f"{name}.json").exists() else "failed"
        rec = json.loads((root / d / f"{name}.json").read_bytes())
        same = None
        if d == "outgoing" and name in sources:
            same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(sources[name]),
                                   str(root / "outgoing" / name)], capture_output=True).returncode == 0
        result["records"][name] = {"dir": d, "status": rec.get("status"), "identical": same,
                                   "error": rec.get("error")}
    result["outgoing"] = sorted(os.listdir(root / "outgoing"))
    result["failed"] = sorted(os.listdir(root / "failed"))
    result["events"] = [[f"node{i}", e.get("event"), e.get("item"), e.get("timestamp"), e.get("filesystem"),
                         e.get("polling"), e.get("level")]
                        for i, log in enumerate(logs, start=1) for e in events(log)
                        if e.get("event") in WATCHED or e.get("level") in ("warning", "error", "critical")]
    result["leftovers"] = {"incoming": sorted(os.listdir(root / "incoming"))}
    result["work"] = {i: sorted(n for n in os.listdir(root / "work" / i) if not n.startswith("."))
                      for i in os.listdir(root / "work") if (root / "work" / i).is_dir() and not i.startswith(".")}
    result["exit_codes"] = [p.returncode for p in procs]
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
