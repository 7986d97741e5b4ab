"""Target layouts (contract section 9) through a real daemon and the real qemu-img.

Each ``[target.FMT]`` setting must produce what ``qemu-img info`` says it
should, with the source's content (``qemu-img compare``), say so in the
record's ``target.layout``, and reserve at least what the output takes on
disk: within 10 % of it where the layout writes only the data (sparse raw,
qcow2, compressed qcow2 of incompressible data) or the whole disk
(preallocated raw and qcow2).  A compressed qcow2 of data that compresses is
reserved by its uncompressed measure while it is written, then trimmed to
what it takes as soon as the conversion ends (the ``settled`` event): from
there to its publish the ledger holds within 10 % of its allocated size.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from convd import protocol

from conftest import MiB, images_equal, qemu_io, run, write_config

VSIZE = 256 * MiB
# Tight enough that nothing takes the cheap upper-bound path (reserve.py's
# CHEAP_BOUND and "twice the bound fits"): every reservation is measured.
WORKSPACE = "400MiB"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 MiB VDI (a format no case here targets: never a passthrough) with 40 MiB of random
    (incompressible) data, 1 MiB of a pattern, written zeros and holes."""
    d = tmp_path_factory.mktemp("layout-src")
    raw = d / "src.raw"
    run("qemu-img", "create", "-f", "raw", raw, str(VSIZE))
    with open(raw, "r+b") as fh:
        for off in range(0, 160 * MiB, 32 * MiB):  # 5 extents of 8 MiB
            fh.seek(off)
            fh.write(os.urandom(8 * MiB))
    # Written zeros, and one compressible MiB (what a compressed layout shrinks).
    qemu_io(raw, "raw", f"write -z {200 * MiB} {4 * MiB}", f"write -P 0x5a {220 * MiB} {MiB}")
    out = d / "src.vdi"
    run("qemu-img", "convert", "-f", "raw", "-O", "vdi", raw, out)
    raw.unlink()
    return out


@pytest.fixture(scope="module")
def text_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 MiB VDI whose first 64 MiB are repeated text (compresses about a hundredfold), the rest holes."""
    d = tmp_path_factory.mktemp("layout-text")
    raw = d / "text.raw"
    run("qemu-img", "create", "-f", "raw", raw, str(VSIZE))
    line = b"".join(b"%06d the quick brown fox jumps over the lazy dog, convd compresses this\n" % i
                    for i in range(1000))
    with open(raw, "r+b") as fh:
        block = (line * (MiB // len(line) + 1))[:MiB]
        for _ in range(64):
            fh.write(block)
    out = d / "text.vdi"
    run("qemu-img", "convert", "-f", "raw", "-O", "vdi", raw, out)
    raw.unlink()
    return out


def info(path: Path, fmt: str) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "-f", fmt, "--output=json", path).stdout)


def vhd_disk_type(path: Path) -> int:
    """The VHD footer's disk type (2 fixed, 3 dynamic), as block/vpc.c reads it."""
    with open(path, "rb") as fh:
        fh.seek(-512, os.SEEK_END)
        footer = fh.read(512)
    assert footer[:8] == b"conectix"
    return struct.unpack(">I", footer[60:64])[0]


def convert_one(tmp_path: Path, spool: Any, daemon_factory: Any, source: Path, target: str,
                layout: dict[str, Any], settled: list[int] | None = None) -> tuple[dict[str, Any], Path, int]:
    """Convert ``source`` through a daemon; the record, the output and the estimate reserved.

    ``settled`` gets the reservation's size once trimmed after the conversion (if it was).
    """
    sections: dict[str, dict[str, Any]] = {
        "convert": {"target_format": target},
        "limits": {"workspace": WORKSPACE, "min_free": 0},
    }
    if layout:
        sections[f"target.{target}"] = layout
    d = daemon_factory(write_config(tmp_path, **sections))
    spool.drop(source, "img")
    rec = spool.wait_record("img")
    d.stop()
    assert rec["status"] == "converted", rec
    reserved = [e["bytes"] for e in d.events() if e.get("event") == "estimated"]
    assert len(reserved) == 1, d.log()[-2000:]
    if settled is not None:
        settled += [e["bytes"] for e in d.events() if e.get("event") == "settled"]
    out = spool.outgoing / "img"
    assert images_equal(source, "vdi", out, target)
    assert info(out, target)["virtual-size"] == VSIZE
    return rec, out, reserved[0]


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


