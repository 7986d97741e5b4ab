"""A/B of one conversion written through the page cache: convd (checksums on, so
its output goes through the cache) against bare qemu-img with convd's flags and
with Glance's, alternating, every method on a fresh copy of the source.

    .venv/bin/python -m bench.pagecache_ab SOURCE FORMAT [--reps N] [--tmpdir DIR]

Prints each repetition's ``qemu-img convert`` wall time (convd's from its
record's ``timings.qemu_convert``) and the medians.  Used in
docs/benchmarks.md ("Checksums") to tell convd's own cost from this VM's
page-cache faults; it is not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.daemon import write_config
from convd.qemu import img as qemu
from convd_testing.daemon import convd_bin, stage_private


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pagecache_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the image to convert (a fresh copy is made for every run)")
    p.add_argument("format", help="its qemu-img format name (qcow2, vmdk, vdi, vpc, vhdx, raw)")
    p.add_argument("--reps", type=int, default=6, help="repetitions of each method (default 6)")
    p.add_argument("--tmpdir", type=Path, default=None,
                   help="where the scratch directory is made (default: the system's; needs about 3 × "
                        "the source's size), removed at the end")
    args = p.parse_args(argv)
    if not args.source.is_file():
        p.error(f"{args.source}: no such file")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    src, fmt, reps = args.source, args.format, args.reps
    work = Path(tempfile.mkdtemp(prefix="convd-pagecache-ab-", dir=args.tmpdir))
    try:
        return _run(src, fmt, reps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(src: Path, fmt: str, reps: int, work: Path) -> int:
    root = work / "spool"
    cfg = write_config(root, target="raw", algorithms=["sha256"])
    flags = qemu.convert_args(fmt, "raw", None, direct_io=False)
    methods = {"convd": None, f"bare, convd's flags ({' '.join(['-p', *flags])})": ["-p", *flags],
               "bare, as Glance": []}
    res: dict[str, list[float]] = {m: [] for m in methods}
    with open(work / "daemon.log", "w") as log:
        daemon = subprocess.Popen([convd_bin(), "run", "-c", str(cfg)], stdout=log, stderr=log)
    try:
        time.sleep(2.0)

        def settle() -> None:
            subprocess.run(["sync", "-f", str(work)], check=False)
            time.sleep(0.5)

        for rep in range(reps):
            names = list(methods)
            for m in names[rep % 3:] + names[:rep % 3]:
                if methods[m] is None:
                    staged = stage_private(src, root / f".stage-{rep}")
                    settle()
                    name = f"ab-{rep}"
                    os.rename(staged, root / "incoming" / name)
                    rec = root / "outgoing" / f"{name}.json"
                    deadline = time.monotonic() + 600
                    while not rec.exists():
                        if time.monotonic() > deadline or daemon.poll() is not None:
                            tail = (work / "daemon.log").read_text(errors="replace")[-2000:]
                            raise RuntimeError(f"no record for {name}; the daemon's log ends:\n{tail}")
                        time.sleep(0.005)
                    res[m].append(json.loads(rec.read_text())["timings"]["qemu_convert"])
                    rec.unlink()
                    (root / "outgoing" / name).unlink()
                else:
                    staged = stage_private(src, work / "source")
                    settle()
                    t0 = time.monotonic()
                    subprocess.run(["qemu-img", "convert", *methods[m], "-f", fmt, "-O", "raw", str(staged),
                                    str(work / "out")], stdout=subprocess.DEVNULL, check=True)
                    res[m].append(time.monotonic() - t0)
                    staged.unlink()
                    (work / "out").unlink()
                settle()
            print(f"rep {rep + 1}/{reps}: " + ", ".join(f"{m} {v[-1]:.2f} s" for m, v in res.items()), flush=True)
    finally:
        daemon.terminate()
        daemon.wait()
    for m, v in res.items():
        print(f"{m}: median {statistics.median(v):.2f} s ({', '.join(f'{x:.2f}' for x in v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
