"""``python -m bench``: build the image set, run every measurement in one session, report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from bench import images, qsd, report, scenarios
from bench.daemon import bench_daemon, write_config
from bench.machine import describe
from convd_testing.daemon import Daemon, Spool

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
MiB, GiB = 1 << 20, 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": MiB, "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}
METHODS = ("bare", "off", "sha256")
# Bare qemu-img flag variants for the tuning tables; the last element pre-creates
# a sparse raw target of the virtual size (what `-n --target-is-zero` needs).
VARIANTS: dict[str, list[tuple[str, list[str], bool]]] = {
    "raw": [
        ("as Glance", [], False),
        ("-W", ["-W"], False),
        ("-m 16 -W", ["-m", "16", "-W"], False),
        ("-t none", ["-t", "none"], False),
        ("-t none -W", ["-t", "none", "-W"], False),
        ("-t none -m 16 -W", ["-t", "none", "-m", "16", "-W"], False),
        ("-n --target-is-zero -W", ["-n", "--target-is-zero", "-W"], True),
    ],
    "qcow2": [
        ("as Glance", [], False),
        ("-W", ["-W"], False),
        ("-m 16 -W", ["-m", "16", "-W"], False),
        ("-t none", ["-t", "none"], False),
        ("-t none -W", ["-t", "none", "-W"], False),
        ("-t none -m 16 -W", ["-t", "none", "-m", "16", "-W"], False),
    ],
}

_t_start = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench +{time.monotonic() - _t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 256MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="convd against bare qemu-img (issue 6). Writes the table to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=parse_size, default=2 * GiB, help="virtual size of the large images")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each large-image measurement")
    p.add_argument("--formats", type=_csv(images.FORMATS), default=images.FORMATS,
                   help="source formats of the large images, comma-separated")
    p.add_argument("--targets", type=_csv(("raw", "qcow2")), default=("raw", "qcow2"),
                   help="target formats of the large images")
    p.add_argument("--small-count", type=int, default=200, help="images in the many-small drain")
    p.add_argument("--small-size", type=parse_size, default=1 * MiB, help="virtual size of each small image")
    p.add_argument("--latency-samples", type=int, default=100, help="pick-up latency samples")
    p.add_argument("--passthrough-reps", type=int, default=10, help="raw→raw passthrough repetitions")
    p.add_argument("--backlog-files", type=int, default=5000, help="files already queued at start-up")
    p.add_argument("--backlog-size", type=parse_size, default=64 << 10, help="size of each backlog file")
    p.add_argument("--skip-large", action="store_true", help="skip the large-image comparison")
    p.add_argument("--skip-small", action="store_true", help="skip the drain and pick-up latency")
    p.add_argument("--skip-backlog", action="store_true", help="skip the start-up backlog")
    p.add_argument("--skip-passthrough", action="store_true", help="skip the large raw→raw passthrough")
    p.add_argument("--skip-compressed", action="store_true",
                   help="skip the xz/gzip-compressed raw uploads (convd against `xz -dc`/`gzip -dc` + fsync)")
    p.add_argument("--skip-rate", action="store_true",
                   help="skip the bandwidth cap: 4 conversions at once under [convert] rate_limit = 50MiB")
    p.add_argument("--rate-only", action="store_true",
                   help="measure only the bandwidth cap (prints the figure; --out is not rewritten)")
    p.add_argument("--skip-glance", action="store_true",
                   help="skip the Glance import: built-in image_conversion against the convd plugin")
    p.add_argument("--glance-reps", type=int, default=3, help="imports per method in the Glance scenario")
    p.add_argument("--glance-burst", type=int, default=8,
                   help="imports started at the same moment in the Glance scenario's burst (0: none)")
    p.add_argument("--glance-burst-size", type=parse_size, default=1 * GiB,
                   help="virtual size of each burst image (a qcow2 like the large set's)")
    p.add_argument("--glance-burst-reps", type=int, default=2, help="bursts per method, alternating")
    p.add_argument("--variants", action="store_true",
                   help="also time bare qemu-img flag variants (-W, -m 16, -t none, --target-is-zero) to raw")
    p.add_argument("--qsd", action="store_true",
                   help="also measure the design not taken: one qemu-storage-daemon per worker over QMP "
                        "(needs qemu-system-common), against qemu-img processes, per small image")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "out",
                   help="scratch directory (images, spools, results.json); must have room for ~4× --size")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md",
                   help="markdown file to (over)write with the latest table; '-' for none")
    p.add_argument("--keep-images", action="store_true", help="keep the image set for the next run")
    p.add_argument("--shared", action="store_true",
                   help="instead: 1, 2 and 3 daemons on one CephFS spool (a Ceph cluster on loopback, root), "
                        "and the take-over time after a kill -9")
    p.add_argument("--shared-count", type=int, default=200, help="images per --shared run")
    p.add_argument("--shared-size", type=parse_size, default=16 * MiB, help="virtual size of each --shared image")
    p.add_argument("--shared-out", type=Path, default=REPO / "docs" / "benchmarks.md",
                   help="markdown file whose --shared section is (re)written ('-' for none)")
    p.add_argument("--rbd", action="store_true",
                   help="only the Ceph RBD scenario: --size qcow2 into an RBD pool, convd against convert + "
                        "rbd import by hand (needs root and the Ceph packages: make sharedfs-deps)")
    p.add_argument("--report-from", type=Path, metavar="RESULTS_JSON",
                   help="measure nothing: render a saved results.json to --out and stdout")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def _unwind(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(128 + signum)


@contextlib.contextmanager
def daemons_stopped(ds: dict[Any, Daemon]) -> Iterator[dict[Any, Daemon]]:
    try:
        yield ds
    finally:
        for d in ds.values():
            d.stop(15.0, strict=False)


def start_daemon(root: Path, label: str, *, target: str, algorithms: list[str]) -> Daemon:
    if root.exists():
        shutil.rmtree(root)
    spool = Spool(root)
    spool.create()
    cfg = write_config(root, target=target, algorithms=algorithms)
    d = bench_daemon(cfg, spool, label)
    d.wait_ready(timeout=30.0)
    return d


def check_space(workdir: Path, args: argparse.Namespace) -> None:
    st = os.statvfs(workdir)
    free = st.f_bavail * st.f_frsize
    need = 0
    if not (args.skip_large and args.skip_passthrough and args.skip_compressed):
        # sources (~55 % allocated each), one staged copy (dense, up to the size) and one
        # output (~data size) at a time, the daemons' 1 GiB floor
        need += int(args.size * 0.6 * (len(set(args.formats) | {"raw"})) + 2 * args.size + 2 * GiB)
    if not args.skip_backlog:
        need += args.backlog_files * args.backlog_size * 2
    if not args.skip_glance and args.glance_burst > 0:
        # per burst image: the staged copy and the converted output (~60 % of the size
        # each), and the store's copy (dense, the full size)
        need += int(args.glance_burst * args.glance_burst_size * 2.2)
    log(f"free space in {workdir}: {free / GiB:.1f} GiB; this run needs about {need / GiB:.1f} GiB")
    if free < need:
        raise SystemExit(f"not enough free space in {workdir}: {free / GiB:.1f} GiB < {need / GiB:.1f} GiB "
                         "(use --workdir or a smaller --size)")


def _rotate(seq: tuple[str, ...], k: int) -> tuple[str, ...]:
    k %= len(seq)
    return seq[k:] + seq[:k]


def run_large(args: argparse.Namespace, imgset: images.ImageSet, ds: dict[Any, Daemon],
              workdir: Path) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    bare_dir = workdir / "bare"
    bare_dir.mkdir(exist_ok=True)
    pairs = [(f, t) for f in args.formats for t in args.targets]
    for rep in range(args.reps):
        for k, (fmt, target) in enumerate(pairs):
            key = f"{fmt}->{target}"
            row = rows.setdefault(key, {"format": fmt, "target": target, "bare": [], "sync": [],
                                        "sha256sum": [], "hashlib": [], "off": [], "sha256": [],
                                        "timings_off": [], "timings_sha256": [], "claimed": [],
                                        "digests": set(), "status": None})
            src = imgset.files[fmt]
            for method in _rotate(METHODS, rep + k):
                if method == "bare":
                    out = bare_dir / f"out.{target}"
                    r = scenarios.bare_convert(src, images.qemu_format(fmt), target, out)
                    row["bare"].append(r["bare"])
                    row["sync"].append(r["sync"])
                    secs, digest = scenarios.sha256sum(out)
                    row["sha256sum"].append(secs)
                    if target == "raw":
                        row["digests"].add(("bare", digest))
                    row["hashlib"].append(scenarios.hashlib_sha256(out))
                    out.unlink()
                    scenarios.settle_fs(out.parent)
                else:
                    r = scenarios.convd_once(ds[(target, method)], src, f"{fmt}-{target}-{method}-{rep}")
                    row[method].append(r["e2e"])
                    row[f"timings_{method}"].append(r["timings"])
                    row["status"] = r["status"]
                    if r["claimed"] is not None:
                        row["claimed"].append(r["claimed"])
                    if r["sha256"] and target == "raw":
                        row["digests"].add(("convd", r["sha256"]))
            log(f"rep {rep + 1}/{args.reps} {fmt:>5} → {target:<5} bare {row['bare'][-1]:.2f}s "
                f"+sync {row['sync'][-1]:.2f}s  convd {row['off'][-1]:.2f}s  "
                f"convd+sha256 {row['sha256'][-1]:.2f}s  (sha256sum {row['sha256sum'][-1]:.2f}s)")
    # All raw outputs hold the same guest bytes, whatever the source format and tool.
    raw_digests = {d for r in rows.values() if r["target"] == "raw" for _, d in r["digests"]}
    for r in rows.values():
        r["digests"] = sorted(r["digests"])
    return {"rows": rows, "raw_digests_agree": len(raw_digests) <= 1}


def run_passthrough(args: argparse.Namespace, imgset: images.ImageSet, d: Daemon) -> dict[str, Any]:
    e2e, timings = [], []
    for i in range(args.passthrough_reps):
        r = scenarios.convd_once(d, imgset.files["raw"], f"passthrough-{i}")
        if r["status"] != "passthrough":
            raise RuntimeError(f"raw→raw was {r['status']}, not passthrough")
        e2e.append(r["e2e"])
        timings.append(r["timings"])
        time.sleep(0.1)
    log(f"raw→raw passthrough of {imgset.virtual / GiB:g} GiB: median {statistics.median(e2e) * 1000:.1f} ms")
    return {"size": imgset.virtual, "e2e": e2e, "timings": timings}


def run_compressed(args: argparse.Namespace, imgset: images.ImageSet, ds: dict[Any, Daemon],
                   workdir: Path) -> dict[str, Any]:
    """The raw image compressed with xz and gzip, dropped as is: convd (checksums off and
    sha256) against the operator's ``xz -dc``/``gzip -dc`` to a file plus fsync."""
    bare_dir = workdir / "bare"
    bare_dir.mkdir(exist_ok=True)
    rows: dict[str, Any] = {}
    for kind in images.COMPRESSORS:
        src = images.compressed(imgset.files["raw"], kind, progress=log)
        scenarios.durable(src)
        scenarios.warm(src)
        row: dict[str, Any] = {"file_size": src.stat().st_size, "convd": [], "convd_sha256": [], "bare": [],
                               "bare_nosync": [], "timings": [], "timings_sha256": []}
        for rep in range(args.reps):
            for method in _rotate(("convd", "convd_sha256", "bare"), rep):
                if method == "bare":
                    out = bare_dir / "unpacked.raw"
                    b = scenarios.bare_decompress(kind, src, out)
                    row["bare"].append(b["sync"])
                    row["bare_nosync"].append(b["bare"])
                    out.unlink()
                    scenarios.settle_fs(bare_dir)
                    continue
                algo = "sha256" if method == "convd_sha256" else "off"
                r = scenarios.convd_once(ds[("raw", algo)], src, f"{kind}-{algo}-{rep}")
                if r["status"] != "passthrough":
                    raise RuntimeError(f"{kind}-compressed raw was {r['status']}, not an unpacked passthrough")
                row[method].append(r["e2e"])
                row["timings" if algo == "off" else "timings_sha256"].append(r["timings"])
            log(f"rep {rep + 1}/{args.reps} {kind}-compressed raw → raw: convd {row['convd'][-1]:.2f}s "
                f"(sha256 {row['convd_sha256'][-1]:.2f}s), {kind} -dc + fsync {row['bare'][-1]:.2f}s")
        rows[kind] = row
    return {"size": imgset.virtual, "rows": rows}


