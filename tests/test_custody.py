"""A producer keeps a descriptor on what it dropped: convd still vets, converts and
publishes only bytes no producer can change, and qemu-img reaches nothing else.

The producer runs as another user (``setpriv``), as in the documented
deployment; the daemon runs as root, and as an unprivileged user holding only
the capabilities the unit grants (CAP_LEASE, CAP_CHOWN), like the unit.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import json
import mmap
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from convd import custody
from convd.config import DetectConfig
from convd.errors import UnsafeImage
from convd.qemu import img as qemu
from convd_testing.glance_server import GLANCE_VENV, reachable_convd

from conftest import MiB, as_user, convd_bin, images_equal, make_image, run, system_users, unit_spool, wait_for

# Names of this module's own: another suite (tests/test_glance.py) makes and
# removes its users and group, and may run at the same time.
PRODUCER, CONVD_USER, GROUP = "convdtest-producer", "convdtest-custody", "convdtest-custody-spool"
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="another user (useradd, setpriv) needs root")
NEEDS_SETPRIV = pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) switches users")


@pytest.fixture
def ignore_sigio() -> Iterator[None]:
    # A broken lease signals its holder (this process) with SIGIO, whose
    # default action would end pytest; the daemon ignores it the same way.
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGIO, old)


@pytest.fixture
def users() -> Iterator[None]:
    """The producer, convd's user and the spool group; removed again if this test made them."""
    with system_users(GROUP, CONVD_USER, PRODUCER):
        yield



# -- custody: the mechanism, on real files --------------------------------------------


def test_a_source_another_descriptor_still_writes_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    writer = os.open(src, os.O_RDWR)
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(UnsafeImage, match="open for writing"):
            custody.take(fd, shared=False)
    finally:
        os.close(fd)
        os.close(writer)


def test_a_shared_writable_mapping_alone_refuses_the_take(tmp_path: Path) -> None:
    # The descriptor is gone; the mapping still writes, and moves no timestamp.
    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    writer = os.open(src, os.O_RDWR)
    mapping = mmap.mmap(writer, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(writer)
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(UnsafeImage, match="mapped shared and writable"):
            custody.take(fd, shared=False)
        mapping.close()
        held = custody.take(fd, shared=False)  # unmapped: nothing writes it any more
        assert held.how == "lease"
        held.close()
    finally:
        os.close(fd)


def test_a_later_open_for_writing_breaks_the_lease_and_is_seen(tmp_path: Path, ignore_sigio: None) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    fd = os.open(src, os.O_RDONLY)
    held = custody.take(fd, shared=False)
    try:
        assert (held.how, held.intact()) == ("lease", True)
        # (Root may still open it: without O_NONBLOCK it would wait out the break.)
        with pytest.raises(BlockingIOError):
            os.open(src, os.O_WRONLY | os.O_NONBLOCK)
        assert not held.intact()
    finally:
        held.close()
        os.close(fd)


def test_a_source_with_another_name_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    # The other name may be outside the spool (a file of another user the producer
    # may link): taking the inode would hand that file to convd and its group.
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * 4096)
    outside.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(outside, 65534, 65534)
    before = outside.stat()
    os.link(outside, tmp_path / "dropped")
    fd = os.open(tmp_path / "dropped", os.O_RDONLY)
    try:
        with pytest.raises(UnsafeImage, match="2 hard links"):
            custody.take(fd, shared=False)
    finally:
        os.close(fd)
    after = outside.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)


def test_a_shared_filesystem_source_is_read_from_a_private_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 17))
    fd = os.open(src, os.O_RDONLY)
    try:
        held = custody.take(fd, shared=True)
        assert held.how == "copy"
        custody.copy_private(fd, str(tmp_path / "private"), 2 * MiB)  # never past the size given
    finally:
        os.close(fd)
    assert (tmp_path / "private").read_bytes() == src.read_bytes()[:2 * MiB]
    assert (tmp_path / "private").stat().st_mode & 0o777 == custody.MODE


@ROOT_ONLY
@NEEDS_SETPRIV
def test_a_taken_source_cannot_be_reopened_for_writing_by_its_producer(tmp_path: Path, users: None) -> None:
    base = Path(tempfile.mkdtemp(prefix="convd-custody-", dir="/tmp"))
    base.chmod(0o755)
    try:
        src = base / "dropped"
        # The producer writes its file, keeps a read-only descriptor, and waits for a word.
        script = textwrap.dedent(f"""
            import os, sys
            fd = os.open({str(src)!r}, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 4096)
            os.close(fd)
            ro = os.open({str(src)!r}, os.O_RDONLY)
            print("ready", flush=True)
            sys.stdin.readline()
            try:
                os.open(f"/proc/self/fd/{{ro}}", os.O_RDWR | os.O_NONBLOCK)
                print("reopened", flush=True)
            except OSError as exc:
                print(exc.errno, flush=True)
        """)
        base.chmod(0o777)
        with subprocess.Popen(as_user(PRODUCER, "/usr/bin/python3", "-c", script), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as producer:
            assert producer.stdout is not None and producer.stdin is not None
            assert producer.stdout.readline().strip() == "ready"
            fd = os.open(src, os.O_RDONLY)
            held = custody.take(fd, shared=False)
            producer.stdin.write("go\n")
            producer.stdin.flush()
            answer = producer.stdout.readline().strip()
        st = src.stat()
        held.close()
        os.close(fd)
        assert held.how == "lease"
        assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), custody.MODE)
        assert answer == str(errno.EACCES)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- qemu-img opens the vetted file and nothing else ------------------------------------


