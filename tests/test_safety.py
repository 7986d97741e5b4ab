"""The safety gate and the rules for odd inputs: each rejected file keeps its bytes in failed/."""

from __future__ import annotations

import os
import struct

from conftest import MiB, images_equal, make_image, run, sha256_file, wait_for, write_config


def test_output_hiding_a_qcow2_inside_is_rejected_and_source_kept(tmp_path, spool, daemon_factory):
    # A qcow2 whose *guest content* is itself a qcow2 image: converted to raw,
    # the output would be a qcow2 file that a later consumer might open.
    inner = make_image(tmp_path / "inner.qcow2", "qcow2", 4 * MiB)
    outer = tmp_path / "outer.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", inner, outer)
    daemon_factory(write_config(tmp_path))
    spool.drop(outer)
    rec = spool.wait_record("outer.qcow2")
    assert rec["error"]["code"] == "unsafe_image", rec
    assert "inspects as qcow2" in rec["error"]["message"]
    assert sha256_file(spool.failed / "outer.qcow2") == sha256_file(outer)
    assert not (spool.outgoing / "outer.qcow2").exists()


def test_fixed_vhd_footer_claiming_more_than_the_file_holds_is_corrupt(tmp_path, spool, daemon_factory):
    # (This file was once the format_mismatch example: the inspector read
    # current_size, qemu the CHS geometry.  convd now applies qemu's own
    # rule, so the only fault left is the real one: data the file lacks.)
    vhd = tmp_path / "lying.vhd"
    run("qemu-img", "create", "-f", "vpc", "-o", "subformat=fixed", vhd, "10M")
    size = vhd.stat().st_size
    with open(vhd, "r+b") as fh:  # a Hyper-V footer (current_size rules) claiming 20 MiB
        fh.seek(size - 512)
        foot = bytearray(fh.read(512))
        foot[28:32] = b"win "
        struct.pack_into(">Q", foot, 48, 20 * MiB)
        struct.pack_into(">I", foot, 64, 0)
        struct.pack_into(">I", foot, 64, ~sum(foot) & 0xFFFFFFFF)
        fh.seek(size - 512)
        fh.write(foot)
    daemon_factory(write_config(tmp_path))
    spool.drop(vhd)
    rec = spool.wait_record("lying.vhd")
    assert rec["error"]["code"] == "corrupt_image", rec
    assert "past the end of the file" in rec["error"]["message"]
    assert rec["source"]["format"] == "vpc"


def test_header_qemu_cannot_open_is_corrupt_image(tmp_path, spool, daemon_factory):
    img = make_image(tmp_path / "whole.qcow2", "qcow2", 4 * MiB)
    data = bytearray(img.read_bytes())
    struct.pack_into(">I", data, 20, 40)  # cluster_bits = 40: no qemu opens that
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(data))
    daemon_factory(write_config(tmp_path))
    spool.drop(bad)
    rec = spool.wait_record("bad.qcow2")
    assert rec["error"]["code"] == "corrupt_image", rec
    assert "cluster size" in rec["error"]["message"]
    assert (spool.failed / "bad.qcow2").read_bytes() == bytes(data)


def test_fixed_vhd_is_vpc_not_raw(tmp_path, spool, daemon_factory):
    vhd = make_image(tmp_path / "fixed.vhd", "vpc", 8 * MiB, opts="subformat=fixed")
    daemon_factory(write_config(tmp_path, convert={"target_format": "vpc"}))
    spool.drop(vhd)
    rec = spool.wait_record("fixed.vhd")
    assert rec["source"]["format"] == "vpc"
    assert rec["status"] == "passthrough", rec


def test_symlink_fifo_and_directory_are_not_regular_files(tmp_path, spool, daemon_factory):
    d = daemon_factory(write_config(tmp_path))
    secret = tmp_path / "secret"
    secret.write_text("do not read me")
    os.symlink(secret, spool.incoming / "link.raw")
    os.mkfifo(spool.incoming / "pipe.raw")
    (spool.incoming / "dir.raw").mkdir()
    for name in ("link.raw", "pipe.raw", "dir.raw"):
        rec = spool.wait_record(name)
        assert rec["error"]["code"] == "not_regular_file", rec
        assert os.path.lexists(spool.failed / name)
    assert os.readlink(spool.failed / "link.raw") == str(secret)
    assert secret.read_text() == "do not read me"
    # The daemon is still alive and converting after a FIFO.
    ok = make_image(tmp_path / "after.qcow2", "qcow2", 2 * MiB)
    spool.drop(ok)
    assert spool.wait_record("after.qcow2")["status"] == "converted"
    assert d.proc.poll() is None