def run_drain(args: argparse.Namespace, d: Daemon, workdir: Path) -> dict[str, Any]:
    small_dir = workdir / "small"
    small_dir.mkdir(exist_ok=True)
    protos = []
    for s in range(4):
        p = small_dir / f"proto-{s}.qcow2"
        if not p.exists():
            images.small_qcow2(p, args.small_size, seed=100 + s)
        protos.append(p)
    sources = []
    for i in range(args.small_count):
        p = small_dir / f"small-{i:04d}.qcow2"
        if not p.exists():
            shutil.copyfile(protos[i % len(protos)], p)
        sources.append(p)
    for s in sources:
        scenarios.durable(s)
        scenarios.warm(s)
    res: dict[str, Any] = {"count": args.small_count, "virtual": args.small_size, "file_size": protos[0].stat().st_size,
                           "convd": [], "bare": [], "bare_sync": [], "timings": [], "claimed": [],
                           "cpu_self": [], "cpu_children": [], "bare_cpu": []}
    order = ("convd", "bare", "bare_sync")
    for rep in range(args.reps):
        for method in _rotate(order, rep):
            if method == "convd":
                r = scenarios.drain(d, sources, f"small-{rep}")
                res["convd"].append(r["total"])
                res["timings"].extend(r["timings"])
                res["claimed"].extend(r["claimed"])
                res["cpu_self"].append(r["cpu_self"])
                res["cpu_children"].append(r["cpu_children"])
            else:
                b = scenarios.bare_sequential(sources, "qcow2", workdir / "bare-small",
                                              sync=method == "bare_sync")
                res[method].append(b["total"])
                if method == "bare":
                    res["bare_cpu"].append(b["cpu_children"])
        log(f"rep {rep + 1}/{args.reps} {args.small_count} × {args.small_size // MiB} MiB qcow2→raw: "
            f"convd {res['convd'][-1]:.2f}s, bare sequential {res['bare'][-1]:.2f}s "
            f"(+fsync each {res['bare_sync'][-1]:.2f}s)")
    shutil.rmtree(workdir / "bare-small", ignore_errors=True)
    return res


