"""The job tests/test_powercut.py runs inside the UML guest at each boot: a convd per
spool (each on its own UML block device), and a producer dropping images as the
README says producers must (temp name, fsync, rename, fsync the directory).

Run with the host's venv python (the guest sees the host's files through
hostfs).  Everything it reports goes to files under ``--log`` (hostfs, written
through to the host as it goes, so it survives the power cut); the host test
judges.

    powercut_job.py --spools LABEL=MOUNT ... --images DIR --log DIR
                    [--drop NAME ...] [--maybe NAME ...] [--final NAME ...]

``--maybe``: names a cut boot's producer may have renamed in, without
knowing whether the rename was made durable: each is looked for in the
spool before convd starts, and dropped again only if it is nowhere.
``--final``: wait until every given name has its record, then report the
spools' end state to ``LOG/final.json`` and stop the daemons.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONVD = str(Path(sys.executable).with_name("convd"))
DIRS = ("incoming", "work", "outgoing", "failed")


class Log:
    """JSON lines appended with one write(2) each, so the host sees every line whole."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, event: str, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({"event": event, "t": time.time(), **fields}) + "\n").encode())


def config(path: Path, root: Path, instance: str) -> Path:
    path.write_text(f"""[spool]
root = "{root}"
instance = "{instance}"
[watch]
settle = 0.2
rescan_interval = 2
[convert]
max_workers = 1
retry_backoff = 0.2
[limits]
workspace = "2GiB"
min_free = "32MiB"
[log]
format = "json"
level = "debug"
[metrics]
listen = ""
""")
    return path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop(src: Path, incoming: Path) -> None:
    """The producer's protocol, durable: write a dot-temp, fsync it, rename it in, fsync the directory."""
    tmp = incoming / f".{src.name}.part"
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.rename(tmp, incoming / src.name)
    fsync_path(incoming)


def present(root: Path, name: str) -> bool:
    """Whether ``name`` is anywhere in the spool; looked for in the order items move, so
    one moving meanwhile is not missed."""
    if os.path.lexists(root / "incoming" / name):
        return True
    for inst in os.listdir(root / "work"):
        if os.path.lexists(root / "work" / inst / name):
            return True
    return any(os.path.lexists(root / d / n) for d in ("outgoing", "failed") for n in (name, f"{name}.json"))


def events(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError) as exc:
        return {"unreadable": type(exc).__name__, "bytes": path.stat().st_size if path.exists() else None}


def tree(root: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel, n)) + "/" for n in dirs]
        out += [os.path.normpath(os.path.join(rel, n)) for n in files]
    return sorted(out)


def report(root: Path, refs: dict[str, Any]) -> dict[str, Any]:
    """The spool's end state: every file, every record, and each published image
    checked against its record's checksum and, with ``qemu-img compare``, against
    the disk that went in."""
    res: dict[str, Any] = {"tree": tree(root), "outgoing": {}, "failed": {}}
    for d in ("outgoing", "failed"):
        for n in sorted(os.listdir(root / d)):
            if n.endswith(".json") or n.startswith("."):
                continue
            path = root / d / n
            entry: dict[str, Any] = {"sha256": sha256(path), "record": read_json(root / d / f"{n}.json")}
            if d == "outgoing" and n in refs:
                ref, fmt = refs[n]
                entry["compare"] = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(path), ref],
                                                  check=False, capture_output=True, text=True).returncode
            res[d][n] = entry
    return res


def status(cfg_dir: Path, label: str) -> Any:
    """``convd status --json``: the daemon's own account, ledger included."""
    st = subprocess.run([CONVD, "status", "-c", str(cfg_dir / f"{label}.toml"), "--json"],
                        check=False, capture_output=True, text=True)
    return json.loads(st.stdout) if st.returncode == 0 else {"error": st.stderr}


