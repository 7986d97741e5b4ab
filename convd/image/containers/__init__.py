"""Containers and compressed streams: told by their signature, unpacked under a byte budget.

One module per concern: :mod:`.kinds` (which container a file is, by
content), :mod:`.stated` (the size it states it unpacks to, read before
unpacking), :mod:`.streams` (decoders and the byte budget), :mod:`.tar`
(safe tar headers), :mod:`.ova` (OVF descriptor and manifest) and
:mod:`.driver` (one disk out of any of them).  The names below are the
package's interface to the stages.
"""

from __future__ import annotations

from convd.image.containers.driver import Unpacked, unpack
from convd.image.containers.kinds import ARCHIVES, COMPRESSIONS, HEAD, KINDS, describe, foreign, sniff
from convd.image.containers.ova import ovf_disks, parse_manifest
from convd.image.containers.stated import Plan, plan
from convd.image.containers.streams import Budget

__all__ = [
    "ARCHIVES",
    "COMPRESSIONS",
    "HEAD",
    "KINDS",
    "Budget",
    "Plan",
    "Unpacked",
    "describe",
    "foreign",
    "ovf_disks",
    "parse_manifest",
    "plan",
    "sniff",
    "unpack",
]