def run_probes(d: Daemon, workdir: Path) -> dict[str, Any]:
    """Fixed per-item costs, measured directly: what a spawn and a directory fsync cost here."""
    small = workdir / "small" / "proto-0.qcow2"
    tiny = workdir / "small" / "tiny.raw"
    setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")

    def timed(argv: list[str], n: int = 30) -> float:
        xs = []
        for _ in range(n):
            t0 = time.monotonic()
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True)
            xs.append(time.monotonic() - t0)
        return statistics.median(xs)

    info = ["qemu-img", "info", "-f", "qcow2", "--output=json", str(small)]
    out: dict[str, Any] = {"qemu_img_info": timed(info),
                           "qemu_img_info_raw": timed(["qemu-img", "info", "-f", "raw", "--output=json", str(tiny)]),
                           "true": timed(["true"])}
    if setpriv and prlimit:
        out["qemu_img_info_wrapped"] = timed([setpriv, "--pdeathsig", "KILL", "--inh-caps=-all", "--", prlimit,
                                              "--cpu=30", f"--as={1 << 30}", "--", *info])
    out.update(_launcher_probe([shutil.which("qemu-img") or "qemu-img", *info[1:]]))
    if small.exists():
        dst = workdir / "probe.raw"
        xs = []
        for _ in range(20):
            xs.append(scenarios.bare_convert(small, "qcow2", "raw", dst)["bare"])
        dst.unlink(missing_ok=True)
        out["qemu_img_convert_small"] = statistics.median(xs)
        out["qemu_img_map_small"] = timed(["qemu-img", "map", "--output=json", "-f", "qcow2", str(small)])
    probe_dir = d.spool.root / ".probe-dir"
    probe_dir.mkdir(exist_ok=True)
    xs = []
    for i in range(50):
        (probe_dir / f"f{i}").write_bytes(b"x")
        fd = os.open(probe_dir, os.O_RDONLY | os.O_DIRECTORY)
        t0 = time.monotonic()
        os.fsync(fd)
        xs.append(time.monotonic() - t0)
        os.close(fd)
    shutil.rmtree(probe_dir)
    out["fsync_dir"] = statistics.median(xs)
    return out


