"""What keeping a source from change costs (convd.custody): taking the inode under a
read lease against the private copy convd falls back to.

    .venv/bin/python -m bench.custody [--size 2GiB] [--reps 3] [--tmpdir DIR]

Writes a file of random bytes in ``--tmpdir`` (default /var/tmp: the
filesystem a spool is on matters, reflinks or not), then per repetition
times :func:`convd.custody.take` and :func:`convd.custody.copy_private` on
it, and the copy plus an fsync of it.  Used in docs/benchmarks.md
("Custody"); it is not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

from convd import custody
from convd.config import parse_size


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.custody", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB", help="size of the source (default 2GiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tmpdir", default="/var/tmp")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    signal.signal(signal.SIGIO, signal.SIG_IGN)  # as the daemon: a broken lease is asked, not signalled
    with tempfile.TemporaryDirectory(prefix="convd-custody-", dir=args.tmpdir) as tmp:
        src = os.path.join(tmp, "source")
        with open(src, "wb") as fh:
            left = size
            while left:
                left -= fh.write(os.urandom(min(left, 8 << 20)))
            os.fsync(fh.fileno())
        lease, copy, durable = [], [], []
        for i in range(args.reps):
            fd = os.open(src, os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                held = custody.take(fd, shared=False)
                lease.append(time.perf_counter() - t0)
                held.close()
                dst = os.path.join(tmp, f"copy{i}")
                t0 = time.perf_counter()
                custody.copy_private(fd, dst, size)
                copy.append(time.perf_counter() - t0)
                out = os.open(dst, os.O_RDONLY)
                os.fsync(out)
                os.close(out)
                durable.append(time.perf_counter() - t0)
                os.unlink(dst)
            finally:
                os.close(fd)
    print(f"take + lease: {[round(x * 1e3, 3) for x in lease]} ms (median {statistics.median(lease) * 1e3:.3f})")
    print(f"private copy: {[round(x, 2) for x in copy]} s (median {statistics.median(copy):.2f})")
    print(f"copy + fsync: {[round(x, 2) for x in durable]} s (median {statistics.median(durable):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
