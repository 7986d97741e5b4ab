"""Per-format metadata checks the inspector leaves to its callers.

oslo's ``format_inspector`` reads a header and answers "which format, how
big, anything dangerous in the header".  Before a conversion may be called
faithful convd must also know that qemu-img will read the disk that was
uploaded: every allocation-table entry points inside the file (a truncated
upload reads back as zeros otherwise), the format does not flag itself as
broken, no parent disk holds part of the data, and the virtual size is the
one qemu-img will convert.  Everything here reads metadata only (headers,
tables, grain markers), with bounded reads, never guest data.

Sources of the rules are qemu 7.2's block drivers (``block/qcow2*.c``,
``block/vmdk.c``, ``block/vdi.c``, ``block/vpc.c``, ``block/vhdx*.c``) and
the format specifications they implement.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import struct
import sys
import threading
import uuid
import zlib
from array import array
from collections.abc import Iterator

import zstandard

from convd.errors import CorruptImage, Stopped, UnsafeImage, UnsupportedFormat
from convd.image.signatures import DELTA
from convd.units import format_size

__all__ = ["MAGICS", "SIZE_RULE_CHS", "SIZE_RULE_CURRENT", "cut_short_header", "verify", "vmdk_descriptor",
           "vpc_footer", "vpc_size_rule", "vpc_virtual_size"]

_SECTOR = 512
# Tables are read in slices of this many bytes (a table is metadata, but a
# 4 TiB image's qcow2 L2 tables or VMDK grain tables are hundreds of MiB).
_SLICE = 1 << 20


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class _File:
    """Bounded reads of an open image; anything past the end is corruption."""

    def __init__(self, fd: int, size: int, fmt: str, stop: threading.Event | None) -> None:
        self.fd, self.size, self.fmt, self.stop = fd, size, fmt, stop
        # Data extents past the end: counted through the whole table, so the
        # message can say how much is missing, not just the first miss.
        self.missing = 0
        self.first_missing = ""
        self.farthest = 0

    def data_past_end(self, what: str, end: int) -> None:
        """Note a data extent (guest bytes) that ends past the end of the file."""
        if not self.missing:
            self.first_missing = what
        self.missing += 1
        self.farthest = max(self.farthest, end)

    def raise_missing(self) -> None:
        if self.missing:
            extents = "data extent points" if self.missing == 1 else "data extents point"
            raise self.corrupt(
                f"{self.missing} {extents} past the end of the file ({format_size(self.size)}), up to "
                f"{format_size(self.farthest - self.size)} past it; the first is "
                f"{self.first_missing.rstrip(',')}: the upload is truncated or the metadata is damaged")

    def corrupt(self, message: str) -> CorruptImage:
        return CorruptImage(f"{self.fmt}: {message}", detected=self.fmt)

    def past_end(self, what: str, end: int) -> CorruptImage:
        over = end - self.size
        return self.corrupt(f"{what} points {format_size(over)} past the end of the file "
                            f"({format_size(self.size)}): the upload is truncated or the metadata is damaged")

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.past_end(what, offset + length)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:  # the file shrank under us
            raise self.past_end(what, offset + length)
        return data

    def slices(self, offset: int, length: int, what: str, item: int) -> Iterator[tuple[int, bytes]]:
        """``(index of the first item, bytes)`` for a table of ``length`` bytes, ``_SLICE`` at a time."""
        if offset < 0 or offset + length > self.size:
            raise self.past_end(what, offset + length)
        step = _SLICE - _SLICE % item
        for start in range(0, length, step):
            if self.stop is not None and self.stop.is_set():
                raise Stopped("integrity check interrupted by shutdown")
            yield start // item, self.read(offset + start, min(step, length - start), what)


_NATIVE_BIG = sys.byteorder == "big"


def _table(data: bytes, code: str, big_endian: bool) -> array:
    """A table of unsigned integers (``code`` "I": 32-bit, "Q": 64-bit) in the file's byte order."""
    table = array(code, data)
    if big_endian != _NATIVE_BIG:
        table.byteswap()
    return table


@functools.lru_cache(maxsize=64)
def _bytes_without(mask: int) -> bytes:
    """Every byte value with none of ``mask``'s bits set (a ``translate`` deletion table)."""
    return bytes(v for v in range(256) if not v & mask)


