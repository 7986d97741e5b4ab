"""``convd cancel`` and cancel requests through the spool (contract section 6), in every state an item can be in."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from convd import protocol
from convd.config import SpoolConfig
from convd.pipeline.spool import Spool as SpoolOf

from conftest import Daemon, MiB, Spool, convd_bin, make_image, run, wait_for, write_config

# qemu-img convert -r: a conversion of a few seconds, long enough to cancel in.
# qemu-img's own rate limit keeps a convert running while a test cancels it.
# The window must outlast a `convd cancel` process's start under load (over
# 4 s at a load average of 12 on 2 cores, which 8 MiB/s did not): at 1 MiB/s
# a 32 MiB convert takes 32 s, and each test cancels it long before that.
SLOW = {"convert.qemu_args": {"qcow2": ["-r", "1M"]}}


def data_qcow2(path: Path, virtual: int = 64 * MiB, data: int = 48 * MiB) -> Path:
    run("qemu-img", "create", "-f", "qcow2", path, str(virtual))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 9 0 {data}", path)
    return path


def cancel(config: Path, name: str, *extra: str) -> tuple[int, str]:
    done = run(convd_bin(), "cancel", name, "-c", config, *extra, check=False)
    return done.returncode, done.stdout + done.stderr


def converting(work: Path) -> list[int]:
    """pids of qemu-img convert children working under ``work``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(b"qemu-img") and argv[1] == b"convert" \
                and any(os.fsencode(work) in a for a in argv):
            pids.append(int(pid))
    return pids


def stage_of(spool: Spool, name: str) -> str | None:
    p = protocol.item_progress(protocol.SpoolPaths.under(spool.root), name)
    return p.get("stage") if p else None


def assert_cancelled(spool: Spool, name: str, original: bytes) -> None:
    rec = spool.record(name)
    assert rec is not None and rec["status"] == "failed"
    assert rec["error"]["code"] == "cancelled"
    assert (spool.failed / name).read_bytes() == original
    assert not (spool.outgoing / name).exists() and not (spool.outgoing / f"{name}.json").exists()
    assert not [n for n in os.listdir(spool.incoming) if n.startswith(protocol.CANCEL_PREFIX)]


def test_cancel_without_a_daemon_takes_the_item_out_of_incoming(tmp_path: Path, spool: Spool) -> None:
    cfg = write_config(tmp_path)
    for d in (spool.incoming, spool.outgoing, spool.failed, spool.work):
        d.mkdir(parents=True)
    src = make_image(tmp_path / "a.qcow2", "qcow2")
    spool.drop(src, "a")
    rc, out = cancel(cfg, "a")
    assert rc == 0, out
    assert_cancelled(spool, "a", src.read_bytes())
    assert "by an operator" in spool.record("a")["error"]["message"]