def test_existing_output_is_a_name_conflict(tmp_path, spool, daemon_factory):
    img = make_image(tmp_path / "dup.qcow2", "qcow2", 2 * MiB)
    daemon_factory(write_config(tmp_path))
    spool.drop(img)
    first = spool.wait_record("dup.qcow2")
    assert first["status"] == "converted"
    spool.drop(img)
    wait_for(lambda: (spool.failed / "dup.qcow2.json").exists(), 30, what="second copy rejected")
    rec = spool.record("dup.qcow2")  # outgoing's record is untouched
    assert rec == first
    import json

    failed = json.loads((spool.failed / "dup.qcow2.json").read_text())
    assert failed["error"]["code"] == "name_conflict"
    assert images_equal(img, "qcow2", spool.outgoing / "dup.qcow2", "raw")
    assert (spool.failed / "dup.qcow2").read_bytes() == img.read_bytes()


def test_unsupported_format_by_config(tmp_path, spool, daemon_factory):
    img = make_image(tmp_path / "a.vdi", "vdi", 2 * MiB)
    daemon_factory(write_config(tmp_path, convert={"allowed_formats": ["raw", "qcow2"]}))
    spool.drop(img)
    rec = spool.wait_record("a.vdi")
    assert rec["error"]["code"] == "unsupported_format" and "vdi" in rec["error"]["message"]


def test_ignored_names_wait_until_renamed(tmp_path, spool, daemon_factory):
    img = make_image(tmp_path / "x.qcow2", "qcow2", 2 * MiB)
    daemon_factory(write_config(tmp_path))
    for name in (".hidden", "upload.part", "upload.tmp"):
        (spool.incoming / name).write_bytes(img.read_bytes())
    os.rename(spool.incoming / "upload.part", spool.incoming / "upload.qcow2")
    assert spool.wait_record("upload.qcow2")["status"] == "converted"
    assert sorted(os.listdir(spool.incoming)) == [".hidden", "upload.tmp"]


def test_convert_over_its_time_limit_fails_timeout_and_keeps_the_source(tmp_path, spool, daemon_factory):
    img = make_image(tmp_path / "slow.qcow2", "qcow2", 32 * MiB)
    # -r: qemu-img's own rate limit (bytes/s) makes this convert take ~30 s.
    cfg = write_config(tmp_path, convert={"timeout": "2s"}, **{"convert.qemu_args": {"qcow2": ["-r", "1M"]}})
    daemon_factory(cfg)
    spool.drop(img)
    rec = spool.wait_record("slow.qcow2")
    assert rec["error"]["code"] == "timeout", rec
    assert "2 s" in rec["error"]["message"]
    assert (spool.failed / "slow.qcow2").read_bytes() == img.read_bytes()
    spool.wait_work_empty()


def test_hard_linked_source_is_rejected_so_no_other_name_can_change_it(tmp_path, spool, daemon_factory):
    img = make_image(tmp_path / "linked.qcow2", "qcow2", 2 * MiB)
    daemon_factory(write_config(tmp_path))
    keep = spool.incoming / ".keep.part"  # ignored by convd, but it is the same inode
    keep.write_bytes(img.read_bytes())
    os.link(keep, spool.incoming / "linked.qcow2")
    rec = spool.wait_record("linked.qcow2")
    assert rec["error"]["code"] == "unsafe_image" and "hard links" in rec["error"]["message"]
    assert (spool.failed / "linked.qcow2").read_bytes() == img.read_bytes()


def test_name_that_is_not_utf8_neither_crashes_the_daemon_nor_is_lost(tmp_path, spool, daemon_factory):
    img = make_image(tmp_path / "plain.qcow2", "qcow2", 2 * MiB)
    d = daemon_factory(write_config(tmp_path))
    odd = os.path.join(os.fsencode(spool.incoming), b"caf\xe9.qcow2")
    with open(odd, "wb") as fh:
        fh.write(img.read_bytes())
    spool.drop(img)
    assert spool.wait_record("plain.qcow2")["status"] == "converted"
    wait_for(lambda: os.path.exists(os.path.join(os.fsencode(spool.outgoing), b"caf\xe9.qcow2.json")), 60,
             what="the odd name's record")
    assert d.proc.poll() is None


def test_file_renamed_in_right_after_writing_is_taken_without_waiting_settle(tmp_path, spool, daemon_factory):
    # Written and renamed within one timestamp tick, so ctime == mtime: only
    # the rename event tells it from a file written in place.
    daemon_factory(write_config(tmp_path, watch={"settle": 120}))
    data = os.urandom(1 << 20)
    part = spool.incoming / ".quick.part"
    with open(part, "wb") as fh:
        fh.write(data)
    os.rename(part, spool.incoming / "quick.raw")
    rec = spool.wait_record("quick.raw", timeout=30)  # far less than settle
    assert rec["status"] == "passthrough"
    assert (spool.outgoing / "quick.raw").read_bytes() == data
