"""Containers as people upload them: compressed images, tar archives and OVA appliances.

Each drop is named without an extension: convd must tell what it is by its
bytes.  Real `convd run` daemons, real qemu-img, content checked with
`qemu-img compare` against the disk that went into the container.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import zstandard

from convd.errors import CorruptImage, UnsafeImage, UnsupportedFormat
from convd.image import containers
from convd.pipeline.layout import UNPACKED

from conftest import REPO, MiB, Spool, convd_bin, images_equal, make_image, run, sha256_file, wait_for, write_config

INSTANCE = "test"


# -- building containers ---------------------------------------------------------------

def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if kind == "xz":
        return lzma.compress(data, preset=1)
    if kind == "bzip2":
        return bz2.compress(data, compresslevel=1)
    return zstandard.ZstdCompressor(level=1).compress(data)  # states its content size


def tar_of(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            name, data = m
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.uname, ti.gname = len(data), 0o644, "vbox", "vbox"
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def vbox_ovf(disks: list[tuple[str, int]]) -> bytes:
    """An OVF 1.0 descriptor as VirtualBox's "Export Appliance" writes it (trimmed)."""
    refs = "".join(f'    <File ovf:id="file{i}" ovf:href="{name}"/>\n' for i, (name, _) in enumerate(disks, 1))
    disk_els = "".join(
        f'    <Disk ovf:capacity="{cap}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" '
        f'vbox:uuid="0c2e6a4b-7a1e-4c38-9f5d-00000000000{i}"/>\n'
        for i, (_, cap) in enumerate(disks, 1))
    return (
        '<?xml version="1.0"?>\n'
        '<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
        'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" '
        'xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" '
        'xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">\n'
        f'  <References>\n{refs}  </References>\n'
        '  <DiskSection>\n    <Info>List of the virtual disks used in the package</Info>\n'
        f'{disk_els}  </DiskSection>\n'
        '  <NetworkSection><Info>Logical networks</Info><Network ovf:name="NAT"/></NetworkSection>\n'
        '  <VirtualSystem ovf:id="appliance">\n    <Info>A virtual machine</Info>\n'
        '    <OperatingSystemSection ovf:id="96"><Info>The kind of installed guest OS</Info>'
        '<Description>Debian_64</Description></OperatingSystemSection>\n'
        '  </VirtualSystem>\n</Envelope>\n'
    ).encode()


def vbox_ova(stem: str, disks: list[Path]) -> bytes:
    """An OVA as VirtualBox exports it: descriptor, stream-optimized disks, manifest."""
    names = [f"{stem}-disk{i:03d}.vmdk" for i in range(1, len(disks) + 1)]
    caps = [json.loads(run("qemu-img", "info", "--output=json", d).stdout)["virtual-size"] for d in disks]
    ovf = vbox_ovf(list(zip(names, caps)))
    members: list[tuple[str, bytes] | tarfile.TarInfo] = [(f"{stem}.ovf", ovf)]
    members += [(n, d.read_bytes()) for n, d in zip(names, disks)]
    mf = "".join(f"SHA256({n})= {sha256_file(d)}\n" for n, d in zip(names, disks))
    members.append((f"{stem}.mf", mf.encode()))
    return tar_of(members)


