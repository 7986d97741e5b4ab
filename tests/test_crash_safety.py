"""Crash safety, end to end: every input ends in exactly one of outgoing/ or
failed/, exactly once, across SIGKILL, SIGTERM, a full disk, writers that are
still writing, and several daemons on one spool (contract section 1 and 5).

Real qemu-img, real ``convd run`` subprocesses, real signals.  A qemu-img rate
limit (``[convert.qemu_args]``, ``-r``) stretches a conversion to seconds so a
signal or a full disk can reliably land in the middle of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from convd import durable
from convd.config import load as load_config
from convd.pipeline.spool import Spool as ConvdSpool

from conftest import CORPUS, MiB, Spool, images_equal, make_image, run, sha256_file, wait_for, write_config

INSTANCE = "test"  # write_config's [spool] instance


# -- helpers -------------------------------------------------------------------



def spool_processes(root: Path) -> list[str]:
    """Processes (qemu-img and its wrappers) whose command line, or source descriptor, names a path under ``root``."""
    needle = os.fsencode(f"{root}/")
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        try:
            # qemu-img gets its source as descriptor 3 (convd.qemu.img.SOURCE_FILENAME), not by name.
            source = os.fsencode(os.readlink(f"/proc/{pid}/fd/3")) if b"qemu-img" in cmd else b""
        except OSError:
            source = b""
        if needle in cmd or source.startswith(needle):
            argv = cmd.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {argv}")
    return found


def qemu_converting(root: Path) -> bool:
    return any(" convert " in p and "qemu-img" in p for p in spool_processes(root))


def snapshot(spool: Spool, instance: str = INSTANCE) -> dict[str, Any]:
    try:
        return json.loads((spool.work / instance / ".status.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return {}


def in_stage(spool: Spool, name: str, stage: str) -> bool:
    return any(i["name"] == name and i["stage"] == stage for i in snapshot(spool).get("in_flight", []))


def claim_dir(spool: Spool, name: str, instance: str = INSTANCE) -> Path:
    return spool.work / instance / name


def claim_dirs(spool: Spool) -> list[str]:
    return sorted(str(p.relative_to(spool.work)) for p in spool.work.glob("*/*") if p.is_dir())


def wait_drained(spool: Spool, timeout: float = 60.0) -> None:
    """Records appear before the clean-up: wait for work/ to empty before stopping."""
    try:
        wait_for(lambda: not spool.work_files() and not claim_dirs(spool), timeout)
    except AssertionError:
        pass
    assert (spool.work_files(), claim_dirs(spool)) == ([], []), "work/ was not cleaned up"


def assert_no_qemu_left(root: Path, timeout: float = 15.0) -> None:
    try:
        wait_for(lambda: not spool_processes(root), timeout)
    except AssertionError:
        pass
    assert spool_processes(root) == [], "qemu-img outlived its daemon"


def slow_convert_args(rate: str) -> dict[str, dict[str, list[str]]]:
    """``[convert.qemu_args]``: convd's tuned flags for a raw target, written through
    the page cache (``-t none`` dropped), plus a rate limit."""
    return {"convert.qemu_args": {
        "qcow2": ["-W", "-r", rate],
        "vpc": ["-W", "-r", rate],
        "vmdk": ["-r", rate],
    }}


def assert_spool_settled(spool: Spool, converted: dict[str, tuple[Path, str]],
                         rejected: dict[str, tuple[Path, str]] | None = None) -> None:
    """The end state the contract promises once a daemon has drained the spool.

    ``converted``: name -> (pristine source, its format); ``rejected``:
    name -> (pristine source, expected error code).
    """
    rejected = rejected or {}
    out, failed = sorted(os.listdir(spool.outgoing)), sorted(os.listdir(spool.failed))
    assert not [n for n in out + failed if n.startswith(".")], f"temp files left: {out} {failed}"
    for d, names in ((spool.outgoing, out), (spool.failed, failed)):
        images = {n for n in names if not n.endswith(".json")}
        records = {n[: -len(".json")] for n in names if n.endswith(".json")}
        assert images == records, f"{d.name}/ holds incomplete pairs: images {images}, records {records}"
    published = {n for n in out if not n.endswith(".json")}
    quarantined = {n for n in failed if not n.endswith(".json")}
    assert not published & quarantined, f"in both outgoing/ and failed/: {published & quarantined}"
    assert published == set(converted), f"outgoing/ holds {sorted(published)}, expected {sorted(converted)}"
    assert quarantined == set(rejected), (  # a NAME.1 here would be a second record of one input
        f"failed/ holds {sorted(quarantined)}, expected {sorted(rejected)}: "
        + str({n: json.loads((spool.failed / f"{n}.json").read_text()).get("error") for n in quarantined})
    )
    for name, (src, fmt) in converted.items():
        rec = json.loads((spool.outgoing / f"{name}.json").read_text())
        assert rec["status"] == ("passthrough" if fmt == "raw" else "converted"), (name, rec)
        assert rec["target"]["checksums"]["sha256"] == sha256_file(spool.outgoing / name), name
        assert images_equal(spool.outgoing / name, "raw", src, fmt), f"outgoing/{name} differs from its source"
    for name, (src, code) in rejected.items():
        rec = json.loads((spool.failed / f"{name}.json").read_text())
        assert (rec["status"], rec["error"]["code"]) == ("failed", code), (name, rec)
        assert sha256_file(spool.failed / name) == sha256_file(src), f"failed/{name} is not the original bytes"
    assert os.listdir(spool.incoming) == []
    assert spool.work_files() == [], "image data left in work/"
    assert claim_dirs(spool) == [], "claim directories left in work/"
    assert spool_processes(spool.root) == []


# -- 1. SIGKILL at random moments ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_loses_nothing_and_publishes_each_image_once(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    rng = random.Random(1234)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    formats = ("qcow2", "vmdk", "vpc", "raw")
    images: dict[str, tuple[Path, str]] = {}
    for i in range(12):
        fmt = formats[i % len(formats)]
        name = f"img-{i:02d}"
        images[name] = (make_image(pristine / f"{name}.{fmt}", fmt, rng.randint(8, 48) * MiB, seed=i + 1), fmt)
    # Two rejects, so kills also land around quarantines.
    junk = pristine / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + bytes(range(256)) * 4096)  # qcow2 magic, nonsense header
    rejects = {"bad-backing": (CORPUS / "qcow-with-backing.qcow2", "unsafe_image"),
               "bad-junk": (junk, "corrupt_image")}  # no valid qcow2 header (issue 9, kind 8)
    sources = {name: src for name, (src, _) in (images | rejects).items()}
    # ~0.5-3 s per conversion: long enough for kills to land inside one, and
    # for a backlog to build up while images keep arriving.
    cfg = write_config(tmp_path, **slow_convert_args("3M"))
    spool.incoming.mkdir(parents=True)
    to_drop = sorted(sources)
    rng.shuffle(to_drop)

    for _ in range(15):
        d = daemon_factory(cfg, ready=False)  # kills may land in start-up and recovery too
        time.sleep(rng.uniform(0.0, 1.0))
        for _ in range(rng.choice((0, 1, 1, 2))):
            if to_drop:
                name = to_drop.pop()
                spool.drop(sources[name], name)
        time.sleep(rng.uniform(0.1, 2.0))
        d.kill_group()
        assert_no_qemu_left(spool.root)  # setpriv --pdeathsig: they die with the daemon

    for name in to_drop:
        spool.drop(sources[name], name)
    final = daemon_factory(cfg)
    for name in sources:
        spool.wait_record(name, timeout=120)
    wait_drained(spool)
    assert final.stop() == 0
    assert_spool_settled(spool, images, rejects)


# -- 2. a producer writing in place --------------------------------------------------------


@pytest.mark.parametrize(("fmt", "status"), [("qcow2", "converted"), ("raw", "passthrough")])
def test_image_written_in_place_with_a_long_pause_is_taken_only_once_complete(
    tmp_path: Path, daemon_factory: Any, spool: Spool, fmt: str, status: str
) -> None:
    settle = 0.5
    src = make_image(tmp_path / f"slow.{fmt}", fmt, 32 * MiB)
    data = src.read_bytes()
    half = len(data) // 2
    daemon_factory(write_config(tmp_path, watch={"settle": settle}))
    target = spool.incoming / "slow"
    with open(target, "wb") as fh:  # no temp name, no rename
        fh.write(data[:half])
        fh.flush()
        time.sleep(3 * settle)
        assert target.exists(), "taken while a writer still had it open"
        fh.write(data[half:])
    rec = spool.wait_record("slow")
    assert rec["status"] == status, rec
    assert rec["source"]["size"] == len(data)
    assert rec["target"]["checksums"]["sha256"] == sha256_file(spool.outgoing / "slow")
    assert images_equal(spool.outgoing / "slow", "raw", src, fmt)
    if fmt == "raw":
        assert rec["target"]["checksums"]["sha256"] == hashlib.sha256(data).hexdigest()


# -- 3. a full disk, for real ----------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB tmpfs: a disk that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = run("mount", "-t", "tmpfs", "-o", "size=96m,mode=0755", "tmpfs", mnt, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if run("umount", mnt, check=False).returncode != 0:
            run("umount", "-l", mnt, check=False)


def fill_leaving(ballast: Path, leave: int) -> None:
    """Grow ``ballast`` until only about ``leave`` bytes are free on its filesystem."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(20):
            st = os.statvfs(ballast.parent)
            more = st.f_bavail * st.f_frsize - leave
            if more <= 0:
                return
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, more)
                return
            except OSError as exc:  # a concurrent writer took some meanwhile
                if exc.errno != errno.ENOSPC:
                    raise
        raise AssertionError("could not fill the filesystem")
    finally:
        os.close(fd)


