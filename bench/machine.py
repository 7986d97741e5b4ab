"""What the figures were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["describe"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _memory() -> str:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _filesystem(path: Path) -> str:
    """The mount holding ``path``: fstype, device, options (longest mount-point prefix)."""
    path = path.resolve()
    best: tuple[str, ...] = ()
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                dev, mnt, fstype, opts, *_ = line.split()
                mnt = mnt.replace("\\040", " ")
                if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and \
                        (not best or len(mnt) >= len(best[1])):
                    best = (dev, mnt, fstype, opts)
    except OSError:
        return "unknown"
    if not best:
        return "unknown"
    dev, mnt, fstype, opts = best
    return f"{fstype} on {dev} (mounted at {mnt}, {opts})"


def _qemu_img_version() -> str:
    try:
        out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, IndexError):
        return "unknown"


def _convd_version() -> str:
    try:
        from importlib.metadata import version
        return version("convd")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _git_head(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "convd"],
                               capture_output=True, text=True).stdout.strip()
        return f"{head}{' + uncommitted changes in convd/' if dirty else ''}" if head else "unknown"
    except OSError:
        return "unknown"


def _page_reporting() -> str:
    """Whether freed guest memory goes back to the host (virtio-balloon free page reporting).

    Where it does, memory touched again must be faulted back in by the host: a
    conversion whose page cache lands on such pages writes 2-3x slower, at
    random (docs/benchmarks.md, "Fresh sources").
    """
    base = Path("/sys/module/page_reporting/parameters")
    if not base.is_dir():
        return "none (no page_reporting module)"
    vals = {}
    for name in ("page_reporting_order", "min_free_ms", "reported_kib"):
        try:
            vals[name] = (base / name).read_text().strip()
        except OSError:
            pass
    if not vals.get("reported_kib", "0").strip("0"):
        return "supported, nothing reported yet"
    vals.pop("reported_kib")
    return "on: " + ", ".join(f"{k} {v}" for k, v in vals.items())


def describe(workdir: Path, repo: Path) -> dict[str, str]:
    flags = _cpu_flags()
    accel = [f for f in ("sha_ni", "avx2", "avx512f") if f in flags]
    return {
        "CPU": f"{_cpu_model()}" + (f" ({', '.join(accel)})" if accel else ""),
        "cores": f"{os.cpu_count()} online",
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()}",
        "filesystem (bench dir)": _filesystem(workdir),
        "qemu-img": _qemu_img_version(),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "convd": f"{_convd_version()} at {_git_head(repo)}",
        "free page reporting to the host": _page_reporting(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