def test_source_args_name_the_driver_the_file_protocol_and_no_backing_or_data_file() -> None:
    (arg,) = qemu.source_args("/x/a,b\"c", "qcow2", {"k": "v"})
    assert arg.startswith("json:")
    assert json.loads(arg[5:]) == {"driver": "qcow2", "k": "v", "file": {"driver": "file", "filename": "/x/a,b\"c"},
                                   "backing": None, "data-file": None}
    assert "data-file" not in json.loads(qemu.source_args("/x", "vmdk")[0][5:])


def test_a_backing_file_or_nbd_server_named_in_the_header_is_never_opened(tmp_path: Path) -> None:
    canary = tmp_path / "canary.raw"
    marker = os.urandom(32)
    canary.write_bytes(marker * (MiB // 32))
    sock_path = tmp_path / "nbd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(8)
    server.setblocking(False)
    by_file = tmp_path / "by-file.qcow2"
    by_nbd = tmp_path / "by-nbd.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", canary, "-F", "raw", by_file, str(MiB))
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", f"nbd+unix:///x?socket={sock_path}", "-F", "raw",
        by_nbd, str(MiB))
    limits = DetectConfig()

    async def every_call(path: Path) -> None:
        info = await qemu.info(str(path), "qcow2", cpu_time=5, address_space=limits.address_space)
        assert info["backing-filename"]  # read from the header, as detect refuses it
        await qemu.check(str(path), "qcow2", limits=limits)
        await qemu.data_bytes(str(path), "qcow2", 4096, limits=limits)
        await qemu.measure(str(path), "qcow2", "raw", limits=limits)
        await qemu.convert(str(path), "qcow2", str(path.with_suffix(".out")), "raw", extra_args=[], timeout=60)

    try:
        for img in (by_file, by_nbd):
            anyio.run(every_call, img)
            assert marker not in img.with_suffix(".out").read_bytes()
        with pytest.raises(BlockingIOError):
            server.accept()  # no qemu-img ever connected
    finally:
        server.close()


# -- a hostile producer against a real daemon --------------------------------------------

# The producer: writes each image itself, keeps a read-only descriptor across
# the rename into incoming/, then tries to reopen it for writing through
# /proc/self/fd once it is claimed, until the item's record appears.  If it can, it maps the first
# page shared, dirties it, and a moment later copies in the evil first page
# (``mapping``) or writes it (``write``).  One line per item on stdout.
PRODUCER_SCRIPT = r"""
import json, mmap, os, sys, time
incoming, outgoing, failed, good, evil, attack, count = sys.argv[1:8]
good, evil = open(good, "rb").read(), open(evil, "rb").read()
for i in range(int(count)):
    name = f"item{i}.img"
    tmp = os.path.join(incoming, f".{name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, good)
    os.close(fd)
    ro = os.open(tmp, os.O_RDONLY)
    os.rename(tmp, os.path.join(incoming, name))
    got, deadline = "no reopen", time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(os.path.exists(os.path.join(d, name + ".json")) for d in (outgoing, failed)):
            break
        if got == "no reopen" and not os.path.exists(os.path.join(incoming, name)):
            # Claimed (renamed into work/, out of reach but for the descriptor):
            # what the intake's writer check can no longer see.
            try:
                rw = os.open(f"/proc/self/fd/{ro}", os.O_RDWR | os.O_NONBLOCK)
            except OSError as exc:
                got = f"refused {exc.errno}"
                continue
            got = "reopened"
            m = mmap.mmap(rw, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[0:1] = m[0:1]
            time.sleep(0.05)
            if attack == "mapping":
                m[:len(evil)] = evil
            else:
                os.pwrite(rw, evil, 0)
        time.sleep(0.005)
    # After the record: the published file, if any, must not take a write either.
    try:
        os.open(os.path.join(outgoing, name), os.O_WRONLY | os.O_NONBLOCK)
        after = "outgoing writable"
    except OSError as exc:
        after = f"outgoing {exc.errno}"
    print(json.dumps({"name": name, "reopen": got, "after": after}), flush=True)
"""


def _daemon_argv(daemon: str, conf: Path) -> list[str]:
    if daemon == "root":
        return [convd_bin(), "run", "-c", str(conf)]
    # As the unit runs it: convd's own user with CAP_LEASE and CAP_CHOWN, ambient
    # (or, as an older unit did, CAP_LEASE alone: convd cannot take the inode then).
    caps = "+lease,+chown" if daemon == "unit" else "+lease"
    return ["setpriv", f"--reuid={CONVD_USER}", f"--regid={CONVD_USER}", "--init-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", "--",
            "sh", "-c", f'umask 0027; exec "{reachable_convd()}" run -c "{conf}"']




