"""Which container a dropped file is, told by content: the kinds convd unpacks and the ones it refuses.

A compression or archive is recognised by its magic and a check of the
fields after it (so a raw disk starting with the same bytes by chance is not
taken for one); never by name.
"""

from __future__ import annotations

import lzma

__all__ = ["ARCHIVES", "COMPRESSIONS", "HEAD", "KINDS", "describe", "foreign", "sniff"]


COMPRESSIONS = ("gzip", "xz", "zstd", "bzip2")
ARCHIVES = ("tar", "ova")
KINDS = COMPRESSIONS + ARCHIVES  # what [convert] containers may list (convd.config.CONTAINER_KINDS)
_DESCRIPTION = {
    "gzip": "a gzip-compressed stream",
    "xz": "an xz-compressed stream",
    "zstd": "a zstd-compressed stream",
    "bzip2": "a bzip2-compressed stream",
    "tar": "a tar archive",
    "ova": "an OVA appliance (a tar with an OVF descriptor)",
}
HEAD = 512  # a tar header; every compression magic is within it


# What a decoder may allocate: xz -9 needs 65 MiB, zstd's default window
# limit is 128 MiB; a header asking for more is refused, not obeyed.
_XZ_MEMLIMIT = 256 << 20
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_TAR = "tar"


def describe(kinds: list[str]) -> str:
    """``["gzip", "tar"]`` → ``"a tar archive inside a gzip-compressed stream"``."""
    text = _DESCRIPTION[kinds[-1]]
    for outer in reversed(kinds[:-1]):
        text += f" inside {_DESCRIPTION[outer]}"
    return text


def _compression(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if head.startswith(_ZSTD_MAGIC) or _zstd_skippable(head[:4]):
        return "zstd"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] == b"\x31\x41\x59\x26\x53\x59":
        return "bzip2"
    return None


def _octal_field(field: bytes) -> bool:
    """A tar numeric field: octal digits, padded with spaces or NULs (or GNU base-256)."""
    text = field.strip(b" \x00")
    return field[:1] in (b"\x80", b"\xff") or all(48 <= c <= 55 for c in text)


def _tar_header(head: bytes) -> bool:
    """A tar header whose checksum adds up (the magic alone could be chance).

    ustar/GNU/PAX headers carry a magic; a V7 header (``tar --format=v7``)
    has none, so it must also look like one: a name, octal numeric fields,
    a V7 type and nothing where ustar keeps its magic.
    """
    if len(head) < 512:
        return False
    try:
        stored = int(head[148:156].split(b"\x00", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    rest = head[:148] + b" " * 8 + head[156:512]
    if stored not in (sum(rest), sum(b - 256 if b > 127 else b for b in rest)):  # old tars summed signed
        return False
    if head[257:263] in (b"ustar\x00", b"ustar "):
        return True
    name = head[:100].split(b"\x00", 1)[0]
    return (head[257:263] == bytes(6) and bool(name) and all(c >= 32 for c in name)
            and head[156:157] in (b"\x00", b"0", b"1", b"2", b"5")
            and all(_octal_field(head[a:b]) for a, b in ((100, 108), (108, 116), (116, 124), (124, 136),
                                                         (136, 148))))


def _archive(head: bytes) -> str | None:
    if not _tar_header(head):
        return None
    name = head[:100].split(b"\x00", 1)[0]
    prefix = head[345:500].split(b"\x00", 1)[0] if head[257:263] == b"ustar\x00" else b""
    full = (prefix + b"/" + name) if prefix else name
    # A PAX or GNU long-name header first hides the name; tarfile tells later.
    return "ova" if head[156:157] in b"0\x00" and full.lower().endswith(b".ovf") else "tar"


# Containers and compressions convd does not unpack, told by a magic and a
# check of the fields after it (so that a raw disk starting with the same
# bytes by chance is not taken for one).  Found at the start of a dropped
# file they are unsupported_format, never a raw disk.  Filesystem images
# (ISO 9660, squashfs, ext, FAT) are not here: they are raw disks.
_ZIP_METHODS = {0, 1, 6, 8, 9, 12, 14, 19, 93, 95, 96, 97, 98, 99}


def _lzma_alone(head: bytes) -> bool:
    """A legacy .lzma header (xz's lzma_alone, as xz --format=auto tells it): properties
    byte < 225, a dictionary of 2^n or 2^n + 2^(n-1) bytes, a size under 256 GiB or
    unknown; and the first bytes decode."""
    if len(head) < 13 or head[0] >= 225:
        return False
    d = int.from_bytes(head[1:5], "little")
    top = 1 << (d.bit_length() - 1) if d else 0
    if not d or d not in (top, top | top >> 1):
        return False
    n = int.from_bytes(head[5:13], "little")
    if n != (1 << 64) - 1 and n >= 1 << 38:
        return False
    try:
        lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=_XZ_MEMLIMIT).decompress(head, max_length=4096)
    except lzma.LZMAError:
        return False
    return True


def foreign(head: bytes) -> tuple[str, str] | None:
    """A container convd does not unpack: its kind and what it is (``("zip", "a zip archive")``), or None."""
    h = head + bytes(16)  # a file of a few bytes
    if h[:4] == b"PK\x03\x04" and h[4] <= 63 and int.from_bytes(h[8:10], "little") in _ZIP_METHODS:
        return "zip", "a zip archive"
    if h[:6] == b"7z\xbc\xaf\x27\x1c":
        return "7z", "a 7-Zip archive"
    if h[:7] == b"Rar!\x1a\x07\x00" or h[:8] == b"Rar!\x1a\x07\x01\x00":
        return "rar", "a RAR archive"
    if h[:4] == b"\x04\x22\x4d\x18" and h[4] >> 6 == 1 and not h[4] & 0x02:
        return "lz4", "an lz4-compressed stream"
    if h[:4] == b"\x02\x21\x4c\x18":
        return "lz4", "an lz4-compressed stream (legacy format)"
    if h[:4] == b"LZIP" and h[4] in (0, 1):
        return "lzip", "an lzip-compressed stream"
    if h[:9] == b"\x89LZO\x00\r\n\x1a\n":
        return "lzop", "an lzop-compressed stream"
    if h[:2] == b"\x1f\x9d" and 9 <= h[2] & 0x1F <= 16 and not h[2] & 0x60:
        return "compress", "a Unix compress (.Z) stream"
    if h[:4] == b"xar!" and h[4:6] == b"\x00\x1c" and h[6:8] == b"\x00\x01":
        return "xar", "a xar archive"
    if h[:6] in (b"070701", b"070702") and all(c in b"0123456789abcdefABCDEF" for c in h[6:110]):
        return "cpio", "a cpio archive"
    if h[:6] == b"070707" and all(48 <= c <= 55 for c in h[6:76]):
        return "cpio", "a cpio archive"
    if h[:8] == b"!<arch>\n":
        return "ar", "an ar archive (a .deb or static library)"
    if h[:8] == b"MSCF\x00\x00\x00\x00":
        return "cab", "a Microsoft cabinet"
    if _lzma_alone(head):
        return "lzma", "a legacy .lzma stream (lzma_alone)"
    return None


def sniff(head: bytes) -> str | None:
    """The container kind whose signature starts ``head`` (>= 512 bytes), or None."""
    return _compression(head) or _archive(head)


def _zstd_skippable(magic: bytes) -> bool:
    """A skippable frame's magic, 0x184D2A50..0x184D2A5F (RFC 8878 3.1.2; pzstd starts with one)."""
    return len(magic) == 4 and magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50
