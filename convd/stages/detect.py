"""Detect: the safety gate.  Pure-Python inspection first, then ``qemu-img info``
under resource limits, and the two must agree before anything converts."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio

from convd.config import format_size
from convd.errors import CorruptImage, FormatMismatch, ItemError, TooLarge, UnsafeImage, UnsupportedFormat
from convd.image import targets
from convd.image.inspection import RAW_FAMILY, inspect_fd, open_regular
from convd.image.signatures import DELTA
from convd.pipeline.item import Item, Stage
from convd.qemu import img as qemu

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["CHECKED_FORMATS", "VMDK_CREATE_TYPES", "check_consistency", "check_qemu_info", "detect"]

VMDK_CREATE_TYPES = ("monolithicSparse", "streamOptimized")
# Formats whose consistency `qemu-img check` judges beyond convd.image.integrity's
# bounds checks: qcow2's refcounts reveal clusters that two L2 entries share
# (one guest region reading another's data).  vdi, vmdk and vhdx checks add
# nothing integrity does not already do, and vpc has none: no spawn for them.
# A dirty qcow2 (lazy refcounts after a crash) is skipped: its refcounts lag
# by design, and qemu reads it through L1/L2 alone, which integrity checks,
# overlaps with the image's own metadata included (what check would find).
CHECKED_FORMATS = ("qcow2",)


async def check_consistency(path: str, fmt: str, item: Item, options: Mapping[str, str] | None = None) -> None:
    """``qemu-img check``: corruptions mean the guest would not read what was written."""
    report = await qemu.check(path, fmt, limits=item.cfg.detect, name=item.label, options=options or {})
    corruptions, errors = report.get("corruptions", 0), report.get("check-errors", 0)
    if corruptions or errors:
        what = ", ".join(part for part in (f"{corruptions} corruptions" if corruptions else "",
                                           f"{errors} check errors" if errors else "") if part)
        first = report.get("first_error")
        raise CorruptImage(f"qemu-img check: {what}" + (f" (first: {first})" if first else ""))


def check_qemu_info(info: dict[str, Any], fmt: str, virtual_size: int, path: str) -> None:
    """qemu-img's view must match the inspector's and hide nothing outside the file.

    ``virtual_size`` is the inspector's, corrected to the rule qemu-img
    applies for the format (:func:`convd.image.integrity.verify`), so only a real
    disagreement is a mismatch.
    """
    if info.get("format") != fmt:
        raise FormatMismatch(f"inspector says {fmt}, qemu-img info -f {fmt} says {info.get('format')}")
    if info.get("virtual-size") != virtual_size:
        raise FormatMismatch(
            f"{fmt} virtual size: inspector {virtual_size}, qemu-img {info.get('virtual-size')}"
        )
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UnsafeImage(f"{fmt} has a backing file (an overlay), {DELTA} {info.get('backing-filename')}")
    data = info.get("format-specific", {}).get("data", {}) or {}
    if data.get("data-file"):
        raise UnsafeImage(f"{fmt} external data file {data['data-file']}")
    if data.get("corrupt"):
        raise CorruptImage(f"{fmt}: qemu-img info says the image is marked corrupt")
    if fmt == "vmdk":
        ctype = data.get("create-type")
        if ctype not in VMDK_CREATE_TYPES:
            raise UnsafeImage(f"VMDK create type {ctype} (extents in other files) is not allowed")
        real = os.path.realpath(path)
        for ext in data.get("extents", []):
            name = ext.get("filename")
            # convd's runs hand qemu-img the file as a descriptor (qemu.SOURCE_FILENAME).
            if name and name != qemu.SOURCE_FILENAME and os.path.realpath(name) != real:
                raise UnsafeImage(f"VMDK extent outside the file: {name}")


async def detect(item: Item, ctx: Context) -> Stage:
    t0 = time.monotonic()
    cfg = item.cfg
    path = str(item.claim.source)
    try:
        fd = open_regular(path)
        try:
            st = os.fstat(fd)
            item.source = {"format": None, "size": st.st_size}
            if st.st_nlink != 1 and item.claim.source_path is None:
                # Another name (a hard link left behind) could rewrite the
                # bytes after they are vetted: qemu-img reads them again later.
                raise UnsafeImage(f"the file has {st.st_nlink} hard links; another name could change "
                                  "it after the safety checks")
            item.vet(st)
            insp = await anyio.to_thread.run_sync(functools.partial(inspect_fd, fd, stop=ctx.stop))
        finally:
            os.close(fd)
    except ItemError as exc:
        if exc.detected:
            item.source["format"] = exc.detected
        raise
    finally:
        item.timings["detect"] += time.monotonic() - t0
    t0 = time.monotonic()
    item.inspection = insp
    item.source = insp.as_dict()
    if insp.format not in cfg.convert.allowed_formats:
        raise UnsupportedFormat(
            f"{insp.format} is not in allowed_formats ({', '.join(cfg.convert.allowed_formats)})"
        )
    if insp.virtual_size > cfg.limits.max_virtual_size:
        raise TooLarge(f"virtual size {format_size(insp.virtual_size)} is over max_virtual_size "
                       f"{format_size(cfg.limits.max_virtual_size)}")
    # The target's own limits: known before converting, so never a convert_failed after retries.
    targets.check_virtual_size(item.target_format, insp.virtual_size, layout=cfg.target)
    if insp.qemu_format != "raw":
        # Raw-family images are skipped: `qemu-img info -f raw` has no
        # metadata to read and can only restate the file size.
        info = await qemu.info(path, insp.qemu_format, cpu_time=cfg.detect.cpu_time,
                               address_space=cfg.detect.address_space, name=item.label,
                               options=insp.driver_options)
        check_qemu_info(info, insp.qemu_format, insp.virtual_size, path)
        if insp.qemu_format in CHECKED_FORMATS and not info.get("dirty-flag"):
            await check_consistency(path, insp.qemu_format, item, insp.driver_options)
    item.timings["detect"] += time.monotonic() - t0
    target = item.target_format
    item.passthrough = insp.qemu_format == target or (target == "raw" and insp.format in RAW_FAMILY)
    if item.passthrough and insp.size_rule == "current_size":
        # A VHD sized by its Current Size that this qemu, told nothing, reads
        # by geometry (VirtualBox, Azure, most creators in qemu 7.2):
        # published as it is, a consumer's qemu would drop its tail.
        # Converted, it carries qemu's own creator (force_size: 'qem2'),
        # which every qemu reads at Current Size.  Newer qemu only moved
        # towards Current Size, so agreement here holds for them too.
        plain = await qemu.info(path, insp.qemu_format, cpu_time=cfg.detect.cpu_time,
                                address_space=cfg.detect.address_space, name=item.label)
        if plain.get("virtual-size") != insp.virtual_size:
            item.passthrough = False
    return Stage.RESERVE