def _launcher_probe(argv: list[str], n: int = 30) -> dict[str, float]:
    """``qemu-img info`` through convd's own launcher, with the limits convd sets:
    wall per run (median), and CPU per run of this process, the launcher and qemu-img."""
    try:
        from convd.qemu import launcher
    except ImportError:
        return {}

    def cpu_of(pid: int) -> float:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return sum(int(f[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")

    async def go() -> dict[str, float]:
        lch = launcher.get()
        xs = []
        c0, l0 = os.times(), cpu_of(lch.pid)
        for _ in range(n):
            t0 = time.monotonic()
            child = await lch.spawn(argv, {"cpu_time": 30, "address_space": 1 << 30})
            await child.communicate()
            xs.append(time.monotonic() - t0)
        c1, l1 = os.times(), cpu_of(lch.pid)
        cpu = (c1.user + c1.system + c1.children_user + c1.children_system
               - c0.user - c0.system - c0.children_user - c0.children_system + l1 - l0)
        return {"qemu_img_info_launcher": statistics.median(xs), "qemu_img_info_launcher_cpu": cpu / n}

    try:
        return asyncio.run(go())
    finally:
        launcher.shutdown()


def run_variants(args: argparse.Namespace, imgset: images.ImageSet, workdir: Path) -> dict[str, Any]:
    """Bare qemu-img with each flag variant, durable (+ fsync); alternating like the rest."""
    out: dict[str, Any] = {}
    vsizes = {}
    for fmt in args.formats:
        info = json.loads(subprocess.run(["qemu-img", "info", "-f", images.qemu_format(fmt), "--output=json",
                                          str(imgset.files[fmt])],
                                         capture_output=True, text=True, check=True).stdout)
        vsizes[fmt] = info["virtual-size"]
    pairs = [(f, t) for t in args.targets for f in args.formats if f != t]
    for rep in range(args.reps):
        for k, (fmt, target) in enumerate(pairs):
            dst = workdir / "bare" / f"variant.{target}"
            variants = VARIANTS[target]
            row = out.setdefault(target, {}).setdefault(
                fmt, {label: {"bare": [], "sync": []} for label, _, _ in variants})
            j = (rep + k) % len(variants)
            for label, flags, precreate in variants[j:] + variants[:j]:
                r = scenarios.bare_convert(imgset.files[fmt], images.qemu_format(fmt), target, dst, flags,
                                           precreate=vsizes[fmt] if precreate else None)
                row[label]["bare"].append(r["bare"])
                row[label]["sync"].append(r["sync"])
                dst.unlink()
                scenarios.settle_fs(dst.parent)
            best = min(row, key=lambda lbl: row[lbl]["sync"][-1])
            log(f"variants rep {rep + 1}/{args.reps} {fmt} → {target}: fastest durable `{best}` "
                f"{row[best]['sync'][-1]:.2f}s vs as Glance {row['as Glance']['sync'][-1]:.2f}s")
    out["convd_defaults"] = _convd_defaults(args.formats, args.targets)
    return out


def _convd_defaults(formats: tuple[str, ...], targets: tuple[str, ...]) -> dict[str, str]:
    """The flags this convd passes by default, to mark them in the tables (informational)."""
    try:
        from convd.qemu.img import convert_args
    except ImportError:
        return {}
    out = {}
    for t in targets:
        for f in formats:
            try:
                out[f"{f}->{t}"] = " ".join(convert_args(images.qemu_format(f), t, None)) or "(none)"
            except Exception:  # noqa: BLE001 - an internal API; labels only
                pass
    return out


RATE_CAP = 50 * MiB
RATE_ITEMS = 4
RATE_DATA = 256 * MiB


def run_rate(workdir: Path) -> dict[str, Any]:
    """Four 512 MiB-virtual qcow2 images with 256 MiB of data each, converted at once under a 50 MiB/s cap."""
    log(f"bandwidth cap: {RATE_ITEMS} × {RATE_DATA // MiB} MiB of data at once, "
        f"rate_limit = {RATE_CAP // MiB} MiB/s")
    src_dir = workdir / "rate"
    src_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(RATE_ITEMS):
        p = src_dir / f"rate-{i}.qcow2"
        if not p.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), str(2 * RATE_DATA)], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P {i + 1} 0 {RATE_DATA}", str(p)],
                           check=True, capture_output=True)
        scenarios.durable(p)
        sources.append(p)
    try:
        return scenarios.rate_limited(workdir / "spools" / "rate", sources, RATE_DATA, RATE_CAP, log)
    finally:
        shutil.rmtree(src_dir, ignore_errors=True)
        shutil.rmtree(workdir / "spools" / "rate", ignore_errors=True)


