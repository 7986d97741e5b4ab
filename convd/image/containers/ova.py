"""OVA packages (DMTF DSP0243): the OVF descriptor's disks, in the order it lists them, and the manifest's
digests, checked while the disk streams out.
"""

from __future__ import annotations

import hashlib
import re
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from defusedxml import ElementTree as SafeXML
from defusedxml.common import DefusedXmlException

from convd.errors import CorruptImage, Stopped, UnsafeImage, UnsupportedFormat
from convd.image.containers.streams import _CHUNK

__all__ = ["ovf_disks", "parse_manifest"]


_OVF_LIMIT = 4 << 20  # an OVF descriptor is a few KiB of XML


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: Any, name: str) -> str | None:
    for key, value in el.attrib.items():
        if _local(key) == name:
            return str(value)
    return None


def ovf_disks(xml: bytes) -> list[str]:
    """The file names of the disks an OVF descriptor references (DSP0243 ``DiskSection``).

    Raises ``UnsafeImage`` for entities or external references (refused by
    defusedxml), ``CorruptImage`` for XML that does not parse, and
    ``UnsupportedFormat`` for a disk split in chunks or stored compressed.
    """
    try:
        root = SafeXML.fromstring(xml, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise UnsafeImage(f"the OVF descriptor uses refused XML features: {exc}") from None
    except SafeXML.ParseError as exc:
        raise CorruptImage(f"the OVF descriptor is not valid XML: {exc}") from None
    files: dict[str, Any] = {}
    for el in root.iter():
        if isinstance(el.tag, str) and _local(el.tag) == "File" and _attr(el, "id"):
            files[_attr(el, "id") or ""] = el
    names: list[str] = []
    for el in root.iter():
        if not (isinstance(el.tag, str) and _local(el.tag) == "Disk"):
            continue
        ref = _attr(el, "fileRef")
        if not ref:
            continue  # a blank disk, created empty at import: nothing to convert
        f = files.get(ref)
        href = _attr(f, "href") if f is not None else None
        if not href:
            raise CorruptImage(f"the OVF descriptor's disk refers to file {ref!r}, which it does not list")
        if _attr(f, "chunkSize") or _attr(f, "compression") not in (None, "identity"):
            raise UnsupportedFormat(f"the OVF descriptor stores disk {href!r} chunked or compressed, "
                                    "which convd does not unpack")
        if href not in names:
            names.append(href)
    return names


def _norm(name: str) -> str:
    return str(PurePosixPath(name))  # "./disk1.vmdk" → "disk1.vmdk"


def _href_names(href: str, what: str) -> tuple[str, ...]:
    """The member names an OVF ``href`` may mean: as written, and percent-decoded
    (it is a URI reference, DSP0243 8.1: ``my%20disk.vmdk`` is ``my disk.vmdk``).
    Raises ``UnsupportedFormat`` for a URL with a scheme or host: a disk outside the archive."""
    url = urllib.parse.urlsplit(href)
    if url.scheme or url.netloc:
        raise UnsupportedFormat(f"{what} references disk {href!r} by URL, outside the archive; "
                                "convd converts the disk an OVA holds")
    return tuple(dict.fromkeys((_norm(href), _norm(urllib.parse.unquote(url.path)))))


# An OVF manifest (DSP0243 5.1): one "ALGO(file)= hex" line per file of the
# package; "ALGO (file) = hex" (BSD/openssl style) is written too.
_MANIFEST_LIMIT = 1 << 20
_MANIFEST_LINE = re.compile(r"(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)")
_MANIFEST_ALGOS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


def parse_manifest(text: bytes, name: str) -> dict[str, tuple[str, str]]:
    """``{member: (hashlib name, hex digest)}`` from an OVF manifest ``name``.

    Raises ``CorruptImage`` for a line that is not ``SHA1|SHA256|SHA512(file)= hex``
    with a digest of that algorithm's length, or a file named twice.
    """
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        m = _MANIFEST_LINE.fullmatch(line.strip())
        algo = _MANIFEST_ALGOS.get(m.group(1)) if m else None
        if m is None or algo is None or len(m.group(3)) != hashlib.new(algo).digest_size * 2:
            raise CorruptImage(f"the OVF manifest {name!r} line {n} is not 'SHA1|SHA256|SHA512(file)= digest': "
                               f"{line[:80]!r}", detected="ova")
        member = _norm(m.group(2).strip())
        if member in out:
            raise CorruptImage(f"the OVF manifest {name!r} lists {member!r} twice", detected="ova")
        out[member] = (algo, m.group(3).lower())
    return out


class _Digests:
    """What the package's manifests state, and the digests of the members as read."""

    def __init__(self) -> None:
        self.stated: list[tuple[str, dict[str, tuple[str, str]]]] = []  # (manifest, its lines)
        self.got: dict[str, dict[str, str]] = {}  # member -> {algo: hex}

    def wanted(self, member: str) -> list[str]:
        """The algorithms manifests seen so far state for ``member``."""
        return sorted({lines[member][0] for _, lines in self.stated if member in lines})

    def note(self, member: str, hashers: list[Any]) -> None:
        self.got.setdefault(member, {}).update({h.name: h.hexdigest() for h in hashers})

    def check(self, members: list[str], rehash: Callable[[str, list[str]], None]) -> str | None:
        """Compare; ``rehash(member, algos)`` computes what was not hashed on the way.
        Returns the manifest's name (the first one) or None; raises ``CorruptImage``."""
        for manifest, lines in self.stated:
            for member, (algo, want) in lines.items():
                if member not in members:
                    raise CorruptImage(f"the OVF manifest {manifest!r} lists {member!r}, which the archive does "
                                       "not hold", detected="ova")
                if algo not in self.got.get(member, {}):
                    rehash(member, [algo])
                got = self.got[member][algo]
                if got != want:
                    raise CorruptImage(f"the OVF manifest {manifest!r} gives {member!r} {algo} {want}, the "
                                       f"archive's member has {got}: it changed after the manifest was written "
                                       "(damaged in transfer?)", detected="ova")
        return self.stated[0][0] if self.stated else None


def _hashing(read: Callable[[int], bytes], hashers: list[Any]) -> Callable[[int], bytes]:
    if not hashers:
        return read

    def hashed(n: int) -> bytes:
        data = read(n)
        for h in hashers:
            h.update(data)
        return data
    return hashed


def _digest_all(read: Callable[[int], bytes], algos: list[str], stop: threading.Event) -> list[Any]:
    hashers = [hashlib.new(a) for a in algos]
    while data := read(_CHUNK):
        for h in hashers:
            h.update(data)
        if stop.is_set():
            raise Stopped("unpacking interrupted by shutdown")
    return hashers
