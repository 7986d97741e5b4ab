"""Workspace sizing through a real daemon: wait when short, too_large only when it could never fit."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import MiB, images_equal, qemu_io, run, wait_for, write_config


def full_image(path, virtual: int, data: int, fmt: str = "qcow2"):
    """``data`` bytes of non-zero pattern from offset 0, the rest unallocated."""
    run("qemu-img", "create", "-f", fmt, path, str(virtual))
    step = 8 * MiB
    cmds = [f"write -P {(i // step) % 200 + 1} {i} {min(step, data - i)}" for i in range(0, data, step)]
    qemu_io(path, fmt, *cmds)
    return path


def test_two_images_that_fit_only_one_at_a_time_both_convert(tmp_path, spool, daemon_factory):
    cfg = write_config(tmp_path, limits={"workspace": "100MiB", "min_free": 0})
    a = full_image(tmp_path / "a.qcow2", 64 * MiB, 64 * MiB)
    b = full_image(tmp_path / "b.qcow2", 64 * MiB, 64 * MiB)
    d = daemon_factory(cfg)
    spool.drop(a)
    spool.drop(b)
    ra, rb = spool.wait_record("a.qcow2"), spool.wait_record("b.qcow2")
    assert ra["status"] == rb["status"] == "converted"
    assert images_equal(a, "qcow2", spool.outgoing / "a.qcow2", "raw")
    assert images_equal(b, "qcow2", spool.outgoing / "b.qcow2", "raw")
    # One waited for the other's space.
    assert max(ra["timings"]["wait_space"], rb["timings"]["wait_space"]) > 0
    d.stop()


def test_output_that_could_never_fit_fails_too_large(tmp_path, spool, daemon_factory):
    cfg = write_config(tmp_path, limits={"workspace": "100MiB", "min_free": 0})
    big = full_image(tmp_path / "big.qcow2", 256 * MiB, 200 * MiB)
    daemon_factory(cfg)
    spool.drop(big)
    rec = spool.wait_record("big.qcow2")
    assert rec["status"] == "failed" and rec["error"]["code"] == "too_large", rec
    assert (spool.failed / "big.qcow2").stat().st_size == big.stat().st_size


def test_sparse_image_reserves_its_data_not_its_virtual_size(tmp_path, spool, daemon_factory):
    cfg = write_config(tmp_path, limits={"workspace": "100MiB", "min_free": 0})
    img = full_image(tmp_path / "sparse.qcow2", 1024 * MiB, 8 * MiB)
    daemon_factory(cfg)
    spool.drop(img)
    rec = spool.wait_record("sparse.qcow2")
    assert rec["status"] == "converted", rec
    out = spool.outgoing / "sparse.qcow2"
    assert out.stat().st_size == 1024 * MiB
    assert out.stat().st_blocks * 512 < 64 * MiB
    assert images_equal(img, "qcow2", out, "raw")


def test_virtual_size_over_the_limit_is_too_large(tmp_path, spool, daemon_factory):
    cfg = write_config(tmp_path, limits={"max_virtual_size": "1GiB"})
    run("qemu-img", "create", "-f", "qcow2", tmp_path / "huge.qcow2", "2G")
    daemon_factory(cfg)
    spool.drop(tmp_path / "huge.qcow2")
    rec = spool.wait_record("huge.qcow2")
    assert rec["error"]["code"] == "too_large" and "max_virtual_size" in rec["error"]["message"]


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_free_space_not_budget_is_the_limit_items_wait_and_all_convert(tmp_path, small_fs, daemon_factory):
    from conftest import Spool

    spool = Spool(small_fs / "spool")
    cfg = write_config(tmp_path, spool={"root": str(small_fs / "spool")},
                       limits={"workspace": "10GiB", "min_free": "10MiB"})
    names = []
    for i in range(3):
        src = full_image(tmp_path / f"img{i}.qcow2", 48 * MiB, 48 * MiB)
        comp = tmp_path / f"c{i}.qcow2"
        run("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", src, comp)
        names.append((comp, src))
    d = daemon_factory(cfg)
    for comp, _ in names:
        spool.drop(comp)
    pending = {comp.name: src for comp, src in names}

    def consume() -> bool:
        # A consumer takes each result away as it appears, freeing its space.
        for name in list(pending):
            rec = spool.record(name)
            if rec:
                assert rec["status"] == "converted", rec
                assert images_equal(pending.pop(name), "qcow2", spool.outgoing / name, "raw")
                (spool.outgoing / name).unlink()
        return not pending

    wait_for(consume, 90, interval=0.2, what="all three converted")
    d.stop()
    log = d.log()
    assert "retrying" not in log and "No space left" not in log
    waited = [e for e in d.events() if e.get("event") == "stage done" and e.get("stage") == "reserve"
              and e.get("duration", 0) > 0.5]
    assert waited, "with room for one output at a time, some item must have waited for space"


def test_status_reports_reserved_and_free_bytes(tmp_path, spool, daemon_factory):
    cfg = write_config(tmp_path, limits={"workspace": "1GiB"})
    daemon_factory(cfg)
    snap = wait_for(lambda: (spool.work / "test" / ".status.json").exists() and
                    (spool.work / "test" / ".status.json").read_text(), 20)
    import json

    ws = json.loads(snap)["workspace"]
    assert ws["limit"] == 1 << 30 and ws["reserved"] == 0 and ws["available"] > 0 and ws["filesystem_free"] > 0


def test_target_qemu_cannot_measure_reserves_the_upper_bound(tmp_path, spool, daemon_factory):
    # qemu-img 7.2 measures only raw and qcow2 outputs; a vpc target with
    # space too tight for the cheap path must still convert, not fail.
    cfg = write_config(tmp_path, convert={"target_format": "vpc"}, limits={"workspace": "200MiB", "min_free": 0})
    img = full_image(tmp_path / "m.qcow2", 100 * MiB, 8 * MiB)
    daemon_factory(cfg)
    spool.drop(img)
    rec = spool.wait_record("m.qcow2")
    assert rec["status"] == "converted", rec
    assert images_equal(img, "qcow2", spool.outgoing / "m.qcow2", "vpc")
