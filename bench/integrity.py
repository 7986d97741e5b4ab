"""Cost of the integrity checks (issue 9) per source format, on the benchmark's 2 GiB images.

usage: python -m bench.integrity [--dir DIR] [--size 2GiB] [--reps 5]

For each format: the pure-Python metadata check (``convd.image.integrity.verify``,
wall and CPU), the whole safe inspection it is part of (``inspect_fd``), and
for comparison the ``qemu-img info`` that detect already ran and the
``qemu-img check`` it now adds for qcow2.  Medians of ``--reps`` runs after
one warm-up (page cache warm, as it is right after an upload); prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench import images
from convd.config import parse_size
from convd.image import integrity
from convd.image.inspection import inspect_fd

FORMATS = ("qcow2", "vmdk", "vmdk-stream", "vdi", "vpc", "vhdx")


def _median_time(fn, reps: int) -> tuple[float, float]:
    """(wall, cpu) medians in seconds, after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def _spawn_time(argv: list[str], reps: int) -> float:
    def once() -> None:
        subprocess.run(argv, capture_output=True, check=False)
    return _median_time(once, reps)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("bench-integrity"))
    p.add_argument("--size", type=parse_size, default=2 << 30)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    imgset = images.build_set(args.dir / "images", args.size, ("qcow2", "vmdk", "vdi", "vpc", "vhdx"),
                              progress=print)
    files = dict(imgset.files)
    stream = args.dir / "images" / "guest-stream.vmdk"
    if not stream.exists():
        print("building guest-stream.vmdk")
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized",
                        files["qcow2"], stream], check=True)
    files["vmdk-stream"] = stream
    rows = []
    for name in FORMATS:
        path = files[name]
        fmt = "vmdk" if name == "vmdk-stream" else name
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            verify = _median_time(lambda fd=fd, fmt=fmt, size=size: integrity.verify(fd, fmt, size), args.reps)
            inspect = _median_time(lambda fd=fd: (os.lseek(fd, 0, os.SEEK_SET), inspect_fd(fd)), args.reps)
        finally:
            os.close(fd)
        info = _spawn_time(["qemu-img", "info", "-f", fmt, "--output=json", str(path)], args.reps)
        check = _spawn_time(["qemu-img", "check", "-f", fmt, "--output=json", str(path)], args.reps) \
            if fmt == "qcow2" else None
        rows.append((name, size, verify, inspect, info, check))
    print(f"\n{imgset.describe()}, {args.size >> 20} MiB virtual; medians of {args.reps}, page cache warm\n")
    print("| source | file | integrity.verify wall / CPU | whole inspection | qemu-img info | qemu-img check (added) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, size, (vw, vc), (iw, _ic), info, check in rows:
        extra = f"{check * 1000:.1f} ms" if check is not None else "—"
        print(f"| {name} | {size / 2**20:.0f} MiB | {vw * 1000:.1f} / {vc * 1000:.1f} ms | {iw * 1000:.1f} ms | "
              f"{info * 1000:.1f} ms | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