def stream_vmdk(tmp: Path, name: str, seed: int) -> Path:
    return make_image(tmp / name, "vmdk", 8 * MiB, opts="subformat=streamOptimized", seed=seed)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def xz_of_zeros(total: int, block: int = 64 * MiB) -> bytes:
    """A valid xz stream of ``total`` zero bytes, made fast: one compressed block repeated.

    xz's ratio tops out near 7000:1, so 64 GiB of zeros is about 10 MB of xz:
    no real xz stream of 100 KiB inflates that far.  Its index states the size.
    """
    one = lzma.compress(bytes(block), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=0)
    header, footer = one[:12], one[-12:]
    backward = (int.from_bytes(footer[4:8], "little") + 1) * 4
    index = one[-12 - backward:-12]
    body = one[12:-12 - backward]
    assert index[1] == 1  # one record: unpadded size, uncompressed size
    unpadded = index[2:].split(_varint(block))[0]
    n = total // block
    idx = b"\x00" + _varint(n) + (unpadded + _varint(block)) * n
    idx += bytes(-len(idx) % 4)
    idx += zlib.crc32(idx).to_bytes(4, "little")
    size_field = (len(idx) // 4 - 1).to_bytes(4, "little")
    flags = footer[8:10]
    return (header + body * n + idx + zlib.crc32(size_field + flags).to_bytes(4, "little")
            + size_field + flags + b"YZ")


def zstd_of_zeros_unstated(total: int) -> bytes:
    """A zstd stream of ``total`` zero bytes that does not state its size (as `zstd -` from a pipe)."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=1, write_content_size=False).stream_writer(out, closefd=False) as w:
        chunk = bytes(16 * MiB)
        for _ in range(total // len(chunk)):
            w.write(chunk)
    return out.getvalue()


def drop_bytes(spool: Spool, name: str, data: bytes) -> None:
    tmp = spool.incoming / f".{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, spool.incoming / name)


def workspace_reserved(cfg: Path) -> int | None:
    """What ``convd status --json`` says the daemon has reserved (None before its first snapshot)."""
    snap = json.loads(run(convd_bin(), "status", "-c", cfg, "--json").stdout)["daemon"]
    return snap["workspace"]["reserved"] if snap else None


def workspace_back_to_zero(cfg: Path) -> None:
    # The snapshot is rewritten every second: the last release shows up within one.
    wait_for(lambda: workspace_reserved(cfg) == 0, 10, interval=0.3, what="reserved workspace back to 0")


def config(tmp_path: Path, **limits: Any) -> Path:
    # min_free 0: the unpack reservations must not depend on the shared disk's free space.
    return write_config(tmp_path, limits={"min_free": 0, **limits})


# -- through the daemon ---------------------------------------------------------------------

def test_each_container_around_each_disk_format_publishes_the_disk_inside(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    qcow2 = make_image(src / "cloud.qcow2", "qcow2", 8 * MiB, seed=2)
    raw = make_image(src / "disk.raw", "raw", 8 * MiB, seed=3)
    vmdk = make_image(src / "disk.vmdk", "vmdk", 8 * MiB, seed=4)
    vpc = make_image(src / "disk.vhd", "vpc", 8 * MiB, seed=5)
    vhdx = make_image(src / "disk.vhdx", "vhdx", 8 * MiB, seed=6)
    gce = make_image(src / "gce.raw", "raw", 8 * MiB, seed=7)
    vbox = stream_vmdk(src, "vbox.vmdk", seed=8)
    # name: (bytes dropped, the disk inside, its format, container, member)
    cases = {
        "qcow2-xz": (compress("xz", qcow2.read_bytes()), qcow2, "qcow2", ["xz"], None),
        "raw-gz": (compress("gzip", raw.read_bytes()), raw, "raw", ["gzip"], None),
        "vmdk-zst": (compress("zstd", vmdk.read_bytes()), vmdk, "vmdk", ["zstd"], None),
        "img-bz2": (compress("bzip2", vpc.read_bytes()), vpc, "vpc", ["bzip2"], None),
        "tar-gz": (compress("gzip", tar_of([("README.txt", b"GCE image\n"), ("disk.raw", gce.read_bytes())])),
                   gce, "raw", ["gzip", "tar"], "disk.raw"),
        "tar": (tar_of([("disk.vhdx", vhdx.read_bytes()), ("notes.txt", b"hyper-v export\n")]),
                vhdx, "vhdx", ["tar"], "disk.vhdx"),
        "vbox-ova": (vbox_ova("appliance", [vbox]), vbox, "vmdk", ["ova"], "appliance-disk001.vmdk"),
        "vbox-ova-gz": (compress("gzip", vbox_ova("appliance", [vbox])), vbox, "vmdk", ["gzip", "ova"],
                        "appliance-disk001.vmdk"),
    }
    cfg = config(tmp_path)
    daemon_factory(cfg)
    for name, (data, *_rest) in cases.items():
        drop_bytes(spool, name, data)
    for name, (data, disk, fmt, kinds, member) in cases.items():
        rec = spool.wait_record(name)
        assert rec["status"] == ("passthrough" if fmt == "raw" else "converted"), rec
        src_rec = rec["source"]
        assert src_rec["container"] == kinds
        assert src_rec["format"] == fmt
        assert src_rec["size"] == len(data)  # the dropped file's size, not the disk's
        assert src_rec["unpacked_size"] == disk.stat().st_size
        assert src_rec.get("member") == member
        out = spool.outgoing / name
        assert images_equal(out, "raw", disk, fmt), name
        assert rec["target"]["checksums"]["sha256"] == sha256_file(out)
    spool.wait_work_empty()
    workspace_back_to_zero(cfg)


def test_containers_without_one_clean_disk_are_rejected_and_kept_and_bombs_are_too_large(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    d1, d2 = stream_vmdk(src, "a.vmdk", seed=1), stream_vmdk(src, "b.vmdk", seed=2)
    disk = make_image(src / "disk.qcow2", "qcow2", 4 * MiB).read_bytes()
    dotdot = tarfile.TarInfo("../../escaped.txt")
    dotdot.size = 0
    link = tarfile.TarInfo("disk.qcow2")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    absolute = tarfile.TarInfo("/tmp/absolute-escaped.txt")
    absolute.size = 0
    cases = {
        "two-disks": (vbox_ova("pair", [d1, d2]), "unsupported_format",
                      ["2 disks", "pair-disk001.vmdk", "pair-disk002.vmdk"]),
        "texts": (compress("xz", tar_of([("a.txt", b"hello\n"), ("b.md", b"# notes\n")])), "unsupported_format",
                  ["tar archive inside an xz-compressed stream", "no disk image", "a.txt"]),
        "two-raw": (tar_of([("one.img", bytes(2 * MiB)), ("two.img", b"\x01" * (2 * MiB))]),
                    "unsupported_format", ["one.img", "two.img"]),
        "dotdot": (tar_of([dotdot, ("disk.qcow2", disk)]), "unsafe_image", ["../../escaped.txt"]),
        "symlink": (tar_of([link]), "unsafe_image", ["link", "/etc/passwd"]),
        "absolute": (tar_of([("disk.qcow2", disk), absolute]), "unsafe_image", ["absolute path"]),
        "xz-bomb": (xz_of_zeros(64 << 30), "too_large", ["64.0 GiB", "max_virtual_size"]),
        "zstd-bomb": (zstd_of_zeros_unstated(1152 * MiB), "too_large", ["max_virtual_size"]),
        "nested": (compress("gzip", compress("xz", disk)), "unsupported_format",
                   ["xz-compressed stream inside a gzip-compressed stream"]),
        "cut-zstd": (compress("zstd", disk)[:-100], "corrupt_image", ["zstd-compressed stream is truncated"]),
        "lzma-alone": (lzma.compress(disk, format=lzma.FORMAT_ALONE), "unsupported_format",
                       ["a legacy .lzma stream (lzma_alone), not a disk image"]),
    }
    cfg = config(tmp_path, max_virtual_size="1GiB")
    daemon_factory(cfg)
    for name, (data, *_rest) in cases.items():
        drop_bytes(spool, name, data)
    for name, (data, code, words) in cases.items():
        rec = spool.wait_record(name, timeout=90)
        assert rec["status"] == "failed", rec
        assert rec["error"]["code"] == code, rec
        for w in words:
            assert w in rec["error"]["message"], rec["error"]["message"]
        assert "work/" not in rec["error"]["message"]
        assert rec["source"]["size"] == len(data)
        assert sha256_file(spool.failed / name) == hashlib.sha256(data).hexdigest()
    written = {f for _d, _s, files in os.walk(tmp_path) for f in files}
    assert not written & {"escaped.txt", "absolute-escaped.txt"}
    assert not Path("/tmp/absolute-escaped.txt").exists()
    spool.wait_work_empty()
    assert list(spool.outgoing.iterdir()) == []
    workspace_back_to_zero(cfg)


# -- convd convert and convd inspect --------------------------------------------------------------

def test_convert_takes_a_container_and_refuses_kinds_turned_off(tmp_path: Path) -> None:
    qcow2 = make_image(tmp_path / "d.qcow2", "qcow2", 4 * MiB)
    packed = tmp_path / "upload"
    packed.write_bytes(compress("zstd", tar_of([("d.qcow2", qcow2.read_bytes())])))
    p = run(convd_bin(), "convert", packed, tmp_path / "out.raw")
    rec = json.loads(p.stdout)
    assert rec["source"]["container"] == ["zstd", "tar"] and rec["source"]["member"] == "d.qcow2"
    assert images_equal(tmp_path / "out.raw", "raw", qcow2, "qcow2")

    off = write_config(tmp_path, convert={"containers": ["gzip", "xz"]})
    p = run(convd_bin(), "convert", packed, tmp_path / "out2.raw", "-c", off, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "convd: unsupported_format: a tar archive inside a zstd-compressed stream: unpacking zstd, tar "
        "is turned off ([convert] containers)")
    assert not (tmp_path / "out2.raw").exists()


def test_a_damaged_compressed_stream_is_corrupt_image(tmp_path: Path) -> None:
    qcow2 = make_image(tmp_path / "d.qcow2", "qcow2", 4 * MiB)
    cut = tmp_path / "cut"
    cut.write_bytes(compress("xz", qcow2.read_bytes())[:-100])
    p = run(convd_bin(), "convert", cut, tmp_path / "out.raw", check=False)
    assert p.returncode == 1
    assert "convd: corrupt_image: an xz-compressed stream cannot be unpacked" in p.stderr


def zstd_frames_unstated(data: bytes, frame: int = MiB) -> bytes:
    """``data`` as one zstd frame per ``frame`` bytes, none stating its size (as `zstd -` from a pipe)."""
    c = zstandard.ZstdCompressor(level=1, write_content_size=False)
    out = io.BytesIO()
    for i in range(0, len(data), frame):
        with c.stream_writer(out, closefd=False) as w:
            w.write(data[i:i + frame])
    return out.getvalue()


def test_a_cut_short_zstd_stream_is_corrupt_image_not_a_shorter_disk(tmp_path: Path) -> None:
    qcow2 = make_image(tmp_path / "d.qcow2", "qcow2", 4 * MiB)
    raw = tmp_path / "d.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, raw)
    for stated in (compress("zstd", raw.read_bytes()), zstd_frames_unstated(raw.read_bytes())):
        fd = os.open(_write(tmp_path / "whole", stated), os.O_RDONLY)
        whole = containers.plan(fd)
        os.close(fd)
        assert whole is not None and whole.kinds == ["zstd"]
        # Cut inside a block, at 20 bytes, halfway, and (unstated: four frames) between two frames' blocks.
        for cut in (len(stated) - 100, len(stated) // 2, 20, len(stated) - 3):
            fd = os.open(_write(tmp_path / "cut", stated[:cut]), os.O_RDONLY)
            try:
                with pytest.raises(CorruptImage, match="zstd-compressed stream is truncated"):
                    containers.plan(fd)
            finally:
                os.close(fd)
    # Through convert, and a qcow2 inside: the stream is blamed, not the qcow2 it cut short.
    for name, data in (("raw.zst", compress("zstd", raw.read_bytes())[:-100]),
                       ("qcow2.zst", zstd_frames_unstated(qcow2.read_bytes())[:-100])):
        p = run(convd_bin(), "convert", _write(tmp_path / name, data), tmp_path / f"{name}.out", check=False)
        assert p.returncode == 1
        assert "convd: corrupt_image: a zstd-compressed stream is truncated" in p.stderr, p.stderr
        assert not (tmp_path / f"{name}.out").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_v7_tar_and_a_zstd_stream_starting_with_a_skippable_frame_unpack(tmp_path: Path) -> None:
    qcow2 = make_image(tmp_path / "d.qcow2", "qcow2", 4 * MiB)
    run("tar", "--format=v7", "-cf", tmp_path / "v7", "-C", tmp_path, "d.qcow2")  # no ustar magic
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"pzstd"
    _write(tmp_path / "skip", skippable + compress("zstd", qcow2.read_bytes()))
    for name, container in (("v7", ["tar"]), ("skip", ["zstd"])):
        p = run(convd_bin(), "convert", tmp_path / name, tmp_path / f"{name}.raw")
        rec = json.loads(p.stdout)
        assert rec["status"] == "converted" and rec["source"]["container"] == container, rec
        assert images_equal(tmp_path / f"{name}.raw", "raw", qcow2, "qcow2")


def test_containers_convd_does_not_unpack_are_unsupported_format_never_raw(tmp_path: Path) -> None:
    disk = (tmp_path / "d.raw")
    disk.write_bytes(os.urandom(MiB))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(disk, "d.raw")
    lz4_frame = b"\x04\x22\x4d\x18\x64\x40\xa7" + (8).to_bytes(4, "little") + b"\x80" * 8 + bytes(4)
    cases = {
        "zip": zipped.getvalue(),
        "lz4": lz4_frame + bytes(MiB),
        "lzma": lzma.compress(disk.read_bytes(), format=lzma.FORMAT_ALONE),
        "7z": b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(MiB),
        "cpio": b"070701" + b"0" * 104 + b"d.raw\x00" + bytes(MiB),
    }
    for kind, data in cases.items():
        path = _write(tmp_path / f"upload-{kind}", data)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(UnsupportedFormat, match="not a disk image") as err:
                containers.plan(fd)
        finally:
            os.close(fd)
        assert err.value.detected == kind
    # lz4 shares zstd's skippable frames: one of those first, then an lz4 frame, is still lz4.
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"meta"
    fd = os.open(_write(tmp_path / "upload-skip-lz4", skippable + cases["lz4"]), os.O_RDONLY)
    try:
        with pytest.raises(UnsupportedFormat, match="an lz4-compressed stream, not a disk image"):
            containers.plan(fd)
    finally:
        os.close(fd)
    for kind in ("zip", "lzma"):
        p = run(convd_bin(), "convert", tmp_path / f"upload-{kind}", tmp_path / "out.raw", check=False)
        assert p.returncode == 1 and "convd: unsupported_format: a " in p.stderr, p.stderr
        assert not (tmp_path / "out.raw").exists()
    # Inside a stream convd does unpack, just the same.
    p = run(convd_bin(), "convert", _write(tmp_path / "zip.gz", compress("gzip", cases["zip"])),
            tmp_path / "out.raw", check=False)
    assert "unsupported_format: a zip archive inside a gzip-compressed stream" in p.stderr, p.stderr


def test_raw_disks_starting_with_arbitrary_bytes_are_not_taken_for_containers() -> None:
    rng = random.Random(9)
    heads = [rng.randbytes(512) for _ in range(20000)]
    heads += [bytes(512), b"\xeb\x63\x90" + rng.randbytes(509), b"\xfa\x31\xc0" + rng.randbytes(509)]
    heads += [b"hsqs" + rng.randbytes(508), bytes(1024)[:512]]  # squashfs: a filesystem image is a raw disk
    for head in heads:
        assert containers.sniff(head) is None
        assert containers.foreign(head) is None


def test_an_ova_holding_its_disk_twice_is_refused_and_a_percent_encoded_href_finds_its_member(
    tmp_path: Path
) -> None:
    old, new = stream_vmdk(tmp_path, "old.vmdk", seed=1), stream_vmdk(tmp_path, "new.vmdk", seed=2)
    ovf = vbox_ovf([("x-disk001.vmdk", 8 * MiB)])
    # As `tar -r` leaves it: a newer copy appended; tar xf would give the last, a stream reader the first.
    dup = tar_of([("x.ovf", ovf), ("x-disk001.vmdk", old.read_bytes()), ("x.mf", b""),
                  ("x-disk001.vmdk", new.read_bytes())])
    p = run(convd_bin(), "convert", _write(tmp_path / "dup", dup), tmp_path / "dup.raw", check=False)
    assert p.returncode == 1 and not (tmp_path / "dup.raw").exists()
    assert p.stderr.strip().splitlines()[-1] == (
        "convd: unsupported_format: an OVA appliance (a tar with an OVF descriptor) holds the disk its "
        "descriptor references, 'x-disk001.vmdk', more than once; convd converts an appliance whose disk "
        "is there once")

    pct = tar_of([("x.ovf", vbox_ovf([("my%20disk.vmdk", 8 * MiB)])), ("my disk.vmdk", new.read_bytes())])
    p = run(convd_bin(), "convert", _write(tmp_path / "pct", pct), tmp_path / "pct.raw")
    assert json.loads(p.stdout)["source"]["member"] == "my disk.vmdk"
    assert images_equal(tmp_path / "pct.raw", "raw", new, "vmdk")


def test_an_ova_or_tar_cut_between_or_inside_members_is_a_truncated_archive(tmp_path: Path) -> None:
    disk = stream_vmdk(tmp_path, "d.vmdk", seed=3)
    ova = vbox_ova("x", [disk])
    ovf_end = 512 + (len(vbox_ovf([("x-disk001.vmdk", 8 * MiB)])) + 511) // 512 * 512
    cases = {
        "between": (ova[:ovf_end], "is a truncated archive"),  # after the OVF, before the disk's header
        "between.gz": (compress("gzip", ova[:ovf_end]), "is a truncated archive"),
        "no-end-blocks": (ova.rstrip(b"\x00"), "truncated"),
        "inside-disk": (ova[:ovf_end + 512 + 4096], "truncated"),
        "tar-inside-member": (tar_of([("disk.img", bytes(2 * MiB))])[:MiB], "truncated"),
    }
    for name, (data, words) in cases.items():
        p = run(convd_bin(), "convert", _write(tmp_path / name, data), tmp_path / f"{name}.raw", check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("convd: corrupt_image: ") and words in last, (name, last)
        assert not (tmp_path / f"{name}.raw").exists()


def test_bytes_after_a_gzip_or_xz_stream_that_are_not_another_stream_are_corrupt_image(tmp_path: Path) -> None:
    disk = os.urandom(64 << 10) + bytes(MiB)
    cases = {
        "garbage.gz": compress("gzip", disk) + b"garbage from a careless upload\n",
        "lzma-after.xz": compress("xz", disk) + lzma.compress(disk, format=lzma.FORMAT_ALONE),
    }
    for name, data in cases.items():
        p = run(convd_bin(), "convert", _write(tmp_path / name, data), tmp_path / f"{name}.raw", check=False)
        assert p.returncode == 1 and "corrupt_image" in p.stderr
        assert "bytes after the end of the" in p.stderr and "that are not another" in p.stderr, p.stderr


def test_inspect_reports_a_container_for_what_it_is(tmp_path: Path) -> None:
    ova = tmp_path / "appliance"
    ova.write_bytes(compress("gzip", vbox_ova("x", [stream_vmdk(tmp_path, "x.vmdk", seed=1)])))
    p = run(convd_bin(), "inspect", "--json", ova, check=False)
    out = json.loads(p.stdout)
    assert p.returncode == 1
    assert out["format"] == "gzip+ova" and out["code"] == "unsupported_format"
    assert "an OVA appliance (a tar with an OVF descriptor) inside a gzip-compressed stream" in out["reasons"][0]


@pytest.mark.parametrize("case, fmt", [("appliance.ova", "vmdk"), ("cloudimg.qcow2.xz", "qcow2")])
def test_field_container_cases_convert_to_the_disk_inside(tmp_path: Path, case: str, fmt: str) -> None:
    # The field generator, vendored beside the other field cases (tests/test_field.py).
    run(sys.executable, REPO / "tests" / "data" / "field" / "make_cases.py", tmp_path, case)
    p = run(convd_bin(), "convert", tmp_path / case, tmp_path / "out.raw")
    rec = json.loads(p.stdout)
    assert rec["status"] == "converted" and rec["source"]["format"] == fmt
    inner = tmp_path / "inner"
    if case.endswith(".ova"):
        with tarfile.open(tmp_path / case) as tf:
            member = tf.extractfile(rec["source"]["member"])
            assert member is not None
            inner.write_bytes(member.read())
    else:
        inner.write_bytes(lzma.decompress((tmp_path / case).read_bytes()))
    assert images_equal(tmp_path / "out.raw", "raw", inner, fmt)


# -- the parts on their own ------------------------------------------------------------------

def test_ovf_with_an_entity_is_refused_by_the_hardened_parser() -> None:
    evil = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x "disk.vmdk">]>'
            b'<Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>'
            b'<File ovf:id="f" ovf:href="&x;"/></References></Envelope>')
    with pytest.raises(UnsafeImage, match="refused XML"):
        containers.ovf_disks(evil)


def test_signatures_are_read_from_content_and_a_tar_needs_a_valid_checksum() -> None:
    head = tar_of([("x.ovf", b"<Envelope/>")])[:512]
    assert containers.sniff(head) == "ova"
    assert containers.sniff(tar_of([("disk.img", b"x")])[:512]) == "tar"
    assert containers.sniff(head[:148] + b"0000000\x00" + head[156:]) is None  # checksum off
    assert containers.sniff(compress("bzip2", b"x")[:512] + bytes(512)) == "bzip2"
    assert containers.sniff(b"BZh9 not really bzip2" + bytes(512)) is None
    assert containers.sniff(b"QFI\xfb" + bytes(508)) is None


# -- crash safety -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_unpacking_ten_times_publishes_once_and_identical(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as fh:  # 256 MiB: a quarter random, so unpacking takes a while
        for i in range(64):
            fh.write(os.urandom(MiB) + bytes([i + 1]) * MiB + bytes(2 * MiB))
    data = compress("gzip", raw.read_bytes())
    cfg = config(tmp_path)
    unpacked = spool.work / INSTANCE / "big" / UNPACKED
    kills = partial = 0
    while kills < 10:
        d = daemon_factory(cfg, ready=kills == 0)
        if kills == 0:
            drop_bytes(spool, "big", data)
        wait_for(lambda d=d: unpacked.exists() or spool.record("big") or d.proc.poll() is not None, 60,
                 interval=0.01, what="unpacking to start")
        if spool.record("big"):
            break
        d.kill_group()
        kills += 1
        try:
            partial += unpacked.stat().st_size < raw.stat().st_size
        except FileNotFoundError:
            pass
    assert kills == 10, f"unpacking finished before the {kills + 1}th kill"
    assert partial, "no kill landed while the disk was half unpacked"
    d = daemon_factory(cfg)
    rec = spool.wait_record("big", timeout=90)
    d.stop()
    assert rec["status"] == "passthrough" and rec["source"]["container"] == ["gzip"]
    assert sha256_file(spool.outgoing / "big") == sha256_file(raw) == rec["target"]["checksums"]["sha256"]
    assert sorted(p.name for p in spool.outgoing.iterdir()) == ["big", "big.json"]
    assert list(spool.failed.iterdir()) == []
    spool.wait_work_empty()



def test_concatenated_gzip_members_and_padded_xz_streams_unpack_as_one_disk(tmp_path: Path) -> None:
    raw = make_image(tmp_path / "d.raw", "raw", 4 * MiB).read_bytes()
    half = len(raw) // 2
    cases = {
        "members.gz": compress("gzip", raw[:half]) + compress("gzip", raw[half:]),  # `cat a.gz b.gz`, pigz
        "streams.xz": compress("xz", raw[:half]) + bytes(8) + compress("xz", raw[half:]),  # stream padding
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        rec = json.loads(run(convd_bin(), "convert", tmp_path / name, tmp_path / f"{name}.raw").stdout)
        assert rec["status"] == "passthrough" and rec["source"]["unpacked_size"] == len(raw)
        assert (tmp_path / f"{name}.raw").read_bytes() == raw
    cut = tmp_path / "cut.gz"
    cut.write_bytes(cases["members.gz"][:-20])
    p = run(convd_bin(), "convert", cut, tmp_path / "cut.raw", check=False)
    assert p.returncode == 1 and "convd: corrupt_image: a gzip-compressed stream cannot be unpacked" in p.stderr


def test_a_reservation_grows_only_into_free_workspace_and_shrinking_admits_waiters(tmp_path: Path) -> None:
    import anyio

    from convd.pipeline.ledger import Ledger, StatvfsSpace

    async def main() -> None:
        ledger = Ledger(workspace=100 * MiB, min_free=0, space=StatvfsSpace(str(tmp_path)))
        await ledger.reserve("unpack", 40 * MiB)
        await ledger.reserve("other", 40 * MiB)
        assert ledger.resize("unpack", 60 * MiB)  # 20 MiB were free
        assert not ledger.resize("unpack", 61 * MiB)  # never queues, never overbooks
        assert ledger.reserved == 100 * MiB
        waiter: list[Any] = []

        async def wait_for_space() -> None:
            waiter.append(await ledger.reserve("late", 30 * MiB))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_space)
            await anyio.sleep(0.05)
            assert not waiter
            assert ledger.resize("unpack", 30 * MiB)  # done: only the bytes written stay reserved
        assert waiter and ledger.reserved == 100 * MiB

    anyio.run(main)