QCOW2_CASES = [
    ({}, {"compat": "1.1", "cluster_size": 65536, "compression": "none", "preallocation": "off"}, True),
    ({"compression": "zlib", "compat": "0.10", "cluster_size": "128KiB"},
     {"compat": "0.10", "cluster_size": 131072, "compression": "zlib", "preallocation": "off"}, True),
    ({"compression": "zstd"},
     {"compat": "1.1", "cluster_size": 65536, "compression": "zstd", "preallocation": "off"}, True),
    ({"preallocation": "metadata"},
     {"compat": "1.1", "cluster_size": 65536, "compression": "none", "preallocation": "metadata"}, False),
    ({"preallocation": "falloc", "cluster_size": "2MiB"},
     {"compat": "1.1", "cluster_size": 2 << 20, "compression": "none", "preallocation": "falloc"}, True),
    ({"preallocation": "full"},
     {"compat": "1.1", "cluster_size": 65536, "compression": "none", "preallocation": "full"}, True),
]


@pytest.mark.parametrize("layout,recorded,close", QCOW2_CASES,
                         ids=["default", "zlib-0.10-128k", "zstd", "metadata", "falloc-2m", "full"])
def test_qcow2_layout_is_produced_recorded_and_reserved(tmp_path, spool, daemon_factory, source,
                                                         layout, recorded, close):
    rec, out, reserved = convert_one(tmp_path, spool, daemon_factory, source, "qcow2", layout)
    assert rec["target"]["layout"] == recorded
    spec = info(out, "qcow2")["format-specific"]["data"]
    assert spec["compat"] == recorded["compat"]
    assert info(out, "qcow2")["cluster-size"] == recorded["cluster_size"]
    if recorded["compression"] != "none":
        assert spec.get("compression-type", "zlib") == recorded["compression"]
        # qemu keeps a cluster that does not shrink as it is (the random
        # data); the pattern MiB does.
        chk = json.loads(run("qemu-img", "check", "-f", "qcow2", "--output=json", out).stdout)
        assert chk.get("compressed-clusters", 0) >= MiB // recorded["cluster_size"]
    if recorded["preallocation"] in ("falloc", "full"):
        assert allocated(out) >= VSIZE
    assert reserved >= allocated(out)
    if close:
        assert reserved <= allocated(out) * 1.10, (reserved, allocated(out))


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_qcow2_of_compressible_data_holds_what_it_takes_once_written(
        tmp_path, spool, daemon_factory, text_source, compression):
    settled: list[int] = []
    rec, out, reserved = convert_one(tmp_path, spool, daemon_factory, text_source, "qcow2",
                                     {"compression": compression}, settled)
    assert rec["target"]["layout"]["compression"] == compression
    chk = json.loads(run("qemu-img", "check", "-f", "qcow2", "--output=json", out).stdout)
    assert chk.get("compressed-clusters", 0) >= 64 * MiB // 65536
    # Measured as if uncompressed while it is written: at least the text...
    assert reserved >= 64 * MiB > 10 * allocated(out), (reserved, allocated(out))
    # ...then trimmed to the output's own size before its publish, never below it.
    assert len(settled) == 1, settled
    assert allocated(out) <= settled[0] <= allocated(out) * 1.10, (settled, allocated(out))


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_raw_preallocation_is_produced_recorded_and_reserved(tmp_path, spool, daemon_factory, source, prealloc):
    layout = {} if prealloc == "off" else {"preallocation": prealloc}
    rec, out, reserved = convert_one(tmp_path, spool, daemon_factory, source, "raw", layout)
    assert rec["target"]["layout"] == {"preallocation": prealloc}
    assert out.stat().st_size == VSIZE
    if prealloc == "off":
        assert allocated(out) < VSIZE // 2  # holes stay holes
    else:
        assert allocated(out) >= VSIZE
    assert allocated(out) <= reserved <= allocated(out) * 1.10, (reserved, allocated(out))


