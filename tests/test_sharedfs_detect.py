"""Filesystem-type detection, the writer check on shared filesystems, and the shared space ledger."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from pathlib import Path

import anyio
import pytest
from test_ledger import FakeSpace  # one filesystem's free space, seen by both daemons

from convd.config import format_size
from convd.filesystem import _mount_fstype as mount_fstype
from convd.filesystem import classify, detect_type
from convd.pipeline.ledger import SHARED_STALE, Ledger, SharedLedger
from convd.pipeline.queue import Intake, Writer, writer_state

from conftest import wait_for

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /srv/spool rw,relatime shared:20 - nfs4 10.0.0.1:/export rw,vers=4.2
41 22 0:36 / /mnt/ceph rw,nosuid,nodev shared:21 - fuse.ceph-fuse ceph-fuse rw,user_id=0
42 22 0:37 / /mnt/gluster\\040vol rw shared:22 - fuse.glusterfs 127.0.0.2:/spoolvol rw
43 40 0:38 / /srv/spool/local rw shared:23 - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(("magic", "fstype", "kind", "shared"), [
    (0x6969, "nfs4", "nfs", True),
    (0x00C36400, "ceph", "cephfs", True),
    (0x65735546, "fuse.ceph-fuse", "cephfs", True),
    (0x65735546, "fuse.glusterfs", "glusterfs", True),
    (0xFF534D42, "cifs", "smb", True),
    (0xFE534D42, "smb3", "smb", True),
    (0x65735546, "fuse.somethingnew", "fuse", True),  # unknown FUSE: polling is always correct
    (0x65735546, "fuse.fuse-overlayfs", "fuse-overlayfs", False),
    (0xEF53, "ext4", "ext4", False),
    (0x58465342, "xfs", "xfs", False),
    (0x01021994, "tmpfs", "tmpfs", False),
    (0x12345678, "glusterfs", "glusterfs", True),  # magic unknown, mountinfo knows
])
def test_filesystem_kind_and_sharing_come_from_magic_and_mount_type(magic, fstype, kind, shared):
    fs = classify(magic, fstype)
    assert (fs.kind, fs.shared) == (kind, shared)


def test_fuse_filesystems_are_known_as_fuse_whatever_they_serve():
    # convd writes without O_DIRECT through FUSE (ceph-fuse left stale pages behind it).
    assert classify(0x65735546, "fuse.ceph-fuse").fuse
    assert classify(0x65735546, "fuse.fuse-overlayfs").fuse
    assert not classify(0x00C36400, "ceph").fuse
    assert not classify(0xEF53, "ext4").fuse


def test_the_deepest_mount_holding_a_path_gives_its_type(tmp_path):
    assert mount_fstype(Path("/srv/spool/incoming"), MOUNTINFO) == "nfs4"
    assert mount_fstype(Path("/srv/spool/local/x"), MOUNTINFO) == "tmpfs"
    assert mount_fstype(Path("/mnt/ceph"), MOUNTINFO) == "fuse.ceph-fuse"
    assert mount_fstype(Path("/mnt/gluster vol/spool"), MOUNTINFO) == "fuse.glusterfs"  # \040 is a space
    assert mount_fstype(Path("/srv/spoolx"), MOUNTINFO) == "ext4"  # a prefix of a name is not a parent


def test_a_local_spool_is_detected_as_not_shared(tmp_path):
    fs = detect_type(tmp_path)
    assert not fs.shared
    assert fs.kind in {"ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs"}


def test_a_missing_path_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect_type(tmp_path / "nope")


class MappedWriter:
    """A writer only the lease can see: a shared writable mapping whose fd is closed.

    The kernel refuses a read lease while it exists, but no /proc/*/fd entry
    names the file, which is what a refused lease on NFSv4 without a read
    delegation looks like to convd (no writer anywhere it can see).
    """

    def __init__(self, path: Path) -> None:
        # libc's mmap, not Python's: mmap.mmap keeps a dup of the fd, which /proc would show.
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc, self.size = libc, os.path.getsize(path)
        fd = os.open(path, os.O_RDWR)
        try:
            self.addr = libc.mmap(None, self.size, mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        assert self.addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())

    def close(self) -> None:
        self.libc.munmap(self.addr, self.size)


@pytest.fixture
def mapped_file(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    path = incoming / "img"
    path.write_bytes(b"\0" * 65536)
    w = MappedWriter(path)
    yield path
    w.close()


def test_a_refused_lease_on_a_local_filesystem_means_a_writer(mapped_file):
    assert writer_state(mapped_file) is Writer.OPEN


def test_a_refused_lease_that_proc_cannot_explain_is_unsure_on_a_shared_filesystem(mapped_file):
    assert writer_state(mapped_file, shared=True) is Writer.UNSURE


def test_a_writer_this_host_can_see_is_open_on_a_shared_filesystem_too(tmp_path):
    path = tmp_path / "img"
    with open(path, "wb") as fh:
        fh.write(b"x")
        assert writer_state(path, shared=True) is Writer.OPEN
    assert writer_state(path, shared=True) is Writer.NONE


def test_an_unsure_writer_check_holds_a_file_for_settle_only_on_a_shared_filesystem(mapped_file):
    shared = Intake(mapped_file.parent, settle=0.3, shared=True)
    local = Intake(mapped_file.parent, settle=0.3)
    for intake in (shared, local):
        intake.saw(mapped_file.name, renamed=True)
    assert shared.ready(limit=1)[0] == []  # not at once: settle vouches for it first
    assert wait_for(lambda: shared.ready(limit=1)[0], timeout=30, what="claim after settle") == [mapped_file.name]
    names, wait = local.ready(limit=1)
    assert names == [] and wait is not None  # a certain writer still blocks


# -- the shared space ledger ------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"


GiB = 1 << 30


def two_daemons(tmp_path) -> tuple[Ledger, Ledger]:
    """Two daemons' ledgers on one 10 GiB filesystem (1 GiB min_free), each knowing the other."""
    space = FakeSpace(10 * GiB, 10 * GiB)
    a = Ledger(100 * GiB, GiB, space, shared=SharedLedger(tmp_path, "a"))
    b = Ledger(100 * GiB, GiB, space, shared=SharedLedger(tmp_path, "b"))
    for ledger in (a, b, a):  # start-up and a refresh
        ledger.announce(0)
    return a, b


@pytest.mark.anyio
async def test_two_daemons_on_one_filesystem_never_spend_the_same_free_bytes(tmp_path):
    a, b = two_daemons(tmp_path)
    await a.reserve("x", 6 * GiB)
    got: list[str] = []

    async def second() -> None:
        await b.reserve("y", 6 * GiB)
        got.append("y")

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(1.5)  # b looked at least twice
        assert got == [], f"b admitted 6 GiB with {format_size(b.available())} available"
        a.release("x")
        a.announce(a.outstanding())  # the daemon's refresh, every SHARED_REFRESH seconds
    assert got == ["y"]


@pytest.mark.anyio
async def test_an_admission_the_others_cannot_see_is_undone_and_a_stale_handle_is_retried(tmp_path, monkeypatch):
    # GlusterFS gave ESTALE now and then on the shared ledger (another client
    # renamed it over itself).  A passing ESTALE is retried; a write that still
    # fails must not admit: the others would not see the bytes.  The errors
    # are injected: a real GlusterFS is only in the operator's trials.
    import errno

    from convd import durable

    a, b = two_daemons(tmp_path)
    real_write = durable.write_json
    failures = {"left": 1}

    def flaky_write(*args, **kw):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_write(*args, **kw)

    monkeypatch.setattr(durable, "write_json", flaky_write)
    r = await a.reserve("x", 6 * GiB)  # one ESTALE, retried: admitted and visible to b
    assert r.admitted.is_set() and SharedLedger(tmp_path, "z")._read()["a"].outstanding == 6 * GiB
    failures["left"] = 10**6  # the ledger cannot be written at all now
    got: list[str] = []

    async def third() -> None:
        await b.reserve("y", 3 * GiB)
        got.append("y")

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await anyio.sleep(1.2)
        assert got == [] and "y" not in b.active  # never admitted while unseen
        failures["left"] = 0
    assert got == ["y"]


@pytest.mark.anyio
async def test_a_dead_or_stale_daemon_reservations_stop_counting(tmp_path):
    space = FakeSpace(10 * GiB, 10 * GiB)
    dead = SharedLedger(tmp_path, "dead")
    dead.workspace = 8 * GiB
    assert dead.update(8 * GiB) == 0
    old = SharedLedger(tmp_path, "old")
    old.workspace = 8 * GiB
    old.update(8 * GiB)
    live = SharedLedger(tmp_path, "live")
    assert live.update(0) == 16 * GiB
    ledger = Ledger(100 * GiB, GiB, space, shared=live)
    live.forget(["dead"])
    # Rewind "old"'s time stamp past the stale age, as a daemon that stopped writing would leave it.
    text = (tmp_path / ".ledger").read_text()
    stamp = str(SharedLedger(tmp_path, "x")._read()["old"].updated_at)
    (tmp_path / ".ledger").write_text(text.replace(stamp, str(time.time() - SHARED_STALE - 1)))
    await ledger.reserve("z", 8 * GiB)  # admitted: neither dead nor stale counts any more
    assert set(SharedLedger(tmp_path, "x")._read()) == {"live"}


@pytest.mark.anyio
async def test_on_a_roomy_filesystem_admission_touches_no_shared_file(tmp_path):
    # What fits even if every other daemon filled its whole workspace needs no
    # locked step: on CephFS each one costs seconds of cap traffic.
    space = FakeSpace(100 * GiB, 100 * GiB)
    a = Ledger(10 * GiB, GiB, space, shared=SharedLedger(tmp_path, "a"))
    b = Ledger(10 * GiB, GiB, space, shared=SharedLedger(tmp_path, "b"))
    for ledger in (a, b, a):
        ledger.announce(0)
    before = (tmp_path / ".ledger").stat().st_mtime_ns
    await a.reserve("x", 6 * GiB)
    await b.reserve("y", 6 * GiB)
    assert (tmp_path / ".ledger").stat().st_mtime_ns == before