def write_report(results: dict[str, Any], out: Path) -> None:
    md = report.render(results)
    print(md)
    if str(out) != "-":
        out.parent.mkdir(parents=True, exist_ok=True)
        from bench.rbd import rbd_block  # and `bench --rbd` figures
        from bench.shared import shared_block  # `bench --shared` figures live on the same page

        kept = (shared_block(out.read_text()) + rbd_block(out.read_text())) if out.exists() else ""
        out.write_text(report.page(md) + ("\n" + kept if kept else ""))
        log(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM or SIGINT (even one a background shell ignores) unwinds: every
    # finally below stops the daemons, glance-api and MariaDB it started and
    # removes its scratch space.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _unwind)
    if args.shared:
        from bench.shared import run_shared

        out = None if str(args.shared_out) == "-" else args.shared_out
        return run_shared(args.shared_count, args.shared_size, args.workdir.resolve(), out)
    if args.rbd:
        from bench.rbd import report_rbd, run_rbd

        rbd_out = None if str(args.out) == "-" else args.out
        if args.report_from:  # re-render a saved rbd-results.json, measuring nothing
            return report_rbd(json.loads(args.report_from.read_text()), rbd_out)
        return run_rbd(args.size, args.reps, args.workdir.resolve(), rbd_out)
    if args.report_from:
        write_report(json.loads(args.report_from.read_text()), args.out)
        return 0
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.rate_only:
        res = run_rate(workdir)
        print(json.dumps(res, indent=1))
        return 0
    check_space(workdir, args)
    results: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"size": args.size, "reps": args.reps, "formats": list(args.formats),
                     "targets": list(args.targets), "small_count": args.small_count,
                     "small_size": args.small_size, "latency_samples": args.latency_samples,
                     "passthrough_reps": args.passthrough_reps, "backlog_files": args.backlog_files,
                     "backlog_size": args.backlog_size, "glance_reps": args.glance_reps,
                     "glance_burst": args.glance_burst, "glance_burst_size": args.glance_burst_size,
                     "glance_burst_reps": args.glance_burst_reps,
                     "workdir": str(workdir)},
        "machine": describe(workdir, REPO),
    }
    need_large = not (args.skip_large and args.skip_passthrough and args.skip_compressed
                      and args.skip_glance and not args.variants)
    imgset: images.ImageSet | None = None
    spools = workdir / "spools"
    try:
        if need_large:
            formats = tuple(dict.fromkeys((*args.formats, "raw", *(() if args.skip_glance else ("qcow2",)))))
            imgset = images.build_set(workdir / "images", args.size, formats, progress=log)
            results["image_set"] = imgset.describe()
            results["image_files"] = {f: p.stat().st_blocks * 512 for f, p in imgset.files.items()}
            for p in imgset.files.values():
                scenarios.durable(p)
                scenarios.warm(p)
        (workdir / "small").mkdir(exist_ok=True)
        images.tiny_raw(workdir / "small" / "tiny.raw", args.backlog_size, seed=7)
        scenarios.durable(workdir / "small" / "tiny.raw")
        ds: dict[Any, Daemon] = {}
        with daemons_stopped(ds):
            configs = {("raw", "off")}  # the drain, latency and passthrough daemon
            if not args.skip_large:
                configs |= {(t, m) for t in args.targets for m in ("off", "sha256")}
            if not args.skip_compressed:
                configs |= {("raw", "sha256")}
            for target, m in sorted(configs):
                log(f"starting convd: target {target}, checksums {'off' if m == 'off' else m}")
                ds[(target, m)] = start_daemon(spools / f"{target}-{m}", f"{target}/{m}", target=target,
                                               algorithms=[] if m == "off" else [m])
            images.small_qcow2(workdir / "small" / "warmup.qcow2", 4 * MiB, seed=5)
            scenarios.durable(workdir / "small" / "warmup.qcow2")
            for d in ds.values():  # first items import lazily-loaded code paths
                for i in range(2):
                    scenarios.convd_once(d, workdir / "small" / "warmup.qcow2", f"warmup-{i}", timeout=60)
            raw_off = ds[("raw", "off")]
            if not args.skip_large:
                log(f"large images: {imgset.describe() if imgset else ''}; {args.reps} reps, alternating")
                results["large"] = run_large(args, imgset, ds, workdir)
            if not args.skip_passthrough and imgset is not None:
                results["passthrough"] = run_passthrough(args, imgset, raw_off)
            if not args.skip_compressed and imgset is not None:
                log("compressed uploads: the raw image as .xz and .gz, unpacked by convd and by hand")
                results["compressed"] = run_compressed(args, imgset, ds, workdir)
            if not args.skip_small:
                log(f"drain: {args.small_count} × {args.small_size // MiB} MiB qcow2 → raw, max_workers = 2")
                results["drain"] = run_drain(args, raw_off, workdir)
                log(f"pick-up latency: {args.latency_samples} tiny raw images, one at a time")
                results["latency"] = scenarios.pickup_latency(raw_off, workdir / "small" / "tiny.raw",
                                                              args.latency_samples, log)
                results["latency"]["claimed_in_large_runs"] = [
                    c for r in results.get("large", {}).get("rows", {}).values() for c in r["claimed"]]
                results["probes"] = run_probes(raw_off, workdir)
        if not args.skip_backlog:
            log(f"backlog: {args.backlog_files} × {args.backlog_size // 1024} KiB raw already queued at start-up")
            root = spools / "backlog"
            if root.exists():
                shutil.rmtree(root)
            cfg = write_config(root, target="raw", algorithms=["sha256"])
            results["backlog"] = scenarios.backlog(root, cfg, args.backlog_files, args.backlog_size, log)
            shutil.rmtree(root)
        if not args.skip_rate:
            results["rate_limit"] = run_rate(workdir)
        if not args.skip_glance and imgset is not None:
            log(f"Glance: guest.qcow2 through glance-api, image_conversion against convd, "
                f"{args.glance_reps} reps, alternating")
            from bench.glance import run_glance

            burst_src = None
            if args.glance_burst > 0:
                burst_src = workdir / "small" / "burst.qcow2"
                log(f"Glance burst image: {args.glance_burst_size / GiB:g} GiB virtual qcow2")
                images.small_qcow2(burst_src, args.glance_burst_size, seed=11)
                scenarios.durable(burst_src)
            results["glance"] = run_glance(imgset.files["qcow2"], workdir, args.glance_reps, log,
                                           burst=args.glance_burst, burst_src=burst_src,
                                           burst_reps=args.glance_burst_reps)
        if args.qsd:
            if not qsd.available():
                log("--qsd: qemu-storage-daemon not found (Debian: apt-get install qemu-system-common); skipped")
            else:
                log(f"qemu-storage-daemon over QMP against qemu-img processes, {args.small_count} small images")
                small = sorted((workdir / "small").glob("small-*.qcow2"))[:args.small_count]
                if not small:
                    images.small_qcow2(workdir / "small" / "small-0000.qcow2", args.small_size, seed=100)
                    small = [workdir / "small" / "small-0000.qcow2"] * args.small_count
                results["qsd"] = qsd.compare(small, workdir / "qsd", args.reps)
        if args.variants and imgset is not None:
            log(f"bare qemu-img flag variants, targets {', '.join(args.targets)}")
            results["variants"] = run_variants(args, imgset, workdir)
    finally:
        if not args.keep_images:
            if imgset is not None:
                imgset.remove()
            shutil.rmtree(workdir / "small", ignore_errors=True)
            with contextlib.suppress(OSError):
                (workdir / "images").rmdir()
        shutil.rmtree(workdir / "bare", ignore_errors=True)
        shutil.rmtree(spools, ignore_errors=True)
    results["finished_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["elapsed"] = time.monotonic() - _t_start
    results["machine"]["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(results, args.out)
    log(f"raw samples in {workdir / 'results.json'}")
    return 0