@pytest.mark.parametrize("subformat,disk_type", [("dynamic", 3), ("fixed", 2)])
def test_vpc_subformat_keeps_the_virtual_size(tmp_path, spool, daemon_factory, source, subformat, disk_type):
    layout = {} if subformat == "dynamic" else {"subformat": subformat}
    rec, out, reserved = convert_one(tmp_path, spool, daemon_factory, source, "vpc", layout)
    assert rec["target"]["layout"] == {"subformat": subformat}
    assert vhd_disk_type(out) == disk_type
    if subformat == "fixed":
        assert out.stat().st_size == VSIZE + 512  # the disk, then the footer
    assert reserved >= allocated(out)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_vmdk_subformat_is_produced(tmp_path, spool, daemon_factory, source, subformat):
    layout = {} if subformat == "monolithicSparse" else {"subformat": subformat}
    rec, out, reserved = convert_one(tmp_path, spool, daemon_factory, source, "vmdk", layout)
    assert rec["target"]["layout"] == {"subformat": subformat}
    assert info(out, "vmdk")["format-specific"]["data"]["create-type"] == subformat
    assert reserved >= allocated(out)


def test_source_already_in_the_target_format_is_converted_to_the_asked_layout(tmp_path, spool, daemon_factory):
    src = tmp_path / "plain.qcow2"
    run("qemu-img", "create", "-f", "qcow2", src, "8M")
    qemu_io(src, "qcow2", "write -P 7 0 1M")
    cfg = write_config(tmp_path, convert={"target_format": "qcow2"}, **{"target.qcow2": {"compression": "zstd"}})
    daemon_factory(cfg)
    spool.drop(src)
    rec = spool.wait_record("plain.qcow2")
    assert rec["status"] == "converted", rec
    assert rec["target"]["layout"]["compression"] == "zstd"
    assert images_equal(src, "qcow2", spool.outgoing / "plain.qcow2", "qcow2")


def test_azure_recipe_refuses_a_virtual_size_that_is_not_a_whole_mib(tmp_path, spool, daemon_factory):
    odd = tmp_path / "odd.qcow2"
    run("qemu-img", "create", "-f", "qcow2", odd, str(4 * MiB + 512))
    whole = tmp_path / "whole.qcow2"
    run("qemu-img", "create", "-f", "qcow2", whole, str(4 * MiB))
    cfg = write_config(tmp_path, convert={"target_format": "vpc"},
                       **{"target.vpc": {"subformat": "fixed", "size_multiple": "1MiB"}})
    daemon_factory(cfg)
    spool.drop(odd)
    spool.drop(whole)
    rec = spool.wait_record("odd.qcow2")
    assert rec["status"] == "failed" and rec["error"]["code"] == "unsupported_format", rec
    assert "whole multiple of 1048576 bytes" in rec["error"]["message"]
    assert (spool.failed / "odd.qcow2").read_bytes() == odd.read_bytes()
    ok = spool.wait_record("whole.qcow2")
    assert ok["status"] == "converted" and ok["target"]["layout"] == {"subformat": "fixed",
                                                                      "size_multiple": MiB}
    assert (spool.outgoing / "whole.qcow2").stat().st_size == 4 * MiB + 512