def test_cancel_stops_qemu_img_convert_and_keeps_the_original(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(write_config(tmp_path, **SLOW))
    src = data_qcow2(tmp_path / "big.qcow2")
    spool.drop(src, "big")
    wait_for(lambda: converting(spool.work), what="qemu-img convert to start")
    wait_for(lambda: stage_of(spool, "big") == "convert", what="the status to show the convert")
    rc, out = cancel(d.config, "big")
    assert rc == 0, out
    assert not converting(spool.work)
    assert_cancelled(spool, "big", src.read_bytes())
    # the worker slot is free again: the next item converts
    spool.drop(make_image(tmp_path / "next.qcow2", "qcow2"), "next")
    assert spool.wait_record("next")["status"] == "converted"


def test_cancel_of_an_item_waiting_for_space_leaves_the_others_running(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    # Room for one 64 MiB output at a time: the second waits in reserve while
    # the first converts, 16 s at 2 MiB/s: longer than a `convd cancel`
    # takes to start under load (see SLOW), short enough to wait for after.
    cfg = write_config(tmp_path, convert={"max_workers": 2}, limits={"workspace": "100MiB"},
                       **{"convert.qemu_args": {"qcow2": ["-r", "2M"]}})
    d = daemon_factory(cfg)
    first = data_qcow2(tmp_path / "first.qcow2", data=32 * MiB)
    second = data_qcow2(tmp_path / "second.qcow2", data=32 * MiB)
    spool.drop(first, "first")
    wait_for(lambda: stage_of(spool, "first") == "convert", what="the first item to convert")
    spool.drop(second, "second")
    wait_for(lambda: stage_of(spool, "second") == "reserve", what="the second item to wait for space")
    rc, out = cancel(d.config, "second")
    assert rc == 0, out
    assert_cancelled(spool, "second", second.read_bytes())
    assert spool.wait_record("first", timeout=120)["status"] == "converted"


def test_cancel_of_a_published_item_is_refused_and_the_result_stands(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(write_config(tmp_path))
    spool.drop(make_image(tmp_path / "done.qcow2", "qcow2"), "done")
    assert spool.wait_record("done")["status"] == "converted"
    rc, out = cancel(d.config, "done")
    assert rc == 1
    assert "already published" in out
    assert (spool.outgoing / "done.json").exists() and (spool.outgoing / "done").exists()


def test_cancel_of_no_such_item_exits_1(tmp_path: Path, spool: Spool,
                                        daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(write_config(tmp_path))
    rc, out = cancel(d.config, "nothing-here")
    assert rc == 1
    assert "no such item" in out
    assert not [n for n in os.listdir(spool.incoming) if n.startswith(".")]


def test_cancel_without_a_daemon_takes_the_item_from_a_stopped_instance(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    cfg = write_config(tmp_path, **SLOW)
    d = daemon_factory(cfg)
    src = data_qcow2(tmp_path / "orphan.qcow2")
    spool.drop(src, "orphan")
    wait_for(lambda: converting(spool.work), what="qemu-img convert to start")
    d.kill_group()  # kill -9: the item stays in work/test/orphan/
    assert (spool.work / "test" / "orphan" / "source").exists()
    rc, out = cancel(cfg, "orphan")
    assert rc == 0, out
    assert_cancelled(spool, "orphan", src.read_bytes())
    assert not (spool.work / "test" / "orphan").exists()
    # the next start finds nothing to resume
    d2 = daemon_factory(cfg)
    assert not any(e.get("event") == "claimed" for e in d2.events())
    assert os.listdir(spool.outgoing) == []


def test_a_producer_cancels_through_the_spool_alone(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(write_config(tmp_path, **SLOW))
    src = data_qcow2(tmp_path / "p.qcow2")
    paths = protocol.SpoolPaths.under(spool.root)
    staged = tmp_path / "staged"
    staged.write_bytes(src.read_bytes())
    inode = protocol.hand_in(staged, paths, "p")
    wait_for(lambda: converting(spool.work), what="qemu-img convert to start")
    protocol.request_cancel(paths, "p", inode=inode, reason="the import was withdrawn")
    where, rec = wait_for(lambda: protocol.find_record(paths, "p", inode), what="the record")
    assert where == "failed"
    assert rec["error"] == {"code": "cancelled", "message": "cancelled: the import was withdrawn"}
    wait_for(lambda: not (spool.incoming / f"{protocol.CANCEL_PREFIX}p").exists(),
             what="the daemon to remove the settled request")
    assert_cancelled(spool, "p", src.read_bytes())
    assert d.proc.poll() is None


def test_a_cancel_request_for_other_bytes_does_not_cancel_a_later_item_of_that_name(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(write_config(tmp_path))
    paths = protocol.SpoolPaths.under(spool.root)
    src = make_image(tmp_path / "x.qcow2", "qcow2")
    protocol.request_cancel(paths, "x", inode=1, reason="left over from an earlier item")
    spool.drop(src, "x")
    assert spool.wait_record("x")["status"] == "converted"
    wait_for(lambda: not (spool.incoming / f"{protocol.CANCEL_PREFIX}x").exists(),
             what="the settled request to go")


def test_a_cancel_request_made_while_convd_is_stopped_is_honoured_at_the_next_start(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.signal(signal.SIGTERM)
    d.proc.wait(10)
    src = make_image(tmp_path / "later.qcow2", "qcow2")
    paths = protocol.SpoolPaths.under(spool.root)
    staged = tmp_path / "staged"
    staged.write_bytes(src.read_bytes())
    inode = protocol.hand_in(staged, paths, "later")
    assert not protocol.daemons_running(paths)
    protocol.request_cancel(paths, "later", inode=inode, reason="timed out")
    daemon_factory(cfg)
    spool.wait_record("later")
    time.sleep(0.5)
    assert_cancelled(spool, "later", src.read_bytes())


def test_cancel_while_unpacking_stops_the_unpack_and_keeps_the_container(
        tmp_path: Path, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    # 256 gzip members of 64 MiB of zeros each: a 16 MiB file that takes
    # seconds to unpack (to a 16 GiB sparse raw), made in a blink.
    member = gzip.compress(bytes(64 * MiB), compresslevel=9)
    packed = tmp_path / "packed.gz"
    with open(packed, "wb") as f:
        for _ in range(256):
            f.write(member)
    d = daemon_factory(write_config(tmp_path))
    spool.drop(packed, "packed")
    wait_for(lambda: stage_of(spool, "packed") == "unpack", what="the status to show the unpack")
    rc, out = cancel(d.config, "packed")
    assert rc == 0, out
    assert_cancelled(spool, "packed", packed.read_bytes())  # the container as dropped
    assert spool.record("packed")["source"].get("container") == ["gzip"]
    assert not [p for p in spool.work.rglob("*") if p.name == "unpacked"]
    wait_for(lambda: _status(spool)["workspace"]["reserved"] == 0, what="the unpack's reservation to be freed")
    assert d.proc.poll() is None


def _status(spool: Spool) -> dict:
    try:
        return json.loads((spool.work / "test" / ".status.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return {"workspace": {"reserved": None}}


@pytest.mark.parametrize("takeover_interval", [1, 60])
def test_cancel_of_a_stopped_instance_item_while_another_daemon_runs_handles_each_once(
        tmp_path: Path, daemon_factory: Callable[..., Daemon], takeover_interval: int) -> None:
    # alpha's items are left in work/alpha/ (its daemon gone) while beta runs.
    # Each `convd cancel` races beta's take-over: whichever gets
    # work/alpha/.adopt first handles the item (the command rejects it from
    # there, or beta adopts it and honours the request), and every item ends
    # in failed/ exactly once, as cancelled.  Checking every second, beta
    # mostly adopts first; checking every minute (its start-up check saw
    # nothing), the commands reject them from work/alpha/ beside it.
    root = tmp_path / "spool"
    configs = {}
    for inst in ("alpha", "beta"):
        (tmp_path / inst).mkdir()
        configs[inst] = write_config(tmp_path / inst, spool={"root": str(root), "instance": inst,
                                                             "takeover_interval": takeover_interval}, **SLOW)
    spool = Spool(root)
    sp = SpoolOf(SpoolConfig(root=root, incoming=spool.incoming, work=spool.work, outgoing=spool.outgoing,
                             failed=spool.failed, instance="alpha"))
    sp.prepare()
    sp.close()  # alpha "dies": its lock is free; its items are put in place below
    names = [f"orphan{i}" for i in range(4)]
    originals = {}
    for name in names:
        src = data_qcow2(tmp_path / f"{name}.qcow2", data=32 * MiB)  # about 32 s to convert under SLOW
        originals[name] = src.read_bytes()
        staged = spool.work / "alpha" / f".{name}.new"  # a dot-name: no one's item until renamed
        staged.mkdir()
        shutil.copyfile(src, staged / "source")
    beta = daemon_factory(configs["beta"])
    for name in names:
        os.rename(spool.work / "alpha" / f".{name}.new", spool.work / "alpha" / name)
    procs = [subprocess.Popen([convd_bin(), "cancel", n, "-c", str(configs["beta"])], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in names]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    for name in names:
        assert_cancelled(spool, name, originals[name])
        assert not list(spool.failed.glob(f"{name}.1*"))  # never rejected twice
        assert not (spool.work / "alpha" / name).exists() and not (spool.work / "beta" / name).exists()
    assert beta.proc.poll() is None
    assert not [e for e in beta.events() if e.get("level") in ("error", "critical")]
    assert not any(e.get("event") == "converted" for e in beta.events())
    adopted = [e for e in beta.events() if e.get("event") == "adopted an item of a stopped instance"]
    if takeover_interval == 60:
        assert adopted == []