def _files(*dirs: Path) -> Iterator[Path]:
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file() and not p.is_symlink():
                yield p


@ROOT_ONLY
@NEEDS_SETPRIV
@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["root", "unit", "no-chown"])
@pytest.mark.parametrize(("attack", "target"), [("mapping", "raw"), ("write", "raw"), ("mapping", "qcow2")],
                         ids=["mapping-flip", "write-after-detect", "passthrough-rewrite"])
def test_a_producer_rewriting_what_it_dropped_gets_nothing_outside_the_spool(
        tmp_path: Path, users: None, daemon: str, attack: str, target: str) -> None:
    if daemon != "root" and not (GLANCE_VENV / "bin" / "convd").exists():
        pytest.skip(f"convd for another user is copied from the Glance venv: make glance-venv ({GLANCE_VENV})")
    base = Path(tempfile.mkdtemp(prefix="convd-custody-", dir="/tmp"))
    base.chmod(0o755)
    try:
        _hostile_producer(base, tmp_path, daemon, attack, target)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _hostile_producer(base: Path, tmp_path: Path, daemon: str, attack: str, target: str) -> None:
    daemon_user = "root" if daemon == "root" else CONVD_USER
    spool = unit_spool(base, daemon_user, GROUP)
    # The canary: a file outside the spool the daemon can read and the producer cannot.
    canary = base / "canary.raw"
    marker = hashlib.sha256(os.urandom(16)).hexdigest().encode()
    canary.write_bytes(marker * (4 * MiB // len(marker)))
    shutil.chown(canary, daemon_user, daemon_user)
    canary.chmod(0o600)
    good = make_image(tmp_path / "good.qcow2", "qcow2", 4 * MiB)
    evil_img = tmp_path / "evil.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", canary, "-F", "raw", evil_img, str(4 * MiB))
    evil = base / "evil.head"
    evil.write_bytes(evil_img.read_bytes()[:4096])  # the header, naming the canary as its backing file
    good_copy = base / "good.qcow2"
    shutil.copyfile(good, good_copy)
    for p in (evil, good_copy):
        p.chmod(0o644)
    conf = base / "convd.toml"
    conf.write_text(f'[spool]\nroot = "{spool}"\ninstance = "custody"\n[log]\nformat = "json"\nlevel = "debug"\n'
                    f'[metrics]\nlisten = ""\n[watch]\nsettle = 0.5\n[convert]\ntarget_format = "{target}"\n')
    conf.chmod(0o644)
    log_path = base / "convd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_daemon_argv(daemon, conf), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=base)
    try:
        wait_for(lambda: b'"watching"' in log_path.read_bytes() or proc.poll() is not None, what="convd to start")
        assert proc.poll() is None, log_path.read_text()
        count = 3
        out = run(*as_user(PRODUCER, "/usr/bin/python3", "-c", PRODUCER_SCRIPT, str(spool / "incoming"),
                           str(spool / "outgoing"), str(spool / "failed"), str(good_copy), str(evil), attack,
                           str(count)), timeout=300)
        seen = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(seen) == count, out.stderr
        for s in seen:
            name = s["name"]
            rec_path = next(p for p in (spool / "outgoing" / f"{name}.json", spool / "failed" / f"{name}.json")
                            if p.exists())
            rec: dict[str, Any] = json.loads(rec_path.read_text())
            if rec["status"] in ("converted", "passthrough"):
                if daemon != "no-chown":
                    # Converted from the vetted bytes: the producer's reopen came too late.
                    assert s["reopen"] == f"refused {errno.EACCES}", (s, rec)
                # (Without CAP_CHOWN the reopen succeeds, and convd read a private copy.)
                published = spool / "outgoing" / name
                assert images_equal(good, "qcow2", published, target)
                st = published.stat()
                # convd's, and its group the spool's (consumers read it), as a converted output
                assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o022) \
                    == (daemon_user, GROUP, 0)
                assert s["after"] == f"outgoing {errno.EACCES}", s
                digest = hashlib.sha256(published.read_bytes()).hexdigest()
                assert rec["target"]["checksums"]["sha256"] == digest
                if target == "qcow2":
                    assert rec["status"] == "passthrough"
                    assert digest == hashlib.sha256(good.read_bytes()).hexdigest()
            else:
                # Reopened before convd took it (or, copied, the copy caught the
                # flip and detect found the backing file): refused, never converted.
                assert rec["error"]["code"] == "unsafe_image", rec
        custody_lines = [json.loads(line) for line in log_path.read_text().splitlines()
                         if '"source in custody"' in line]
        # One per item convd took (a take refused for a writer logs none), each as expected.
        published = sum(1 for p in (spool / "outgoing").glob("*.json"))
        assert len(custody_lines) >= published, custody_lines
        assert {e["how"] for e in custody_lines} <= {"copy" if daemon == "no-chown" else "lease"}, custody_lines
        for p in [*_files(spool / "outgoing", spool / "failed"), log_path]:
            assert marker not in p.read_bytes(), f"the canary's bytes reached {p}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)