@pytest.mark.parametrize("section,body,key", [
    ("target.qcow2", {"compression": "zstd", "compat": "0.10"}, "[target.qcow2] compression"),
    ("target.qcow2", {"compression": "zlib", "preallocation": "metadata"}, "[target.qcow2] preallocation"),
    ("target.qcow2", {"cluster_size": "96KiB"}, "[target.qcow2] cluster_size"),
    ("target.raw", {"preallocation": "metadata"}, "[target.raw] preallocation"),
    ("target.vpc", {"subformat": "fixed-size"}, "[target.vpc] subformat"),
    ("target.vmdk", {"subformat": "twoGbMaxExtentSparse"}, "[target.vmdk] subformat"),
    ("target.vdi", {"static": True}, "[target.vdi]"),
    ("target.qcow2", {"lazy_refcounts": True}, "[target.qcow2] lazy_refcounts"),
    ("convert", {"rate_limit": "-1"}, "[convert] rate_limit"),
])
def test_check_config_refuses_what_qemu_img_would_naming_the_key(tmp_path, section, body, key):
    from conftest import convd_bin

    cfg = write_config(tmp_path, **{section: body})
    r = run(convd_bin(), "check-config", "-c", cfg, check=False)
    assert r.returncode == 1
    assert key in r.stderr, r.stderr


def test_rate_limit_is_shown_and_a_reload_applies_to_children_started_after_it(tmp_path, spool, daemon_factory):
    # 16 MiB of data at 1 MiB/s: the conversion runs long enough to be seen.
    # No timing is asserted: what status says, and the -r the child got.
    import signal

    from conftest import convd_bin, wait_for

    img = tmp_path / "slow.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, str(32 * MiB))
    qemu_io(img, "qcow2", f"write -P 9 0 {16 * MiB}")
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = write_config(tmp_path, convert={"rate_limit": "1MiB"}, metrics={"listen": f"127.0.0.1:{port}"})
    d = daemon_factory(cfg)

    def gauges() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                if ln.startswith("convd_rate_")}

    spool.drop(img)

    def status() -> dict[str, Any]:
        r = run(convd_bin(), "status", "-c", cfg, "--json", check=False)
        return json.loads(r.stdout)["daemon"] if r.stdout.strip() else {}

    def converting() -> bool:
        st = status()
        return any(i["stage"] == "convert" for i in (st or {}).get("in_flight", []))

    wait_for(converting, 30, interval=0.2, what="the conversion to start")
    assert wait_for(lambda: status().get("bandwidth") == {"limit": MiB, "in_use": MiB}, 10,
                    what="status to show the cap in use")
    assert wait_for(lambda: gauges() == {"convd_rate_limit_bytes_per_second": MiB,
                                         "convd_rate_in_use_bytes_per_second": MiB}, 10,
                    what="/metrics to show the cap in use")
    text = run(convd_bin(), "status", "-c", cfg).stdout
    assert "bandwidth: 1.0 MiB/s, 1.0 MiB/s granted" in text, text
    cmdlines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
        except OSError:
            pass  # gone meanwhile
    children = [c for c in cmdlines if len(c) > 2 and c[0].endswith(b"qemu-img") and c[1] == b"convert"
                and str(spool.root).encode() in b" ".join(c)]
    assert children and all(c[c.index(b"-r") + 1] == str(MiB).encode() for c in children), children
    # A reload: the cap changes now; the running child keeps its share.
    cfg.write_text(cfg.read_text().replace('rate_limit = "1MiB"', 'rate_limit = "4MiB"'))
    d.signal(signal.SIGHUP)
    assert wait_for(lambda: status().get("bandwidth") == {"limit": 4 * MiB, "in_use": MiB}, 10,
                    what="status to show the new cap")
    rec = spool.wait_record("slow.qcow2", timeout=120)
    assert rec["status"] == "converted"
    assert images_equal(img, "qcow2", spool.outgoing / "slow.qcow2", "raw")
    assert wait_for(lambda: status().get("bandwidth", {}).get("in_use") == 0, 10, what="the share returned")


# -- a producer's layout request (incoming/.convd-layout.NAME) ----------------------


