"""What a member of the spool's group can plant beside its drops (issue 24, found by an
attacker's trial): nothing it leaves under a sidecar's, a temp file's or a record's name
stops, wedges or restarts the daemon, against a real ``convd run``."""

from __future__ import annotations

import bz2
import fcntl
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from convd import protocol

from conftest import Daemon, MiB, Spool, make_image, write_config


def test_a_directory_under_a_priority_sidecars_name_is_set_aside_and_the_item_converts(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(write_config(tmp_path))
    (spool.incoming / f"{protocol.PRIORITY_PREFIX}x").mkdir()
    spool.drop(make_image(tmp_path / "x.qcow2", "qcow2", 2 * MiB), "x")
    assert spool.wait_record("x")["status"] == "converted"
    assert d.proc.poll() is None
    assert not (spool.incoming / f"{protocol.PRIORITY_PREFIX}x").exists()


def test_a_name_too_long_for_any_sidecar_prefix_converts(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    # 241 bytes is the longest name convd takes; ".convd-priority." + it is over NAME_MAX.
    d = daemon_factory(write_config(tmp_path))
    name = "y" * 241
    spool.drop(make_image(tmp_path / "y.qcow2", "qcow2", 2 * MiB), name)
    assert spool.wait_record(name)["status"] == "converted"
    assert d.proc.poll() is None


def test_directories_under_temp_names_in_outgoing_and_failed_never_stop_a_start(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    cfg = write_config(tmp_path)
    daemon_factory(cfg).stop()
    old = time.time() - 7200  # past the age at which another instance's temp counts as abandoned
    for d in (spool.outgoing / ".y.tmp", spool.failed / ".x@test.deadbeef.tmp"):
        d.mkdir()
        os.utime(d, (old, old))
    d2 = daemon_factory(cfg)
    spool.drop(make_image(tmp_path / "z.qcow2", "qcow2", 2 * MiB), "z")
    assert spool.wait_record("z")["status"] == "converted"
    assert d2.proc.poll() is None


def test_a_fifo_under_a_records_name_is_not_read_as_a_record(tmp_path: Path) -> None:
    fifo = tmp_path / "race.json"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert protocol.read_record(fifo) is None  # returns at once: no writer needed
    assert time.monotonic() - t0 < 5
    (tmp_path / "link.json").symlink_to("/dev/zero")
    assert protocol.read_record(tmp_path / "link.json") is None


def test_a_source_under_a_producers_write_lease_is_refused_not_an_internal_error(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    # The producer owns its file before the claim, so it may hold a write
    # lease on it: convd's open then fails with EAGAIN, every time.
    d = daemon_factory(write_config(tmp_path))
    src = make_image(tmp_path / "w.qcow2", "qcow2", 2 * MiB)
    tmp = spool.incoming / ".w.part"
    tmp.write_bytes(src.read_bytes())
    fd = os.open(tmp, os.O_RDWR)
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease break notice
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        os.rename(tmp, spool.incoming / "w")
        rec = spool.wait_record("w")
        assert rec["error"]["code"] == "unsafe_image", rec
        assert "write lease" in rec["error"]["message"]
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, old)
    assert not [e for e in d.events() if e.get("event") == "internal error; the source stays in work/"]


def test_a_bzip2_disk_that_unpacks_to_most_of_the_workspace_converts(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    # bzip2 states no size: the unpack guesses (4x the dropped file) and
    # reserves ahead by doubling; neither guess may refuse a disk that fits.
    d = daemon_factory(write_config(tmp_path, limits={"workspace": "150MiB", "min_free": "1MiB"}))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(random.Random(7).randbytes(48 * MiB))  # incompressible: the guess is 192 MiB
    (tmp_path / "disk.raw.bz2").write_bytes(bz2.compress(disk.read_bytes(), 1))
    spool.drop(tmp_path / "disk.raw.bz2", "big.raw.bz2")
    rec = spool.wait_record("big.raw.bz2", timeout=180)
    assert rec["status"] in ("converted", "passthrough"), rec
    assert rec["target"]["virtual_size"] == 48 * MiB
    assert d.proc.poll() is None