def watch_ledgers(spools: dict[str, Path], say: Log, seen: dict[str, Any]) -> None:
    """Log each daemon's ledger as its status snapshot shows it, when it changes."""
    for label, root in spools.items():
        snap = read_json(root / "work" / label / ".status.json")
        if "workspace" not in snap:
            continue
        now = {"reserved": snap["workspace"]["reserved"], "waiting": snap["workspace"]["waiting"],
               "in_flight": {i["name"]: i["reserved"] for i in snap["in_flight"]}}
        if seen.get(label) != now:
            seen[label] = now
            say("ledger", spool=label, **now)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spools", nargs="+", required=True, help="LABEL=MOUNTPOINT")
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--drop", nargs="*", default=[])
    ap.add_argument("--maybe", nargs="*", default=[])
    ap.add_argument("--final", nargs="*", default=None)
    ap.add_argument("--refs", type=Path, help="JSON: name -> [the disk that went in, its qemu-img format]")
    args = ap.parse_args()
    spools = {label: Path(m) / "spool" for label, m in (s.split("=", 1) for s in args.spools)}
    say = Log(args.log / "producer.jsonl")
    todo: dict[str, list[str]] = {}
    for label, root in spools.items():
        for d in DIRS:
            (root / d).mkdir(parents=True, exist_ok=True)
        # A cut producer's temp: a real one would start its upload again.
        for n in os.listdir(root / "incoming"):
            if n.startswith(".") and n.endswith(".part"):
                os.unlink(root / "incoming" / n)
        todo[label] = []
        for name in args.maybe:
            if present(root, name):
                say("found", spool=label, name=name)
            else:
                todo[label].append(name)
        todo[label] += args.drop
    procs = {}
    for label, root in spools.items():
        cfg = config(args.log / f"{label}.toml", root, label)
        with open(args.log / f"{label}.log", "ab") as fh:
            procs[label] = subprocess.Popen([CONVD, "run", "-c", str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                            start_new_session=True)
    try:
        while not all(any(e.get("event") == "watching" for e in events(args.log / f"{label}.log"))
                      for label in spools):
            if any(p.poll() is not None for p in procs.values()):
                say("daemon exited", codes={k: p.returncode for k, p in procs.items()})
                return 1
            time.sleep(0.05)
        say("watching")
        names = sorted({n for t in todo.values() for n in t}, key=lambda n: (args.maybe + args.drop).index(n))
        for name in names:
            for label, root in spools.items():
                if name in todo[label]:
                    drop(args.images / name, root / "incoming")
                    say("dropped", spool=label, name=name)
        if args.final is None:
            say("idle")
            seen: dict[str, Any] = {}
            while True:  # until the power is cut
                watch_ledgers(spools, say, seen)
                time.sleep(0.3)
        deadline = time.monotonic() + 900  # a safety net only: a busy machine is slow

        def settled(label: str, root: Path) -> bool:
            if not all(os.path.lexists(root / "outgoing" / f"{n}.json")
                       or os.path.lexists(root / "failed" / f"{n}.json") for n in args.final):
                return False
            items = [n for n in os.listdir(root / "work" / label) if not n.startswith(".")]
            snap = read_json(root / "work" / label / ".status.json")
            return not items and snap.get("in_flight") == [] and snap.get("updated_at", 0) > time.time() - 2
        while not all(settled(label, root) for label, root in spools.items()):
            if time.monotonic() > deadline:
                say("timed out", tree={label: tree(root) for label, root in spools.items()})
                return 1
            time.sleep(0.2)

        def ledger_idle(label: str, root: Path) -> bool:
            entries = read_json(root / "work" / ".ledger").get("instances", {})
            return {k: v.get("outstanding") for k, v in entries.items()} == {label: 0}
        # The daemon rewrites its ledger entry every 5 s (SHARED_REFRESH): give
        # it three rounds to show the last item's bytes gone; a leak stays.
        until = time.monotonic() + 15
        while not all(ledger_idle(label, root) for label, root in spools.items()) and time.monotonic() < until:
            time.sleep(0.2)
        refs = json.loads(args.refs.read_text()) if args.refs else {}
        # Taken while the daemons still run: their ledger as they hold it.
        result = {label: {"status": status(args.log, label), "ledger": read_json(root / "work" / ".ledger")}
                  for label, root in spools.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for label, root in spools.items():
        result[label].update(report(root, refs))
        result[label]["exit_code"] = procs[label].returncode
    (args.log / "final.json").write_text(json.dumps(result, indent=1))
    say("reported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