def test_a_producer_layout_request_is_laid_over_the_daemon_target_and_recorded(tmp_path, spool, daemon_factory):
    src = tmp_path / "disk.vdi"
    run("qemu-img", "create", "-f", "vdi", src, "8M")
    qemu_io(src, "vdi", "write -P 7 0 1M", "write -P 9 4M 1M")
    cfg = write_config(tmp_path, convert={"target_format": "qcow2"}, **{"target.qcow2": {"cluster_size": "128KiB"}})
    daemon_factory(cfg)
    paths = protocol.SpoolPaths.under(spool.root)
    staged = tmp_path / "staged"
    shutil.copyfile(src, staged)
    # the raw section is for a raw target: not this daemon's, so it changes nothing here
    protocol.hand_in(staged, paths, "asked",
                     layout={"qcow2": {"compression": "zstd"}, "raw": {"preallocation": "full"}})
    spool.drop(src, "plain")
    asked, plain = spool.wait_record("asked"), spool.wait_record("plain")
    assert asked["status"] == plain["status"] == "converted", (asked, plain)
    # the request's key over the daemon's [target.qcow2], the rest the daemon's
    assert asked["target"]["layout"] == {"compat": "1.1", "cluster_size": 131072, "compression": "zstd",
                                         "preallocation": "off"}
    out = info(spool.outgoing / "asked", "qcow2")
    assert (out["cluster-size"], out["format-specific"]["data"]["compression-type"]) == (131072, "zstd")
    assert images_equal(src, "vdi", spool.outgoing / "asked", "qcow2")
    # the next item, without a request, gets the daemon's own layout
    assert plain["target"]["layout"]["compression"] == "none"
    assert info(spool.outgoing / "plain", "qcow2")["format-specific"]["data"]["compression-type"] == "zlib"
    assert not any(n.startswith(protocol.LAYOUT_PREFIX) for n in os.listdir(spool.incoming))


@pytest.mark.parametrize("body,words", [
    ({"qcow2": {"compression": "zstd", "compat": "0.10"}}, "[target.qcow2] compression: 'zstd' needs compat"),
    ({"qcow2": {"cluster_size": "3KiB"}}, "[target.qcow2] cluster_size: must be a power of two"),
    ({"qcow2": {"qemu_args": "-o"}}, "which is not a [target.qcow2] key"),
    ({"qcow2": {"preallocation": ["full"]}}, '"preallocation" is not str'),
    ({"vdi": {"static": "on"}}, "'vdi', which is not a target format with a layout"),
    ({"qcow2": {"cluster_size": -1}}, '"cluster_size" is negative'),
    ({}, "it asks for nothing"),
], ids=["zstd-0.10", "cluster-3k", "unknown-key", "list", "no-layout-format", "negative", "empty"])
def test_a_layout_request_check_config_would_refuse_fails_the_item_naming_why_and_keeps_the_bytes(
        tmp_path, spool, daemon_factory, body, words):
    src = tmp_path / "disk.vdi"
    run("qemu-img", "create", "-f", "vdi", src, "4M")
    qemu_io(src, "vdi", "write -P 7 0 1M")
    daemon_factory(write_config(tmp_path, convert={"target_format": "qcow2"}))
    # written as a hostile producer would, past hand_in's own check
    (spool.incoming / f"{protocol.LAYOUT_PREFIX}img").write_text(json.dumps(body))
    spool.drop(src, "img")
    rec = spool.wait_record("img")
    assert rec["status"] == "failed" and rec["error"]["code"] == "unsupported_format", rec
    assert words in rec["error"]["message"] and f"{protocol.LAYOUT_PREFIX}img" in rec["error"]["message"]
    assert str(tmp_path) not in rec["error"]["message"]
    assert (spool.failed / "img").read_bytes() == src.read_bytes()


def test_a_layout_request_that_is_a_link_is_not_followed_and_the_item_fails_saying_so(tmp_path, spool, daemon_factory):
    src = tmp_path / "disk.vdi"
    run("qemu-img", "create", "-f", "vdi", src, "4M")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"qcow2": {"compression": "zstd"}}))
    daemon_factory(write_config(tmp_path, convert={"target_format": "qcow2"}))
    os.symlink(secret, spool.incoming / f"{protocol.LAYOUT_PREFIX}img")
    spool.drop(src, "img")
    rec = spool.wait_record("img")
    assert rec["status"] == "failed" and rec["error"]["code"] == "unsupported_format", rec
    assert "it is a symbolic link" in rec["error"]["message"]
    assert secret.exists() and (spool.failed / "img").read_bytes() == src.read_bytes()
