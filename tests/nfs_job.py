"""The job tests/test_sharedfs_nfs.py runs inside the UML guest: two daemons on two NFSv4.2 clients.

Run with the host's venv python (the guest sees the host's files through
hostfs).  Writes its observations as JSON to ``--out``; the host test judges.

    nfs_job.py --mounts M1 M2 --images DIR --workdir DIR --out FILE [--kill]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CONVD = str(Path(sys.executable).with_name("convd"))


def config(path: Path, root: Path, instance: str, settle: float) -> Path:
    path.write_text(f"""[spool]
root = "{root}"
instance = "{instance}"
takeover_interval = 2
[watch]
settle = {settle}
rescan_interval = 5
[convert]
max_workers = 2
retry_backoff = 0.2
[limits]
workspace = "1GiB"
min_free = "64MiB"
[checksum]
algorithms = []
[log]
format = "json"
level = "info"
[metrics]
listen = ""
""")
    return path


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def records(root: Path) -> set[str]:
    return {n[:-5] for d in ("outgoing", "failed") for n in os.listdir(root / d)
            if n.endswith(".json") and not n.startswith(".")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mounts", nargs=2, type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--kill", action="store_true", help="kill -9 node1's daemon while it holds claims")
    ap.add_argument("--cut", action="store_true",
                    help="with --kill: first cut node1 off the network "
                         "(its node dies; the server's lease on its lock must expire)")
    args = ap.parse_args()
    roots = [m / "spool" for m in args.mounts]
    for d in ("incoming", "work", "outgoing", "failed"):
        (roots[0] / d).mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i, root in enumerate(roots, start=1):
        cfg = config(args.workdir / f"node{i}.toml", root, f"node{i}", args.settle)
        log = args.workdir / f"node{i}.log"
        logs.append(log)
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen([CONVD, "run", "-c", str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    result: dict = {"dropped": {}, "killed": None}
    try:
        deadline = time.monotonic() + 60
        while not all(any(e.get("event") == "watching" for e in events(log)) for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("daemons did not start: " + " / ".join(log.read_text()[-1500:] for log in logs))
            time.sleep(0.1)
        images = sorted(args.images.iterdir())
        for k, src in enumerate(images):
            incoming = roots[k % 2] / "incoming"
            tmp = incoming / f".{src.name}.part"
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.rename(tmp, incoming / src.name)
            result["dropped"][src.name] = time.time()
        names = {src.name for src in images}
        if args.kill:
            vdir = roots[0] / "work" / "node1"
            deadline = time.monotonic() + 60
            while not [n for n in os.listdir(vdir) if not n.startswith(".")]:
                if time.monotonic() > deadline:
                    raise RuntimeError("node1 claimed nothing")
                time.sleep(0.02)
            if args.cut:
                # The node dies: its link goes down first, so its NFS client can
                # neither release the lock nor finish anything; the killed
                # daemon hangs in D state until the link comes back.
                subprocess.run(["ip", "-n", "node1", "link", "set", "n1", "down"], check=True)
            os.killpg(procs[0].pid, signal.SIGKILL)
            killed_at = time.time()
            # What node1 held at its death, as the server has it (through
            # node2's mount): node1 may claim more between any earlier look
            # and the kill, and after a cut its own mount hangs.
            held = sorted(n for n in os.listdir(roots[1] / "work" / "node1") if not n.startswith("."))
            result["killed"] = {"at": killed_at, "held": held, "cut": args.cut}
            if args.cut:
                names_left = set(held)
                deadline = time.monotonic() + 120
                while not records(roots[1]) >= names_left and time.monotonic() < deadline:
                    time.sleep(0.2)
                result["killed"]["published_after"] = round(time.time() - result["killed"]["at"], 1)
                subprocess.run(["ip", "-n", "node1", "link", "set", "n1", "up"], check=True)
            procs[0].wait()
        deadline = time.monotonic() + 150
        # A listing, as consumers on NFS must: stat() may see new names 30 s late.
        while not records(roots[1]) >= names and time.monotonic() < deadline:
            time.sleep(0.2)
        result["waited_s"] = round(150 - (deadline - time.monotonic()), 1)
        st = subprocess.run([CONVD, "status", "-c", str(args.workdir / "node2.toml"), "--json"],
                            capture_output=True, text=True)
        result["status"] = json.loads(st.stdout) if st.returncode == 0 else st.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    root = roots[1]
    result["records"] = {}
    for name in sorted(records(root)):
        d = "outgoing" if (root / "outgoing" / f"{name}.json").exists() else "failed"
        rec = json.loads((root / d / f"{name}.json").read_bytes())
        same = None
        if d == "outgoing":
            same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(args.images / name),
                                   str(root / "outgoing" / name)], capture_output=True).returncode == 0
        result["records"][name] = {"dir": d, "status": rec.get("status"), "identical": same,
                                   "error": rec.get("error")}
    result["events"] = [[f"node{i}", e.get("event"), e.get("item"), e.get("timestamp"), e.get("filesystem"),
                         e.get("polling")]
                        for i, log in enumerate(logs, start=1) for e in events(log)
                        if e.get("event") in ("claimed", "adopted an item of a stopped instance", "starting",
                                              "watching", "took over the items of stopped instances")]
    result["leftovers"] = {d: sorted(os.listdir(root / d)) for d in ("incoming",)}
    result["work"] = {i: sorted(n for n in os.listdir(root / "work" / i) if not n.startswith("."))
                      for i in os.listdir(root / "work") if (root / "work" / i).is_dir() and not i.startswith(".")}
    result["exit_codes"] = [p.returncode for p in procs]
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
