"""qcow2 metadata checks, as qemu 7.2 reads the format.

Sources: docs/interop/qcow2.txt; qcow2.c qcow2_do_open, qcow2-refcount.c
check_refcounts_l1/l2.

:func:`check` is this format's entry in :data:`convd.image.integrity.CHECKS`:
it reads the header and allocation tables through an
:class:`~convd.image.reader.ImageFile` and returns the virtual size in bytes
as qemu-img 7.2 reads it (None when the format holds none of its own).
"""

from __future__ import annotations

import io
import struct
import zlib
from array import array

import zstandard

from convd.errors import Stopped, UnsupportedFormat
from convd.image.reader import SECTOR, ImageFile, qcow2_plain_table, round_up, u64_table, used

__all__ = ["check"]

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


def check(f: ImageFile) -> int:
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
    if size % SECTOR and size > 0:
        # qcow2.c: bs->total_sectors = header.size / BDRV_SECTOR_SIZE, on every
        # qemu version; qemu-img cannot be told otherwise, so the tail would be lost.
        raise f.corrupt(f"virtual size {size} is not a whole number of 512-byte sectors: qemu-img would "
                        f"drop its last {size % SECTOR} bytes")
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
        for i, entry in enumerate(u64_table(used(data, 8), True)):
            block = entry & ~0x1FF
            if block:
                if block % cluster:
                    raise f.corrupt(f"refcount table entry {first + i} ({block:#x}) is not cluster-aligned")
                if block + cluster > f.size:
                    raise f.past_end(f"refcount table entry {first + i} (block at {block:#x})", block + cluster)
                if meta is not None:
                    meta.add(block, cluster, "refcount block")
    # Active L1 → L2 tables → data clusters: what qemu-img convert reads.
    l1 = u64_table(f.read(l1_off, l1_size * 8, "qcow2 L1 table"), True) if l1_size else array("Q")
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
        if meta is None and not extended and qcow2_plain_table(raw, cluster_bits):
            flat = bytearray(raw)
            flat[0::8] = bytes(len(flat) // 8)  # drop the "copied" flags
            if max(u64_table(bytes(flat), True)) + cluster <= f.size:
                continue  # every data cluster of this table lies whole inside the file
        l2 = u64_table(used(raw, entry_bytes), True)
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
                end = (host & ~0x1FF) + (((e >> comp_bits) & comp_sectors_mask) + 1) * SECTOR
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

    def check(self, offset: int, length: int, where: str, f: ImageFile) -> None:
        for n in self._range(offset, length):
            if self.map[n >> 3] & (1 << (n & 7)):
                raise f.corrupt(f"{where} points to data at {offset:#x}, over the "
                                f"{self.names.get(n, 'metadata')} (cluster {n})")


def _qcow2_snapshot_metadata(f: ImageFile, meta: _Clusters, h: bytes) -> None:
    """Mark the snapshot table and the snapshots' L1 tables (qcow2.txt "Snapshot table")."""
    count, offset = struct.unpack(">IQ", h[60:72])
    at = offset
    for k in range(min(count, 65536)):
        entry = f.read(at, 40, f"qcow2 snapshot {k}")
        l1_off, l1_size, id_len, name_len = struct.unpack(">QIHH", entry[:16])
        extra, = struct.unpack(">I", entry[36:40])
        meta.add(l1_off, l1_size * 8, f"L1 table of snapshot {k}")
        at += round_up(40 + extra + id_len + name_len, 8)
    if count:
        meta.add(offset, at - offset, "snapshot table")


def _qcow2_cluster_decodes(f: ImageFile, host: int, cluster: int, ctype: int) -> bool:
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