def _qcow2_plain_table(raw: bytes, cluster_bits: int) -> bool:
    """Whether every entry of a big-endian standard L2 table is plain: no compressed
    flag, no reserved bits, offsets cluster-aligned (bit 0, "reads as zeros", allowed).

    Byte slices and ``translate`` keep this at C speed: the common case of a
    large image costs no Python loop per entry.
    """
    if raw[0::8].translate(None, b"\x00\x80"):  # bits 56-62: reserved, compressed
        return False
    for k in range((cluster_bits + 7) // 8):  # byte 7 - k holds bits 8k .. 8k+7
        width = min(cluster_bits - 8 * k, 8)
        mask = (1 << width) - 1
        if k == 0:
            mask &= ~1
        if raw[7 - k::8].translate(None, _bytes_without(mask)):
            return False
    return True


def _used(data: bytes, item: int) -> bytes:
    """``data`` without its trailing all-zero entries of ``item`` bytes: tables
    fill from the front, so a small image's mostly empty table costs no Python
    loop over its unused tail."""
    end = len(data.rstrip(b"\0"))
    return data[:-(-end // item) * item]


def _u32_table(data: bytes, big_endian: bool) -> array:
    return _table(data, "I", big_endian)


def _u64_table(data: bytes, big_endian: bool) -> array:
    return _table(data, "Q", big_endian)


# --------------------------------------------------------------------------- qcow2
# docs/interop/qcow2.txt; qcow2.c qcow2_do_open, qcow2-refcount.c check_refcounts_l1/l2.

# Incompatible feature bits (qcow2.txt, "incompatible_features").
# Allowed (docs/operations.md says why): dirty (lazy refcounts; reads use
# only L1/L2), compression type (zstd, qemu >= 5.1), extended L2
# (subclusters, qemu >= 5.2).  Corrupt is rejected; data file is the
# inspector's (unsafe); any other bit is unknown to qemu-img 7.2.
_QCOW2_DIRTY, _QCOW2_CORRUPT, _QCOW2_DATA_FILE, _QCOW2_COMPRESSION, _QCOW2_EXTL2 = (1 << b for b in range(5))
_L1_OFFSET = 0x00FFFFFFFFFFFE00
_L2_OFFSET = 0x00FFFFFFFFFFFE00
_L2_COMPRESSED = 1 << 62
_QCOW_MAX_L1_BYTES = 32 << 20  # qcow2.h QCOW_MAX_L1_SIZE
_QCOW_MAX_REFTABLE_BYTES = 8 << 20  # qcow2.h QCOW_MAX_REFTABLE_SIZE


def _qcow2(f: _File) -> int:
    h = f.read(0, 104 if f.size >= 104 else 72, "qcow2 header")
    (_magic, version, bf_off, bf_len, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     _nb_snap, _snap_off) = struct.unpack(">4sIQIIQIIQQIIQ", h[:72])
    if version not in (2, 3):
        raise f.corrupt(f"unknown qcow2 version {version} (qemu-img reads 2 and 3)")
    if not 9 <= cluster_bits <= 21:
        raise f.corrupt(f"cluster size 2^{cluster_bits} is outside qcow2's 512 B to 2 MiB")
    cluster = 1 << cluster_bits
    if bf_off and (bf_len == 0 or bf_len > 1023 or bf_off + bf_len > min(cluster, f.size)):
        # qcow2.c: "Invalid backing file offset" / "Backing file name too long"
        raise f.corrupt(f"backing file name field ({bf_len} bytes at {bf_off:#x}) is impossible")
    incompat, refcount_order, header_len = 0, 4, 72
    if version == 3:
        if len(h) < 104:
            raise f.past_end("qcow2 version 3 header", 104)
        incompat, = struct.unpack(">Q", h[72:80])
        refcount_order, header_len = struct.unpack(">II", h[96:104])
        if header_len < 104 or header_len > cluster or header_len % 8:
            raise f.corrupt(f"header length {header_len} is impossible for cluster size {cluster}")
        if refcount_order > 6:
            raise f.corrupt(f"refcount_order {refcount_order} is over qcow2's 6")
    if incompat & _QCOW2_CORRUPT:
        raise f.corrupt("the image is marked corrupt (incompatible feature bit 1): qemu found its "
                        "metadata inconsistent and stopped writing to it")
    unknown = incompat & ~(_QCOW2_DIRTY | _QCOW2_CORRUPT | _QCOW2_DATA_FILE | _QCOW2_COMPRESSION | _QCOW2_EXTL2)
    if unknown:
        raise f.corrupt(f"unknown incompatible feature bits {unknown:#x} (qemu-img 7.2 cannot read it)")
    ctype = 0
    if incompat & _QCOW2_COMPRESSION and header_len > 104:
        ctype = f.read(104, 1, "qcow2 compression type")[0]
        if ctype not in (0, 1):
            raise f.corrupt(f"unknown compression type {ctype} (zlib is 0, zstd 1)")
    if crypt not in (0, 1, 2):
        raise f.corrupt(f"unknown encryption method {crypt}")
    if crypt:
        raise UnsupportedFormat(f"qcow2 is encrypted ({'AES' if crypt == 1 else 'LUKS'}): convd holds no keys",
                                detected="qcow2")
    if size % _SECTOR and size > 0:
        # qcow2.c: bs->total_sectors = header.size / BDRV_SECTOR_SIZE, on every
        # qemu version; qemu-img cannot be told otherwise, so the tail would be lost.
        raise f.corrupt(f"virtual size {size} is not a whole number of 512-byte sectors: qemu-img would "
                        f"drop its last {size % _SECTOR} bytes")
    extended = bool(incompat & _QCOW2_EXTL2)
    if extended and cluster_bits < 14:
        raise f.corrupt(f"extended L2 entries need clusters of 16 KiB or more, not {cluster}")
    entry_bytes = 16 if extended else 8
    l2_entries = cluster // entry_bytes
    needed_l1 = -(-size // (l2_entries * cluster))
    if l1_size < needed_l1:
        raise f.corrupt(f"L1 table has {l1_size} entries; a {size}-byte disk needs {needed_l1}")
    if l1_size * 8 > _QCOW_MAX_L1_BYTES:
        raise f.corrupt(f"L1 table of {l1_size} entries is over qemu's limit")
    if l1_off % cluster or rt_off % cluster:
        raise f.corrupt("L1 or refcount table offset is not cluster-aligned")
    if rt_clusters * cluster > _QCOW_MAX_REFTABLE_BYTES or rt_clusters == 0:
        raise f.corrupt(f"refcount table of {rt_clusters} clusters is impossible")
    if incompat & _QCOW2_DATA_FILE:
        return size  # the data lives in another file: the inspector rejects it as unsafe
    # A dirty image (lazy refcounts) skips `qemu-img check` (its refcounts
    # lag by design), so the overlaps check would catch are checked here:
    # no data cluster may lie on the image's own metadata.
    meta = _Clusters(f.size, cluster_bits) if incompat & _QCOW2_DIRTY else None
    if meta is not None:
        meta.add(0, cluster, "header")
        meta.add(l1_off, l1_size * 8, "L1 table")
        meta.add(rt_off, rt_clusters * cluster, "refcount table")
        _qcow2_snapshot_metadata(f, meta, h)
    # Refcount table → refcount blocks: metadata qemu-img check and every writer rely on.
    for first, data in f.slices(rt_off, rt_clusters * cluster, "qcow2 refcount table", 8):
        for i, entry in enumerate(_u64_table(_used(data, 8), True)):
            block = entry & ~0x1FF
            if block:
                if block % cluster:
                    raise f.corrupt(f"refcount table entry {first + i} ({block:#x}) is not cluster-aligned")
                if block + cluster > f.size:
                    raise f.past_end(f"refcount table entry {first + i} (block at {block:#x})", block + cluster)
                if meta is not None:
                    meta.add(block, cluster, "refcount block")
    # Active L1 → L2 tables → data clusters: what qemu-img convert reads.
    l1 = _u64_table(f.read(l1_off, l1_size * 8, "qcow2 L1 table"), True) if l1_size else array("Q")
    span = l2_entries * cluster  # guest bytes per L2 table
    sub = cluster // 32
    comp_bits = 62 - (cluster_bits - 8)
    comp_mask = (1 << comp_bits) - 1
    comp_sectors_mask = (1 << (cluster_bits - 8)) - 1
    # Each L2 table is read once: two L1 entries sharing one is corruption, and
    # the work stays bounded by the file's size whatever the header claims.
    seen_l2 = bytearray((f.size >> cluster_bits) // 8 + 1)
    if meta is not None:
        for l1e in l1:
            if l1e & _L1_OFFSET and (l1e & _L1_OFFSET) + cluster <= f.size:
                meta.add(l1e & _L1_OFFSET, cluster, "L2 table")
    for i, l1e in enumerate(l1):
        l2_off = l1e & _L1_OFFSET
        if not l2_off:
            continue
        if l2_off % cluster:
            raise f.corrupt(f"L1 entry {i} points to an unaligned L2 table at {l2_off:#x}")
        if l2_off + cluster > f.size:
            raise f.past_end(f"L1 entry {i} (L2 table at {l2_off:#x})", l2_off + cluster)
        n = l2_off >> cluster_bits
        if seen_l2[n >> 3] & (1 << (n & 7)):
            raise f.corrupt(f"L1 entry {i} points to an L2 table ({l2_off:#x}) another L1 entry uses")
        seen_l2[n >> 3] |= 1 << (n & 7)
        if f.stop is not None and f.stop.is_set():
            raise Stopped("integrity check interrupted by shutdown")
        raw = f.read(l2_off, cluster, "qcow2 L2 table")
        if meta is None and not extended and _qcow2_plain_table(raw, cluster_bits):
            flat = bytearray(raw)
            flat[0::8] = bytes(len(flat) // 8)  # drop the "copied" flags
            if max(_u64_table(bytes(flat), True)) + cluster <= f.size:
                continue  # every data cluster of this table lies whole inside the file
        l2 = _u64_table(_used(raw, entry_bytes), True)
        if not any(l2):
            continue
        base = i * span
        for j in range(len(l2) * 8 // entry_bytes):
            e = l2[j * 2] if extended else l2[j]
            if not e & ~(1 << 63):
                continue
            guest = base + j * cluster
            where = f"L2 entry {j} of table {i} (guest offset {guest:#x})"
            if e & _L2_COMPRESSED:
                host = e & comp_mask
                # qcow2.c qcow2_parse_compressed_l2_entry: the data ends with
                # its last sector; qemu reads it zero-filled past the file's
                # end, so a stream cut inside that sector must be decoded to
                # know whether its end is in the file.
                end = (host & ~0x1FF) + (((e >> comp_bits) & comp_sectors_mask) + 1) * _SECTOR
                if meta is not None:
                    meta.check(host, min(end, f.size) - host, where, f)
                if end > f.size and (host >= f.size or not _qcow2_cluster_decodes(f, host, cluster, ctype)):
                    f.data_past_end(f"{where}, a compressed cluster at {host:#x},", end)
                continue
            host = e & _L2_OFFSET
            if not host:
                continue
            if host % cluster:
                raise f.corrupt(f"{where} points to an unaligned cluster at {host:#x}")
            if meta is not None and host < f.size:
                meta.check(host, cluster, where, f)
            if extended:
                alloc = l2[j * 2 + 1] & 0xFFFFFFFF
                need = alloc.bit_length() * sub if alloc else 1
            elif e & 1:  # preallocated zero cluster: not read, but qemu-img check counts it
                need = 1
            else:
                need = cluster
            # Past the disk's end only the cluster's start must exist; at the
            # end, only the bytes the guest can read.
            need = 1 if guest >= size else min(need, size - guest)
            if host + need > f.size:
                f.data_past_end(f"{where}, a data cluster at {host:#x},", host + need)
    return size


class _Clusters:
    """Which clusters of a file hold metadata, and what each is (a bitmap plus names)."""

    def __init__(self, size: int, cluster_bits: int) -> None:
        self.bits, self.size = cluster_bits, size
        self.map = bytearray((size >> cluster_bits) // 8 + 1)
        self.names: dict[int, str] = {}

    def _range(self, offset: int, length: int) -> range:
        last = min(offset + max(length, 1), self.size) - 1
        return range(offset >> self.bits, (last >> self.bits) + 1)

    def add(self, offset: int, length: int, what: str) -> None:
        if offset >= self.size:
            return  # past the end: the bounds checks report it
        for n in self._range(offset, length):
            self.map[n >> 3] |= 1 << (n & 7)
            self.names.setdefault(n, what)

    def check(self, offset: int, length: int, where: str, f: _File) -> None:
        for n in self._range(offset, length):
            if self.map[n >> 3] & (1 << (n & 7)):
                raise f.corrupt(f"{where} points to data at {offset:#x}, over the "
                                f"{self.names.get(n, 'metadata')} (cluster {n})")


def _qcow2_snapshot_metadata(f: _File, meta: _Clusters, h: bytes) -> None:
    """Mark the snapshot table and the snapshots' L1 tables (qcow2.txt "Snapshot table")."""
    count, offset = struct.unpack(">IQ", h[60:72])
    at = offset
    for k in range(min(count, 65536)):
        entry = f.read(at, 40, f"qcow2 snapshot {k}")
        l1_off, l1_size, id_len, name_len = struct.unpack(">QIHH", entry[:16])
        extra, = struct.unpack(">I", entry[36:40])
        meta.add(l1_off, l1_size * 8, f"L1 table of snapshot {k}")
        at += _round_up(40 + extra + id_len + name_len, 8)
    if count:
        meta.add(offset, at - offset, "snapshot table")


def _qcow2_cluster_decodes(f: _File, host: int, cluster: int, ctype: int) -> bool:
    """Whether the compressed cluster at ``host`` decodes to a whole cluster from
    the file's bytes alone (qcow2-threads.c: zlib raw deflate, or zstd)."""
    data = f.read(host, f.size - host, "qcow2 compressed cluster")
    try:
        if ctype == 1:
            out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read(cluster)
        else:
            out = zlib.decompressobj(-12).decompress(data, cluster)
    except (zlib.error, zstandard.ZstdError):
        return False
    return len(out) == cluster


# --------------------------------------------------------------------------- VMDK
# VMware's "Virtual Disk Format 5.0" (hosted sparse extents, stream-optimized);
# block/vmdk.c vmdk_open_vmdk4, get_cluster_offset, vmdk_read_extent.

_VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_VMDK_FLAG_ZERO_GRAIN = 1 << 2
_VMDK_FLAG_COMPRESSED = 1 << 16
_VMDK_FLAG_MARKERS = 1 << 17


def _vmdk_descriptor_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and k.strip().lower() == key.lower():
            return v.strip().strip('"')
    return None


def vmdk_descriptor(fd: int, size: int) -> str:
    """The VMDK's descriptor text (embedded after a sparse header, or the whole small file)."""
    head = os.pread(fd, 64, 0)
    if head[:4] == b"KDMV":
        desc_sec, desc_num = struct.unpack("<QQ", head[28:44])
        length = min(desc_num * _SECTOR, (1 << 20) - 1)
        raw = os.pread(fd, length, desc_sec * _SECTOR) if desc_sec else b""
    else:
        raw = os.pread(fd, min(size, (1 << 20) - 1), 0)
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def _vmdk(f: _File) -> int | None:
    if os.pread(f.fd, 4, 0) != b"KDMV":
        return None  # a descriptor alone: its extents are in other files (the inspector's to refuse)
    h = f.read(0, 512, "VMDK header")
    (_m, version, flags, capacity, grain, _ds, _dn, gtes, _rgd, gd, overhead) = struct.unpack(
        "<4sIIQQQQIQQQ", h[:72])
    if gd == _VMDK_GD_AT_END:
        footer = f.read(f.size - 1024, 512, "VMDK footer")
        if footer[:4] != b"KDMV":
            raise f.corrupt("grain directory is in a footer, but there is no footer at the end")
        flags, capacity, grain = struct.unpack("<IQQ", footer[8:28])
        gtes, = struct.unpack("<I", footer[44:48])
        gd, = struct.unpack("<Q", footer[56:64])
    if version > 3:
        raise f.corrupt(f"unknown VMDK version {version}")
    if grain == 0 or grain & (grain - 1) or grain > 0x200000:
        raise f.corrupt(f"grain size of {grain} sectors is impossible")
    if gtes == 0 or gtes > 512:
        raise f.corrupt(f"{gtes} entries per grain table is impossible (qemu reads up to 512)")
    grain_bytes = grain * _SECTOR
    vsize = capacity * _SECTOR
    gd_entries = -(-capacity // (grain * gtes))
    if gd_entries * 4 > 512 << 20:
        raise f.corrupt(f"grain directory of {gd_entries} entries is over qemu's limit")
    desc = vmdk_descriptor(f.fd, f.size)
    parent_cid = _vmdk_descriptor_field(desc, "parentCID")
    hint = _vmdk_descriptor_field(desc, "parentFileNameHint")
    if hint or (parent_cid is not None and parent_cid.lower() != "ffffffff"):
        raise UnsafeImage(f"VMDK is a delta disk, {DELTA} {hint or '(no name given)'} "
                          f"(parentCID {parent_cid}): upload the consolidated disk (vmware-vdiskmanager -r, "
                          "or delete the snapshots)", detected="vmdk")
    compressed = bool(flags & _VMDK_FLAG_COMPRESSED)
    markers = bool(flags & _VMDK_FLAG_MARKERS)
    zero_grain = bool(flags & _VMDK_FLAG_ZERO_GRAIN)
    directory = _u32_table(f.read(gd * _SECTOR, gd_entries * 4, "VMDK grain directory"), False)
    seen_gt: set[int] = set()  # each grain table read once (the file bounds how many there are)
    for i, gt_sec in enumerate(directory):
        if not gt_sec:
            continue
        table = _u32_table(f.read(gt_sec * _SECTOR, gtes * 4, f"VMDK grain directory entry {i}"), False)
        if gt_sec in seen_gt:
            raise f.corrupt(f"grain directory entry {i} points to a grain table another entry uses")
        seen_gt.add(gt_sec)
        if f.stop is not None and f.stop.is_set():
            raise Stopped("integrity check interrupted by shutdown")
        # Entry 1 means "zeroed" only with the zero-grain flag (vmdk.c
        # VMDK_GTE_ZEROED); without it, qemu reads sector 1: the metadata.
        low = 1 if zero_grain else 0
        if not compressed and max(table) * _SECTOR + grain_bytes <= f.size and \
                min((sec for sec in table if sec > low), default=overhead) >= overhead:
            continue  # every grain of this table lies whole inside the file, after the metadata
        for j, sec in enumerate(table):
            if sec == 0 or (sec == 1 and zero_grain):
                continue
            guest = (i * gtes + j) * grain_bytes
            start = sec * _SECTOR
            where = f"grain table {i} entry {j} (guest offset {guest:#x})"
            if sec < overhead:  # the guest would read the header, descriptor or tables
                raise f.corrupt(f"{where} points into the metadata at the start of the file "
                                f"(sector {sec}; grains start at {overhead})")
            if compressed and markers:
                if start + 12 > f.size:
                    f.data_past_end(f"{where}, a compressed grain,", start + 12)
                    continue
                lba, length = struct.unpack("<QI", f.read(start, 12, f"{where}, a grain marker,"))
                if lba != guest // _SECTOR:
                    raise f.corrupt(f"{where} points to a grain marker for sector {lba}, "
                                    f"not {guest // _SECTOR}")
                if length == 0 or length > 2 * grain_bytes + _SECTOR:
                    raise f.corrupt(f"{where}: a compressed grain of {length} bytes is impossible")
                if start + 12 + length > f.size:
                    f.data_past_end(f"{where}, a compressed grain,", start + 12 + length)
            elif compressed:
                if start >= f.size:
                    f.data_past_end(f"{where}, a compressed grain,", start + 1)
            else:
                need = min(grain_bytes, max(1, vsize - guest))
                if start + need > f.size:
                    f.data_past_end(f"{where}, a grain at {start:#x},", start + need)
    return vsize


# --------------------------------------------------------------------------- VDI
# block/vdi.c vdi_open, vdi_check (the VirtualBox 1.1 header).

_VDI_UNALLOCATED = 0xFFFFFFFE  # and 0xffffffff: entries at or above are not in the file
_VDI_TYPES = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}
_VDI_HEADER_END = 0x200  # pre-header (64 bytes) + the 1.1 header, padded to a sector


def _uuid(raw: bytes) -> str:
    """A VirtualBox (little-endian) UUID as text."""
    a, b, c = struct.unpack("<IHH", raw[:8])
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def _vdi(f: _File) -> int:
    h = f.read(0, 512, "VDI header")
    version, _hsize, itype = struct.unpack("<III", h[0x44:0x50])
    off_bmap, off_data = struct.unpack("<II", h[0x154:0x15C])
    sector_size, = struct.unpack("<I", h[0x168:0x16C])
    disk_size, block_size, _extra, blocks, allocated = struct.unpack("<QIIII", h[0x170:0x188])
    link, parent = h[0x1A8:0x1B8], h[0x1B8:0x1C8]
    # A header that is no valid VDI is corrupt before any reference is read out of it.
    if version != 0x00010001:
        raise f.corrupt(f"unknown VDI version {version >> 16}.{version & 0xFFFF} (qemu-img reads 1.1)")
    if itype not in _VDI_TYPES:
        raise f.corrupt(f"unknown VDI image type {itype}")
    if off_bmap % _SECTOR or off_data % _SECTOR or sector_size != _SECTOR or block_size != 1 << 20:
        raise f.corrupt("block map, data offset, sector or block size is impossible")
    if blocks > 0x3FFFFFFF or disk_size > blocks * block_size:
        raise f.corrupt(f"disk size {disk_size} does not fit its {blocks} blocks")
    if any(parent) or itype in (3, 4):  # undo and differencing images hold changes to another
        raise UnsafeImage(f"VDI is a differencing image (image type {_VDI_TYPES[itype]}), {DELTA} "
                          f"{_uuid(parent)}: upload the merged disk (VBoxManage clonemedium of the "
                          "snapshot's state)", detected="vdi")
    if any(link):
        raise UnsafeImage(f"VDI is linked to image {_uuid(link)}", detected="vdi")
    if off_bmap + blocks * 4 > f.size:  # before sizing anything by a header's word
        raise f.past_end("VDI block map", off_bmap + blocks * 4)
    # Data blocks over the header or the block map would read back metadata
    # as guest data (qemu checks neither).
    metadata = ((0, _VDI_HEADER_END, "header"), (off_bmap, off_bmap + blocks * 4, "block map"))
    if off_bmap < _VDI_HEADER_END:
        raise f.corrupt(f"block map at {off_bmap:#x} lies over the header")
    seen = bytearray(-(-blocks // 8))
    counted = 0
    for first, data in f.slices(off_bmap, blocks * 4, "VDI block map", 4):
        for i, entry in enumerate(_u32_table(data, False)):
            if entry >= _VDI_UNALLOCATED:
                continue
            block = first + i
            if entry >= blocks:
                raise f.corrupt(f"block map entry {block} names block {entry}; the image has {blocks}")
            if seen[entry >> 3] & (1 << (entry & 7)):
                raise f.corrupt(f"block map entry {block} reuses data block {entry}, already mapped")
            seen[entry >> 3] |= 1 << (entry & 7)
            counted += 1
            start = off_data + entry * block_size
            need = min(block_size, max(1, disk_size - block * block_size))
            for lo, hi, what in metadata:
                if start < hi and start + need > lo:
                    raise f.corrupt(f"block map entry {block} places data block {entry} at {start:#x}, "
                                    f"over the {what}")
            if start + need > f.size:
                f.data_past_end(f"block map entry {block} (data block {entry} at {start:#x})", start + need)
    if counted != allocated:
        raise f.corrupt(f"header counts {allocated} allocated blocks, the block map {counted}")
    return _round_up(disk_size, _SECTOR)  # vdi.c: odd sizes (VBoxManage convertfromraw) round up


# --------------------------------------------------------------------------- VHD (vpc)
# Microsoft's "Virtual Hard Disk Image Format Specification"; block/vpc.c vpc_open.

_VHD_MAX_GEOMETRY = 65535 * 16 * 255
# Blocks whose overlap is checked (8 MiB of offsets: 2 TiB of 2 MiB blocks,
# all of what a VHD can hold); qemu checks none.
_OVERLAP_CAP = 1 << 20
_VHD_MAX_SECTORS = 0xFF000000
# The VHD specification's Current Size is the disk.  Only Virtual PC ("vpc ")
# and qemu before 2.6 ("qemu", whose current size is its geometry anyway)
# present the disk their CHS geometry covers.  qemu 7.2's block/vpc.c sizes
# every creator it does not list (VirtualBox "vbox", Azure "wa\0\0", ...) by
# geometry too, which cuts their tail; later qemu lists more creators.  convd
# decides by this rule and tells qemu-img (the vpc driver's
# ``force_size_calc``), so every qemu version reads the same disk.
_VHD_CHS_CREATORS = (b"vpc ", b"qemu")
# Guest bytes past a geometry-sized disk that convd reads to be sure they
# hold nothing (a geometry drops at most one cylinder, under 2 MiB).
_VHD_TAIL_CHECK = 64 << 20
SIZE_RULE_CHS = "chs"
SIZE_RULE_CURRENT = "current_size"
_VHD_LOCATOR_CODES = {b"W2ru": "utf-16-le", b"W2ku": "utf-16-le", b"Mac ": "utf-8", b"MacX": "utf-8"}


def vpc_size_rule(footer: bytes) -> str:
    """Which rule sizes the disk of a VHD footer: ``"chs"`` (cylinders × heads ×
    sectors × 512: Virtual PC, old qemu) or ``"current_size"`` (every other
    creator, and any VHD whose geometry is the maximal one, as block/vpc.c
    does even when told ``chs``).  The value is also the vpc driver's
    ``force_size_calc`` option that makes qemu-img read it so.
    """
    cyls, heads, secs = struct.unpack(">HBB", footer[56:60])
    if footer[28:32] in _VHD_CHS_CREATORS and cyls * heads * secs != _VHD_MAX_GEOMETRY:
        return SIZE_RULE_CHS
    return SIZE_RULE_CURRENT


def vpc_virtual_size(footer: bytes) -> int:
    """Virtual size in bytes of a VHD footer by :func:`vpc_size_rule`: the
    geometry's sectors, or ``current_size`` (block/vpc.c reads it in whole
    sectors, rounding down; :func:`verify` refuses a size that is not)."""
    if vpc_size_rule(footer) == SIZE_RULE_CHS:
        cyls, heads, secs = struct.unpack(">HBB", footer[56:60])
        return cyls * heads * secs * _SECTOR
    return struct.unpack(">Q", footer[48:56])[0] // _SECTOR * _SECTOR


def vpc_footer(fd: int, size: int) -> bytes:
    """A VHD's footer: the copy at the start of a dynamic disk, else the last 512 bytes."""
    head = os.pread(fd, _SECTOR, 0)
    if head[:8] == b"conectix" or size < _SECTOR:
        return head
    return os.pread(fd, _SECTOR, size - _SECTOR)


def _vhd_checksum_ok(block: bytes, at: int) -> bool:
    stored, = struct.unpack(">I", block[at:at + 4])
    return (~(sum(block[:at]) + sum(block[at + 4:]))) & 0xFFFFFFFF == stored


def _vhd_parent(f: _File, dyn: bytes) -> str:
    """The parent's name as the differencing disk gives it (name field, then locators)."""
    names = []
    name = dyn[64:576].decode("utf-16-be", errors="replace").split("\0", 1)[0]
    if name:
        names.append(name)
    for k in range(8):
        code, _space, length, _res, offset = struct.unpack(">4sIIIQ", dyn[576 + 24 * k:600 + 24 * k])
        if code in _VHD_LOCATOR_CODES and 0 < length <= 1024 and offset + length <= f.size:
            text = os.pread(f.fd, length, offset).decode(_VHD_LOCATOR_CODES[code], errors="replace")
            text = text.split("\0", 1)[0]
            if text and text not in names:
                names.append(text)
    return ", ".join(repr(n) for n in names) or "(unnamed)"


def _vpc(f: _File) -> int:
    footer = f.read(0, 512, "VHD footer")
    fixed = footer[:8] != b"conectix"
    if fixed:
        footer = f.read(f.size - 512, 512, "VHD footer")
    if not _vhd_checksum_ok(footer, 64):
        raise f.corrupt("footer checksum is wrong")
    vsize = vpc_virtual_size(footer)
    rule = vpc_size_rule(footer)
    current, = struct.unpack(">Q", footer[48:56])
    creator = footer[28:32].decode("latin-1")
    disk_type, = struct.unpack(">I", footer[60:64])
    if vsize // _SECTOR > _VHD_MAX_SECTORS:
        raise f.corrupt(f"virtual size {vsize} is over VHD's 2040 GiB")
    if vsize == 0:
        raise f.corrupt(f"footer gives no virtual size (creator {creator!r} is sized by "
                        f"{'CHS geometry' if rule == SIZE_RULE_CHS else 'current size'}, geometry "
                        f"{'/'.join(map(str, struct.unpack('>HBB', footer[56:60])))}, "
                        f"current size {current}): an empty disk")
    if rule == SIZE_RULE_CURRENT and current % _SECTOR:
        # qemu-img reads whole sectors and cannot be told otherwise: it would drop the tail.
        raise f.corrupt(f"current size {current} is not a whole number of 512-byte sectors: qemu-img "
                        f"would drop its last {current % _SECTOR} bytes")
    # A geometry-sized disk whose current size says more: the bytes between
    # must hold nothing, or the creator field does not tell which disk is meant.
    tail = (vsize, min(current, vsize + _VHD_TAIL_CHECK)) if rule == SIZE_RULE_CHS and current > vsize else None
    if fixed:
        if disk_type != 2:
            raise f.corrupt(f"footer at the end names disk type {disk_type}, not fixed (2)")
        if vsize > f.size - 512:
            raise f.past_end(f"the footer's disk of {vsize} bytes", vsize + 512)
        if tail is not None:
            lo, hi = tail[0], min(tail[1], f.size - 512)
            if lo < hi and f.read(lo, hi - lo, "VHD disk tail").strip(b"\0"):
                raise _vhd_tail_error(f, creator, vsize, current)
        return vsize
    if disk_type not in (3, 4):
        raise f.corrupt(f"footer at the start names disk type {disk_type}, not dynamic (3) or differencing (4)")
    dyn_off, = struct.unpack(">Q", footer[16:24])
    dyn = f.read(dyn_off, 1024, "VHD dynamic disk header")
    if dyn[:8] != b"cxsparse":
        raise f.corrupt(f"no dynamic disk header at {dyn_off:#x}")
    if not _vhd_checksum_ok(dyn, 36):
        raise f.corrupt("dynamic disk header checksum is wrong")
    if disk_type == 4:
        raise UnsafeImage(f"VHD is a differencing disk (Hyper-V .avhd, Virtual PC undo disk), {DELTA} "
                          f"{_vhd_parent(f, dyn)}: upload the merged disk (Merge-VHD, or qemu-img convert "
                          "with the parent beside it)", detected="vpc")
    bat_off, = struct.unpack(">Q", dyn[16:24])
    entries, block_size = struct.unpack(">II", dyn[28:36])
    if block_size < _SECTOR or block_size & (block_size - 1):
        raise f.corrupt(f"block size {block_size} is not a power of two of at least 512")
    if entries * block_size < vsize:
        raise f.corrupt(f"block allocation table of {entries} entries cannot hold {vsize} bytes")
    bitmap = _round_up(block_size // (8 * _SECTOR), _SECTOR)
    metadata = ((0, _SECTOR, "footer copy"), (dyn_off, dyn_off + 1024, "dynamic disk header"),
                (bat_off, bat_off + entries * 4, "block allocation table"))
    # The spec ends every dynamic VHD with a footer (qemu reads the copy at
    # the start); where one is there, a block running into it reads it back.
    trailing = f.size >= 2 * _SECTOR and f.read(f.size - _SECTOR, 8, "VHD footer") == b"conectix"
    starts = array("Q")  # for the overlap check, up to _OVERLAP_CAP blocks (memory stays bounded)
    for first, data in f.slices(bat_off, entries * 4, "VHD block allocation table", 4):
        for i, sec in enumerate(_u32_table(data, True)):
            if sec == 0xFFFFFFFF:
                continue
            block = first + i
            start = sec * _SECTOR
            need = bitmap + min(block_size, max(1, vsize - block * block_size))
            for lo, hi, what in metadata:
                if start < hi and start + bitmap + block_size > lo:
                    raise f.corrupt(f"BAT entry {block} points a block at {start:#x} over the {what}")
            if start + need > f.size:
                f.data_past_end(f"BAT entry {block} (block at {start:#x})", start + need)
            elif trailing and start + need > f.size - _SECTOR:  # the footer at the end is metadata too
                raise f.corrupt(f"BAT entry {block} points a block at {start:#x} over the footer at the end")
            elif len(starts) < _OVERLAP_CAP:
                starts.append(start)
    ordered = sorted(starts)
    for a, b in itertools.pairwise(ordered):
        if b < a + bitmap + block_size:
            raise f.corrupt(f"two BAT entries share the file's bytes at {b:#x} (blocks overlap)")
    if tail is not None:
        for block in range(tail[0] // block_size, min(entries, -(-tail[1] // block_size))):
            sec, = struct.unpack(">I", f.read(bat_off + 4 * block, 4, "VHD block allocation table"))
            if sec == 0xFFFFFFFF:
                continue
            lo = max(tail[0], block * block_size)
            hi = min(tail[1], (block + 1) * block_size)
            at = sec * _SECTOR + bitmap + lo - block * block_size
            if lo < hi and at + hi - lo <= f.size and os.pread(f.fd, hi - lo, at).strip(b"\0"):
                raise _vhd_tail_error(f, creator, vsize, current)
    return vsize


def _vhd_tail_error(f: _File, creator: str, vsize: int, current: int) -> CorruptImage:
    return f.corrupt(f"creator {creator!r} sizes the disk by its CHS geometry ({vsize} bytes), but data lies "
                     f"past it, inside the current size ({current} bytes): which disk is meant is unclear "
                     "(convd drops no tail)")


# --------------------------------------------------------------------------- VHDX
# Microsoft's [MS-VHDX]; block/vhdx.c vhdx_open, vhdx_parse_metadata.

def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


_VHDX_BAT = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
_VHDX_METADATA = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
_VHDX_FILE_PARAMS = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
_VHDX_DISK_SIZE = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
_VHDX_LOGICAL_SECTOR = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
_VHDX_PARENT_LOCATOR = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
_VHDX_HAS_PARENT = 2
_VHDX_PRESENT = (6, 7)  # PAYLOAD_BLOCK_FULLY_PRESENT, _PARTIALLY_PRESENT


def _vhdx_parent(f: _File, offset: int, length: int) -> str:
    """Paths from a VHDX parent locator (relative_path, absolute_win32_path, …)."""
    try:
        loc = f.read(offset, min(length, 64 << 10), "VHDX parent locator")
        count, = struct.unpack("<H", loc[18:20])
        found = []
        for k in range(min(count, 64)):
            ko, vo, kl, vl = struct.unpack("<IIHH", loc[20 + 12 * k:32 + 12 * k])
            key = loc[ko:ko + kl].decode("utf-16-le", errors="replace")
            value = loc[vo:vo + vl].decode("utf-16-le", errors="replace")
            if key != "parent_linkage":
                found.append(f"{key} {value!r}")
        return ", ".join(found) or "(unnamed)"
    except (struct.error, CorruptImage):
        return "(unreadable locator)"


def _vhdx(f: _File) -> int:
    regions = f.read(0x30000, 64 << 10, "VHDX region table")
    if regions[:4] != b"regi":
        raise f.corrupt("no region table at 192 KiB")
    count, = struct.unpack("<I", regions[8:12])
    if count > 2047:
        raise f.corrupt(f"region table of {count} entries is over VHDX's 2047")
    bat = meta = None
    for k in range(count):
        guid, off, length, _req = struct.unpack("<16sQII", regions[16 + 32 * k:48 + 32 * k])
        if off + length > f.size:
            raise f.past_end(f"region {k}", off + length)
        if off % (1 << 20):
            raise f.corrupt(f"region {k} at {off:#x} is not 1 MiB-aligned")
        if guid == _VHDX_BAT:
            bat = (off, length)
        elif guid == _VHDX_METADATA:
            meta = (off, length)
    if bat is None or meta is None:
        raise f.corrupt("region table lacks the BAT or the metadata region")
    table = f.read(meta[0], min(meta[1], 64 << 10), "VHDX metadata table")
    if table[:8] != b"metadata":
        raise f.corrupt("no metadata table at the metadata region")
    n, = struct.unpack("<H", table[10:12])
    items: dict[bytes, tuple[int, int]] = {}
    for k in range(min(n, 2047)):
        guid, off, length = struct.unpack("<16sII", table[32 + 32 * k:56 + 32 * k])
        items[guid] = (meta[0] + off, length)
    try:
        params = f.read(items[_VHDX_FILE_PARAMS][0], 8, "VHDX file parameters")
        vsize, = struct.unpack("<Q", f.read(items[_VHDX_DISK_SIZE][0], 8, "VHDX virtual disk size"))
        lss, = struct.unpack("<I", f.read(items[_VHDX_LOGICAL_SECTOR][0], 4, "VHDX logical sector size"))
    except KeyError:
        raise f.corrupt("metadata lacks file parameters, virtual disk size or sector size") from None
    block_size, pflags = struct.unpack("<II", params)
    if lss not in (512, 4096):
        raise f.corrupt(f"logical sector size {lss} is not 512 or 4096")
    if lss == 4096:
        # MS-VHDX allows it; qemu's vhdx driver opens 512-byte sectors only (ENOTSUP).
        raise UnsupportedFormat("a VHDX with 4096-byte logical sectors, which qemu-img cannot read: convert it "
                                "on Windows (Convert-VHD) to one with 512-byte sectors, or export it as raw, "
                                "and upload that", detected="vhdx")
    if block_size < 1 << 20 or block_size > 256 << 20 or block_size & (block_size - 1):
        raise f.corrupt(f"block size {block_size} is not a power of two between 1 MiB and 256 MiB")
    if vsize == 0 or vsize > 64 << 40:
        raise f.corrupt(f"virtual disk size {vsize} is impossible")
    if pflags & _VHDX_HAS_PARENT or _VHDX_PARENT_LOCATOR in items:
        where = items.get(_VHDX_PARENT_LOCATOR)
        parent = _vhdx_parent(f, *where) if where else "(no locator)"
        raise UnsafeImage(f"VHDX is a differencing disk (Hyper-V .avhdx checkpoint), {DELTA} {parent}: "
                          "upload the merged disk (Merge-VHD, or delete the checkpoints)", detected="vhdx")
    chunk_ratio = (1 << 23) * lss // block_size
    data_blocks = -(-vsize // block_size)
    total = data_blocks + (data_blocks - 1) // chunk_ratio
    if total * 8 > bat[1]:
        raise f.corrupt(f"BAT region of {bat[1]} bytes cannot hold {total} entries")
    seen = bytearray((f.size >> 20) // 8 + 1)  # payload blocks start on MiB boundaries inside the file
    for first, data in f.slices(bat[0], total * 8, "VHDX BAT", 8):
        for i, entry in enumerate(_u64_table(data, False)):
            index = first + i
            if (index + 1) % (chunk_ratio + 1) == 0:
                continue  # a sector bitmap entry (only used by differencing disks)
            if entry & 7 not in _VHDX_PRESENT:
                continue
            block = index - index // (chunk_ratio + 1)
            start = (entry >> 20) << 20
            need = min(block_size, max(1, vsize - block * block_size))
            if start + need > f.size:
                f.data_past_end(f"BAT entry {index} (payload block {block} at {start:#x})", start + need)
                continue
            mib = start >> 20
            if seen[mib >> 3] & (1 << (mib & 7)):
                raise f.corrupt(f"BAT entry {index} reuses the payload block at {start:#x}")
            seen[mib >> 3] |= 1 << (mib & 7)
    if vsize % lss:
        raise f.corrupt(f"virtual disk size {vsize} is not a whole number of {lss}-byte sectors "
                        "(MS-VHDX 2.6.2.4); qemu-img would drop its tail")
    return vsize


_CHECKS = {"qcow2": _qcow2, "vmdk": _vmdk, "vdi": _vdi, "vpc": _vpc, "vhdx": _vhdx}
# Signatures of image formats whose header the inspector only recognises
# once 512 bytes are there: a shorter file carrying one is a header cut
# short, not a tiny raw disk.
MAGICS = ((0, b"QFI\xfb", "qcow2"), (0x40, b"\x7f\x10\xda\xbe", "vdi"), (0, b"QED\0", "qed"),
           (0, b"KDMV", "vmdk"), (0, b"conectix", "vpc"), (0, b"vhdxfile", "vhdx"))


def cut_short_header(fd: int, size: int) -> str | None:
    """The format whose signature starts a file too short for that format's header, or None."""
    if size >= 512:
        return None
    head = os.pread(fd, 512, 0)
    for offset, magic, fmt in MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return fmt
    return None


def verify(fd: int, fmt: str, size: int, *, stop: threading.Event | None = None) -> int | None:
    """Check an image's own metadata; return its virtual size in bytes as qemu-img 7.2 reads it.

    ``fmt`` is qemu-img's name of the format the inspector found.  Returns
    None for formats without allocation metadata of their own (raw, gpt,
    iso, a VMDK descriptor file).  Raises
    ``CorruptImage`` (a table points past the end of the file, the format
    marks itself broken, a header field is impossible), ``UnsafeImage`` (a
    parent disk holds part of the data), ``UnsupportedFormat`` (encrypted)
    or ``Stopped``.  Reads metadata only: a few KiB of headers plus the
    allocation tables.
    """
    check = _CHECKS.get(fmt)
    if check is None:
        return None
    f = _File(fd, size, fmt, stop)
    try:
        vsize = check(f)
        f.raise_missing()
        return vsize
    except (struct.error, ValueError, IndexError, OverflowError) as exc:
        raise f.corrupt(f"metadata cannot be parsed: {exc}") from None
