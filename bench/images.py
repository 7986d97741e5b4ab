"""The image set: one guest disk (random extents, written zeros, holes) in every input format.

The data extents are written once into a sparse raw file and converted to
each format by qemu-img itself; the written zeros are then written into
each image by ``qemu-io write -P 0`` (real zero bytes, allocated clusters,
as a guest that zeroes without discard leaves them), so every format holds
the same guest content and the same allocation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["COMPRESSORS", "FORMATS", "ImageSet", "Layout", "build_set", "compressed", "layout", "qemu_format",
           "small_qcow2", "tiny_raw"]

MiB = 1 << 20
# "vmdk-stream" is a VMDK streamOptimized (compressed grains, what OVA
# exports carry); "vmdk" is qemu-img's default monolithicSparse.
FORMATS = ("qcow2", "vmdk", "vmdk-stream", "vdi", "vpc", "vhdx", "raw")
# Creation options as the images come from their usual producers: VHD with
# its exact size (qemu's "qem2" creator, as Azure/Hyper-V images are sized),
# every other format with qemu-img's defaults (VMDK monolithicSparse, dynamic
# VDI/VHD/VHDX, qcow2 with 64 KiB clusters).
CREATE_OPTS = {"vpc": "force_size=on", "vmdk-stream": "subformat=streamOptimized"}
_GRAIN = 64 << 10
_MANIFEST_VERSION = 3


def qemu_format(label: str) -> str:
    """The qemu-img format name of an image-set label ("vmdk-stream" is a vmdk)."""
    return label.split("-", 1)[0]


@dataclass
class Layout:
    virtual: int
    data: list[tuple[int, int]] = field(default_factory=list)
    zeros: list[tuple[int, int]] = field(default_factory=list)

    def bytes_of(self, kind: str) -> int:
        return sum(n for _, n in getattr(self, kind))


def layout(virtual: int, seed: int, data_frac: float = 0.40, zero_frac: float = 0.15) -> Layout:
    """Extents from 64 KiB to 16 MiB (log-uniform, so many small ones), each data,
    written zeros or a hole with the given odds."""
    rng = random.Random(seed)
    out = Layout(virtual)
    pos = 0
    lo, hi = _GRAIN, 16 * MiB
    while pos < virtual:
        n = int(lo * (hi / lo) ** rng.random()) // _GRAIN * _GRAIN or _GRAIN
        n = min(n, virtual - pos)
        r = rng.random()
        if r < data_frac:
            out.data.append((pos, n))
        elif r < data_frac + zero_frac:
            out.zeros.append((pos, n))
        pos += n
    # The last 64 KiB are data: a partition table backup, and a size check for every format.
    if not out.data or out.data[-1][0] + out.data[-1][1] < virtual:
        tail = virtual - _GRAIN
        out.data = [(o, min(n, tail - o)) for o, n in out.data if o < tail] + [(tail, _GRAIN)]
        out.zeros = [(o, min(n, tail - o)) for o, n in out.zeros if o < tail]
    return out


def _run(*argv: str | os.PathLike[str]) -> None:
    res = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {res.stderr.strip()}")


def _write_data(path: Path, lay: Layout, seed: int) -> None:
    pool = random.Random(seed).randbytes(32 * MiB)
    rng = random.Random(seed + 1)
    with open(path, "wb") as fh:
        fh.truncate(lay.virtual)
        for off, n in lay.data:
            done = 0
            while done < n:
                chunk = min(n - done, 8 * MiB)
                start = rng.randrange(0, len(pool) - chunk + 1)
                fh.seek(off + done)
                fh.write(pool[start:start + chunk])
                done += chunk


def _write_zeros(path: Path, fmt: str, lay: Layout) -> None:
    if not lay.zeros:
        return
    if fmt == "raw":
        zero = bytes(8 * MiB)
        with open(path, "r+b") as fh:
            for off, n in lay.zeros:
                done = 0
                while done < n:
                    chunk = min(n - done, len(zero))
                    fh.seek(off + done)
                    fh.write(zero[:chunk])
                    done += chunk
        return
    # qemu-io in batches: one process, many commands, bounded argv.
    batch = 200
    for i in range(0, len(lay.zeros), batch):
        args: list[str] = ["qemu-io", "-f", fmt]
        for off, n in lay.zeros[i:i + batch]:
            args += ["-c", f"write -P 0 {off} {n}"]
        _run(*args, path)


@dataclass
class ImageSet:
    dir: Path
    virtual: int
    seed: int
    files: dict[str, Path]
    data_bytes: int
    zero_bytes: int

    def describe(self) -> str:
        v = self.virtual
        return (f"{self.data_bytes / v:.0%} random data, "
                f"{self.zero_bytes / v:.0%} written zeros, {1 - (self.data_bytes + self.zero_bytes) / v:.0%} holes")

    def remove(self) -> None:
        for p in self.files.values():
            p.unlink(missing_ok=True)
            for _argv, ext in COMPRESSORS.values():  # made beside it by compressed()
                p.with_name(p.name + ext).unlink(missing_ok=True)
        (self.dir / "manifest.json").unlink(missing_ok=True)


def build_set(directory: Path, virtual: int, formats: tuple[str, ...], seed: int = 6,
              progress=lambda msg: None) -> ImageSet:
    """Build (or reuse, when an identical set is already there) the image set."""
    directory.mkdir(parents=True, exist_ok=True)
    lay = layout(virtual, seed)
    want = {"version": _MANIFEST_VERSION, "virtual": virtual, "seed": seed}
    manifest = directory / "manifest.json"
    files = {fmt: directory / f"guest.{fmt}" for fmt in formats}
    try:
        have = json.loads(manifest.read_text())
    except (FileNotFoundError, ValueError):
        have = {}
    if {k: have.get(k) for k in want} == want and all(
        fmt in have.get("formats", []) and files[fmt].exists() for fmt in formats
    ):
        progress(f"reusing the image set in {directory}")
    else:
        manifest.unlink(missing_ok=True)
        data_raw = directory / "data-only.raw"
        progress(f"writing {lay.bytes_of('data') / MiB:.0f} MiB of random extents ({len(lay.data)} extents)")
        _write_data(data_raw, lay, seed)
        for fmt in formats:
            if fmt in ("raw", "vmdk-stream"):
                continue
            progress(f"building guest.{fmt}")
            files[fmt].unlink(missing_ok=True)
            argv: list[str | Path] = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
            if fmt in CREATE_OPTS:
                argv += ["-o", CREATE_OPTS[fmt]]
            _run(*argv, data_raw, files[fmt])
            _write_zeros(files[fmt], fmt, lay)
        if "vmdk-stream" in formats:
            # Written once, front to back, as exporters do (qemu cannot write
            # into a streamOptimized image afterwards): zeros and holes alike
            # are grains it leaves out.
            progress("building guest.vmdk-stream")
            files["vmdk-stream"].unlink(missing_ok=True)
            staged = directory / "zeros.raw"
            shutil.copyfile(data_raw, staged)
            _write_zeros(staged, "raw", lay)
            _run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", CREATE_OPTS["vmdk-stream"],
                 staged, files["vmdk-stream"])
            staged.unlink()
        if "raw" in formats:
            progress("building guest.raw")
            _write_zeros(data_raw, "raw", lay)
            os.replace(data_raw, files["raw"])
        else:
            data_raw.unlink()
        manifest.write_text(json.dumps({**want, "formats": list(formats),
                                        "layout": {"data": len(lay.data), "zeros": len(lay.zeros)}}))
    return ImageSet(directory, virtual, seed, files, lay.bytes_of("data"), lay.bytes_of("zeros"))


# How the compressed uploads are made: as image publishers ship them (xz at a
# moderate preset, multi-threaded, so the file has an index of blocks; gzip
# at its default level).
COMPRESSORS = {"xz": (["xz", "-T0", "-3", "-c"], ".xz"), "gzip": (["gzip", "-6", "-c"], ".gz")}


def compressed(raw: Path, kind: str, progress=lambda msg: None) -> Path:
    """``raw`` compressed with the ``kind`` tool beside it (reused while newer than ``raw``)."""
    argv, ext = COMPRESSORS[kind]
    out = raw.with_name(raw.name + ext)
    if out.exists() and out.stat().st_mtime >= raw.stat().st_mtime:
        progress(f"reusing {out.name}")
        return out
    progress(f"compressing {raw.name} with {' '.join(argv[:-1])}")
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as fh:
        subprocess.run([*argv, str(raw)], stdout=fh, check=True)
    os.replace(tmp, out)
    return out


def tiny_raw(path: Path, size: int, seed: int) -> None:
    """A small raw image: a blank first 4 KiB (no stray MBR/GPT signature), then random bytes."""
    head = min(size, 4096)
    data = bytes(head) + random.Random(seed).randbytes(size - head)
    with open(path, "wb") as fh:
        fh.write(data)


def small_qcow2(path: Path, virtual: int, seed: int) -> None:
    """A small qcow2 with the same kind of content as the large set."""
    raw = path.with_name(path.name + ".raw")
    lay = layout(virtual, seed)
    _write_data(raw, lay, seed)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    _write_zeros(path, "qcow2", lay)