def full_disk_config(tmp_path: Path, root: Path, max_attempts: int, **extra: Any) -> Path:
    # Neither the budget nor a safety margin should keep qemu-img off the
    # disk: the point is qemu-img meeting ENOSPC.
    return write_config(
        tmp_path, spool={"root": str(root)},
        limits={"min_free": 0, "workspace": "1GiB", "sparse": True},
        convert={"max_attempts": max_attempts, "retry_backoff": 1.0}, **extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize("max_attempts", [5, 1])
def test_disk_filling_up_mid_convert_is_retried_or_quarantined_intact(
    tmp_path: Path, small_fs: Path, daemon_factory: Any, max_attempts: int
) -> None:
    sp = Spool(small_fs / "spool")
    # 200 MiB virtual, ~38 MiB of data: the raw output (sparse) needs ~38 MiB,
    # which fits the empty filesystem beside the ~38 MiB source.
    src = make_image(tmp_path / "big.qcow2", "qcow2", 200 * MiB)
    cfg = full_disk_config(tmp_path, sp.root, max_attempts, **{"convert.qemu_args": {"qcow2": ["-r", "6M"]}})
    d = daemon_factory(cfg)
    sp.drop(src, "big")
    output = claim_dir(sp, "big") / "output"

    def writing() -> bool:
        try:
            return qemu_converting(sp.root) and output.stat().st_blocks > 0
        except FileNotFoundError:
            return False

    wait_for(writing, 60, what="qemu-img convert to start writing")
    ballast = small_fs / "ballast"
    try:
        fill_leaving(ballast, 1 * MiB)
        if max_attempts > 1:
            wait_for(lambda: "convert failed, retrying" in d.log(), 60, what="a retry after ENOSPC")
            assert sha256_file(claim_dir(sp, "big") / "source") == sha256_file(src), "source changed while retrying"
            ballast.unlink()
            rec = sp.wait_record("big", timeout=120)
            assert rec["status"] == "converted", rec
            assert rec["attempts"] == 2
            assert images_equal(sp.outgoing / "big", "raw", src, "qcow2")
            assert not (sp.failed / "big.json").exists()
        else:
            rec = sp.wait_record("big", timeout=60)
            assert rec["status"] == "failed", rec
            assert rec["error"]["code"] == "convert_failed"
            assert "No space left on device" in rec["error"]["message"]
            assert sha256_file(sp.failed / "big") == sha256_file(src)
            assert not (sp.outgoing / "big").exists()
    finally:
        ballast.unlink(missing_ok=True)
    wait_drained(sp)
    assert d.stop() == 0
    assert spool_processes(sp.root) == []


@pytest.mark.slow
def test_nearly_full_disk_holds_the_item_until_space_returns_without_failing_it(
    tmp_path: Path, small_fs: Path, daemon_factory: Any
) -> None:
    sp = Spool(small_fs / "spool")
    src = make_image(tmp_path / "big.qcow2", "qcow2", 200 * MiB)
    # max_attempts = 1: a qemu-img run meeting ENOSPC would fail the item.
    d = daemon_factory(full_disk_config(tmp_path, sp.root, 1))
    ballast = small_fs / "ballast"
    try:
        fill_leaving(ballast, 20 * MiB + src.stat().st_size)
        sp.drop(src, "big")  # leaves ~20 MiB free; the output needs ~38 MiB
        wait_for(lambda: in_stage(sp, "big", "reserve") and snapshot(sp)["workspace"]["waiting"] == 1,
                 60, what="the item to wait for space")
        assert sp.record("big") is None
        assert not qemu_converting(sp.root)
        ballast.unlink()
        rec = sp.wait_record("big", timeout=60)
    finally:
        ballast.unlink(missing_ok=True)
    assert rec["status"] == "converted", rec
    assert rec["attempts"] == 1
    assert images_equal(sp.outgoing / "big", "raw", src, "qcow2")
    assert "convert failed" not in d.log()
    assert d.stop() == 0


@pytest.mark.slow
def test_full_disk_while_quarantining_keeps_the_daemon_up_and_the_reject_intact(
    tmp_path: Path, small_fs: Path, daemon_factory: Any
) -> None:
    sp = Spool(small_fs / "spool")
    bad = CORPUS / "qcow-with-backing.qcow2"
    d = daemon_factory(full_disk_config(tmp_path, sp.root, 1))
    shutil.copyfile(bad, sp.incoming / ".bad.part")
    ballast = small_fs / "ballast"
    try:
        fill_leaving(ballast, 0)  # not a page left for failed/bad.json
        os.rename(sp.incoming / ".bad.part", sp.incoming / "bad")
        wait_for(lambda: d.proc.poll() is not None or any(
            e.get("item") == "bad" and e.get("level") in ("warning", "error", "critical") for e in d.events()),
            60, what="the quarantine to meet the full disk")
        assert d.proc.poll() is None, f"the daemon died on a full disk:\n{d.log()[-2000:]}"
        assert sha256_file(claim_dir(sp, "bad") / "source") == sha256_file(bad)
        ballast.unlink()
        assert d.stop() == 0
        # Once there is room again, the next start finishes the reject.
        d2 = daemon_factory(full_disk_config(tmp_path, sp.root, 1))
        rec = sp.wait_record("bad")
        assert rec["error"]["code"] == "unsafe_image"
        assert sha256_file(sp.failed / "bad") == sha256_file(bad)
        assert d2.stop() == 0
    finally:
        ballast.unlink(missing_ok=True)


# -- 4. SIGTERM mid-convert --------------------------------------------------------------------


def test_sigterm_mid_convert_exits_promptly_keeps_the_source_and_resumes_on_restart(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    src = make_image(tmp_path / "slow.qcow2", "qcow2", 64 * MiB)  # ~12 MiB of data
    d = daemon_factory(write_config(tmp_path, **{"convert.qemu_args": {"qcow2": ["-r", "2M"]}}))
    spool.drop(src, "slow")
    wait_for(lambda: in_stage(spool, "slow", "convert") and qemu_converting(spool.root), 60,
             what="the conversion to be running")
    d.signal(signal.SIGTERM)
    try:
        d.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon did not exit within 10 s of SIGTERM")
    assert d.stop() == 0
    assert spool_processes(spool.root) == [], "qemu-img outlived the daemon"
    item = claim_dir(spool, "slow")
    assert sha256_file(item / "source") == sha256_file(src)
    assert not (item / "output").exists()
    assert spool.record("slow") is None
    assert os.listdir(spool.incoming) == []

    d2 = daemon_factory(write_config(tmp_path))  # same spool, no rate limit
    rec = spool.wait_record("slow")
    assert rec["status"] == "converted", rec
    assert rec["attempts"] == 2
    assert images_equal(spool.outgoing / "slow", "raw", src, "qcow2")
    wait_drained(spool)
    assert d2.stop() == 0


# -- 5. recovery from what a crash left in work/ ---------------------------------------------


def open_spool(cfg_path: Path) -> ConvdSpool:
    """The daemon's own Spool, in-process, to stage what a crash would leave."""
    s = ConvdSpool(load_config(cfg_path).spool)
    s.prepare()
    return s


def converted_record(name: str, src: Path, out: Path) -> dict[str, Any]:
    vsize = 16 * MiB
    return {
        "schema": 1, "name": name, "status": "converted",
        "source": {"format": "qcow2", "size": src.stat().st_size, "virtual_size": vsize},
        "target": {"format": "raw", "size": out.stat().st_size, "virtual_size": vsize,
                   "checksums": {"sha256": sha256_file(out)}},
        "timings": {"detect": 0.01, "wait_space": 0.0, "convert": 0.1, "publish": 0.01, "total": 0.2},
        "attempts": 1, "finished_at": "2026-01-01T00:00:00Z", "convd_version": "0.1.0",
    }


@pytest.mark.parametrize("payload_moved", [True, False], ids=["payload-moved", "payload-in-work"])
def test_crash_after_staging_the_handoff_is_finished_without_converting_again(
    tmp_path: Path, daemon_factory: Any, spool: Spool, payload_moved: bool
) -> None:
    cfg = write_config(tmp_path)
    src = make_image(tmp_path / "h.qcow2", "qcow2", 16 * MiB)
    s = open_spool(cfg)
    try:
        shutil.copyfile(src, s.incoming / "h")
        claim = s.claim("h")
        assert claim is not None
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", claim.source, claim.output)
        rec = converted_record("h", src, claim.output)
        s.stage_handoff(claim, "outgoing", "h", "output", rec)
        if payload_moved:
            durable.move(claim.output, s.outgoing / "h")  # the crash hits here
    finally:
        s.close()
    staged_inode = (spool.outgoing / "h" if payload_moved else claim_dir(spool, "h") / "output").stat().st_ino

    d = daemon_factory(cfg)
    wait_for(lambda: (spool.outgoing / "h.json").exists(), 30, what="outgoing/h.json")
    assert json.loads((spool.outgoing / "h.json").read_text()) == rec
    assert (spool.outgoing / "h").stat().st_ino == staged_inode, "published a second conversion"
    wait_for(lambda: not claim_dir(spool, "h").exists(), 30, what="the claim to be cleaned up")
    assert images_equal(spool.outgoing / "h", "raw", src, "qcow2")
    assert d.stop() == 0
    assert os.listdir(spool.failed) == []
    assert spool.work_files() == []


def test_crash_after_staging_a_quarantine_is_finished_with_the_original_bytes(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    cfg = write_config(tmp_path)
    src = make_image(tmp_path / "q.qcow2", "qcow2", 16 * MiB)
    s = open_spool(cfg)
    try:
        shutil.copyfile(src, s.incoming / "q")
        claim = s.claim("q")
        assert claim is not None
        rec = {"schema": 1, "name": "q", "status": "failed",
               "source": {"format": "qcow2", "size": src.stat().st_size, "virtual_size": 16 * MiB},
               "error": {"code": "convert_failed", "message": "qemu-img convert exited 1"},
               "timings": {}, "attempts": 3, "finished_at": "2026-01-01T00:00:00Z", "convd_version": "0.1.0"}
        s.stage_handoff(claim, "failed", "q", "source", rec)
        durable.move(claim.source, s.failed / "q")  # the crash hits here
    finally:
        s.close()

    d = daemon_factory(cfg)
    wait_for(lambda: (spool.failed / "q.json").exists(), 30, what="failed/q.json")
    assert json.loads((spool.failed / "q.json").read_text()) == rec
    assert sha256_file(spool.failed / "q") == sha256_file(src)
    wait_for(lambda: not claim_dir(spool, "q").exists(), 30, what="the claim to be cleaned up")
    assert d.stop() == 0
    assert sorted(os.listdir(spool.failed)) == ["q", "q.json"]
    assert os.listdir(spool.outgoing) == []


def test_crash_mid_convert_leaving_a_partial_output_is_converted_again(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    cfg = write_config(tmp_path)
    src = make_image(tmp_path / "p.qcow2", "qcow2", 16 * MiB)
    s = open_spool(cfg)
    try:
        shutil.copyfile(src, s.incoming / "p")
        claim = s.claim("p")
        assert claim is not None
        s.note_attempt(claim)
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", claim.source, claim.output)
        os.truncate(claim.output, 5 * MiB + 1234)  # what qemu-img had written at the crash
    finally:
        s.close()

    d = daemon_factory(cfg)
    rec = spool.wait_record("p")
    assert rec["status"] == "converted", rec
    assert rec["attempts"] == 2
    assert rec["target"]["size"] == 16 * MiB
    assert images_equal(spool.outgoing / "p", "raw", src, "qcow2")
    wait_drained(spool)
    assert d.stop() == 0


@pytest.mark.parametrize("still_incoming", [False, True], ids=["nothing-moved", "source-still-incoming"])
def test_empty_claim_directory_is_removed_and_its_input_taken_again(
    tmp_path: Path, daemon_factory: Any, spool: Spool, still_incoming: bool
) -> None:
    cfg = write_config(tmp_path)
    src = make_image(tmp_path / "e.qcow2", "qcow2", 8 * MiB)
    claim_dir(spool, "e").mkdir(parents=True)  # the crash hit between mkdir and rename
    spool.incoming.mkdir(parents=True)
    if still_incoming:
        shutil.copyfile(src, spool.incoming / ".e.part")
        os.rename(spool.incoming / ".e.part", spool.incoming / "e")

    d = daemon_factory(cfg)
    if still_incoming:
        rec = spool.wait_record("e")
        assert rec["status"] == "converted", rec
        assert images_equal(spool.outgoing / "e", "raw", src, "qcow2")
    wait_for(lambda: not claim_dir(spool, "e").exists(), 30, what="the empty claim to be removed")
    assert d.stop() == 0
    assert sorted(os.listdir(spool.outgoing)) == (["e", "e.json"] if still_incoming else [])
    assert os.listdir(spool.failed) == []


def test_stale_temp_files_are_swept_and_producer_temps_left_alone(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    cfg = write_config(tmp_path)
    for d in (spool.incoming, spool.outgoing, spool.failed, spool.work / INSTANCE):
        d.mkdir(parents=True, exist_ok=True)
    stale = [spool.outgoing / ".x.json.0badf00d.tmp", spool.outgoing / ".x.tmp",
             spool.failed / ".y.json.deadbeef.tmp", spool.work / INSTANCE / ".status.json.cafe1234.tmp"]
    day_ago = time.time() - 86400
    for p in stale:
        p.write_bytes(b"half a record")
        os.utime(p, (day_ago, day_ago))
    producer = spool.incoming / ".upload.part"
    producer.write_bytes(b"still uploading")

    d = daemon_factory(cfg)
    assert [p for p in stale if p.exists()] == []
    assert producer.read_bytes() == b"still uploading"
    assert d.stop() == 0
    assert os.listdir(spool.outgoing) == []
    assert os.listdir(spool.failed) == []


def test_starting_an_instance_leaves_a_record_another_instance_is_writing_alone(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    cfg = write_config(tmp_path, spool={"root": str(spool.root), "instance": "beta"})
    spool.outgoing.mkdir(parents=True)
    # What instance alpha's durable.write_json has between its O_EXCL create
    # and its rename: a fresh temp.  Deleting it makes alpha's rename fail and
    # strands its item (image in outgoing/, no NAME.json) until alpha restarts.
    in_progress = spool.outgoing / ".n.json.1a2b3c4d.tmp"
    in_progress.write_bytes(b'{"schema": 1')
    d = daemon_factory(cfg)
    assert in_progress.exists()
    assert d.stop() == 0


# -- 6. several daemons on one spool -------------------------------------------------------------


def test_two_instances_on_one_spool_convert_each_image_exactly_once(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    configs = {}
    for inst in ("alpha", "beta"):
        (tmp_path / inst).mkdir()
        configs[inst] = write_config(tmp_path / inst, spool={"root": str(spool.root), "instance": inst})
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    images = {f"small-{i:02d}": (make_image(pristine / f"{i}.qcow2", "qcow2", (1 + i % 4) * MiB, seed=i), "qcow2")
              for i in range(20)}
    daemons = [daemon_factory(configs[inst]) for inst in ("alpha", "beta")]
    for name, (src, _fmt) in images.items():
        spool.drop(src, name)
    for name in images:
        spool.wait_record(name)
    wait_drained(spool)
    assert [d.stop() for d in daemons] == [0, 0]

    claims = Counter(e["item"] for d in daemons for e in d.events() if e.get("event") == "claimed")
    assert claims == Counter(dict.fromkeys(images, 1))
    assert_spool_settled(spool, images)


def test_second_daemon_with_the_same_instance_name_exits_1_with_a_clear_message(
    tmp_path: Path, daemon_factory: Any, spool: Spool
) -> None:
    cfg = write_config(tmp_path, spool={"root": str(spool.root), "instance": "alpha"})
    first = daemon_factory(cfg)
    second = daemon_factory(cfg, ready=False)
    try:
        rc = second.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a second daemon with the same instance kept running")
    second.stop()
    assert rc == 1
    assert "another convd with instance 'alpha' is running" in second.log()
    assert "[spool] instance" in second.log()
    assert first.proc.poll() is None
    src = make_image(tmp_path / "after.qcow2", "qcow2", 4 * MiB)
    spool.drop(src, "after")  # the first one still works
    assert spool.wait_record("after")["status"] == "converted"
    assert first.stop() == 0


def test_items_of_a_stopped_instance_are_adopted_not_stranded(tmp_path: Path, daemon_factory: Any,
                                                              spool: Spool) -> None:
    # A crashed daemon under another host name left a claim behind.
    src = make_image(tmp_path / "orphan.qcow2", "qcow2", 4 * MiB)
    old = spool.work / "old-host" / "orphan.qcow2"
    old.mkdir(parents=True)
    (old / "source").write_bytes(src.read_bytes())
    d = daemon_factory(write_config(tmp_path))
    rec = spool.wait_record("orphan.qcow2")
    assert rec["status"] == "converted"
    assert images_equal(src, "qcow2", spool.outgoing / "orphan.qcow2", "raw")
    assert not old.exists()
    assert d.stop() == 0


def test_a_work_directory_nfs_keeps_busy_is_parked_not_left_as_an_item(tmp_path, monkeypatch):
    # NFS turns an unlinked file that is still open on this client into
    # .nfsXXXX, which cannot be unlinked (EBUSY) and keeps rmdir failing.  A
    # real NFS mount is in tests/test_sharedfs_nfs.py; here the EBUSY is
    # injected so the clean-up path runs on any filesystem.
    item = tmp_path / "work" / "node" / "disk"
    item.mkdir(parents=True)
    (item / "item.json").write_text("{}")
    (item / ".nfs0000000000020022").write_text("held open elsewhere")
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        if os.path.basename(path).startswith(".nfs"):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    durable.remove_tree(item)
    left = os.listdir(item.parent)
    assert "disk" not in left and len(left) == 1 and left[0].startswith(durable.PARKED_PREFIX)
    durable.sweep_parked(item.parent)  # still busy: stays parked, no error
    assert os.listdir(item.parent) == left
    monkeypatch.setattr(os, "unlink", real_unlink)  # the holder closed it
    durable.sweep_parked(item.parent)
    assert os.listdir(item.parent) == []
