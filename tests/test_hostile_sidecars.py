"""Hostile sidecars (issue 24): cancel requests a producer shapes to crash, wedge or drain
the daemon, against a real ``convd run`` that runs as its own unprivileged user where
that can be arranged (root can read a mode-000 file; convd's unit cannot)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from convd import protocol
from convd.pipeline.queue import Intake
from convd.pipeline.sidecars import MAX_CANCEL_REQUESTS, CancelBook
from convd_testing.glance_server import GLANCE_VENV, reachable_convd

from conftest import MiB, as_user, convd_bin, make_image, run, system_users, wait_for, write_config

CONVD_USER = "convdtest-convd"
SECRET = "outside-the-spool-secret-reason"


class Hosted:
    """A spool under /tmp (reachable by another user) and a ``convd run`` on it,
    as ``CONVD_USER`` when the test runs as root, else as the test's own user."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "spool"
        self.incoming, self.outgoing, self.failed = (self.root / d for d in ("incoming", "outgoing", "failed"))
        # The checkout may be where another user cannot enter (root's home):
        # that user runs a copy of the Glance venv's convd made reachable.
        self.as_user = (os.geteuid() == 0 and shutil.which("setpriv") is not None
                        and (GLANCE_VENV / "bin" / "convd").exists())
        self.convd = str(reachable_convd()) if self.as_user else convd_bin()
        for d, mode in ((self.root, 0o755), (self.incoming, 0o2777), (self.root / "work", 0o750),
                        (self.outgoing, 0o755), (self.failed, 0o755)):
            d.mkdir()
            if self.as_user:
                shutil.chown(d, CONVD_USER, CONVD_USER)
            d.chmod(mode)
        self.config = base / "convd.toml"
        self.config.write_text(f'[spool]\nroot = "{self.root}"\ninstance = "hostile"\n[log]\nformat = "json"\n'
                               'level = "debug"\n[metrics]\nlisten = ""\n[watch]\nsettle = 0.5\n'
                               'rescan_interval = "1s"\n')
        self.config.chmod(0o644)
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        log_path = self.base / f"convd-{len(self.logs)}.log"
        self.logs.append(log_path)
        argv = [self.convd, "run", "-c", str(self.config)]
        if self.as_user:
            argv = ["setpriv", f"--reuid={CONVD_USER}", f"--regid={CONVD_USER}", "--init-groups", "--", *argv]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: b'"watching"' in log_path.read_bytes() or self.proc.poll() is not None,
                 what="convd to start")
        self.assert_alive()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.log().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                out.append(ev)
        return out

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"convd died:\n{self.log()[-3000:]}"

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"convd did not stop within 10 s after SIGTERM:\n{self.log()[-3000:]}") from None

    def drop(self, src: Path, name: str) -> None:
        tmp = self.incoming / f".{name}.part"
        shutil.copyfile(src, tmp)
        tmp.chmod(0o644)
        os.rename(tmp, self.incoming / name)

    def record(self, name: str) -> dict[str, object] | None:
        for d in (self.outgoing, self.failed):
            p = d / f"{name}.json"
            if p.exists():
                return dict(json.loads(p.read_text()))
        return None

    def converts(self, src: Path, name: str) -> None:
        """Drop ``src`` as ``NAME`` and see it converted: the daemon still works."""
        self.drop(src, name)
        rec = wait_for(lambda: self.record(name), 60, what=f"record of {name}")
        assert rec["status"] == "converted", rec
        self.assert_alive()


@pytest.fixture
def convd_user() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    with system_users(None, CONVD_USER):
        yield


@pytest.fixture
def hosted(convd_user: None) -> Iterator[Hosted]:
    # /tmp/pytest-of-root is 0700: the daemon's user needs a tree it can reach.
    base = Path(tempfile.mkdtemp(prefix="convd-hostile-", dir="/tmp"))
    base.chmod(0o755)
    h = Hosted(base)
    try:
        yield h
    finally:
        if h.proc is not None and h.proc.poll() is None:
            os.killpg(h.proc.pid, signal.SIGKILL)
            h.proc.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "ok.qcow2", "qcow2", 4 * MiB)


def _request(path: Path, body: object, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(body) if not isinstance(body, str) else body)
    tmp.chmod(mode)
    os.rename(tmp, path)


def _directory(p: Path, base: Path) -> None:
    p.mkdir()
    (p / "inside").write_text("x")


def _mode_000(p: Path, base: Path) -> None:
    _request(p, {"inode": None, "reason": "unreadable"}, mode=0)


def _bad_requested_at(p: Path, base: Path) -> None:
    _request(p, {"inode": None, "reason": "x", "requested_at": "tomorrow"})


def _deep_json(p: Path, base: Path) -> None:
    _request(p, "[" * 2000 + "]" * 2000)


def _deep_object(p: Path, base: Path) -> None:
    _request(p, '{"reason": ' + "[" * 50 + "]" * 50 + "}")


def _fifo(p: Path, base: Path) -> None:
    os.mkfifo(p, 0o644)


def _dev_zero(p: Path, base: Path) -> None:
    os.symlink("/dev/zero", p)


def _outside_json(p: Path, base: Path) -> None:
    outside = base / "outside.json"
    outside.write_text(json.dumps({"inode": None, "reason": SECRET}))
    os.symlink(outside, p)


def _huge(p: Path, base: Path) -> None:
    _request(p, json.dumps({"inode": None, "reason": "x", "pad": "y" * (1 << 20)}))


def _not_an_object(p: Path, base: Path) -> None:
    _request(p, "[1, 2, 3]")


def _nan_inode(p: Path, base: Path) -> None:
    _request(p, '{"inode": NaN, "reason": "x"}')


ATTACKS: dict[str, Callable[[Path, Path], None]] = {
    "directory": _directory, "mode_000": _mode_000, "bad_requested_at": _bad_requested_at,
    "deep_json": _deep_json, "deep_object": _deep_object, "fifo": _fifo, "symlink_to_dev_zero": _dev_zero,
    "symlink_to_json_outside_the_spool": _outside_json, "a_megabyte": _huge, "not_an_object": _not_an_object,
    "nan_inode": _nan_inode,
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_malformed_cancel_request_is_set_aside_once_and_the_daemon_lives_on(
        hosted: Hosted, image: Path, tmp_path: Path, attack: str) -> None:
    if attack == "mode_000" and not hosted.as_user:
        pytest.skip("a daemon running as root reads a mode-000 file (needs root, setpriv and `make glance-venv`)")
    victim = make_image(tmp_path / "victim.qcow2", "qcow2", 4 * MiB)
    hosted.start()
    request = hosted.incoming / ".convd-cancel.victim"
    ATTACKS[attack](request, hosted.base)
    hosted.converts(image, "first")
    wait_for(lambda: not os.path.lexists(request), 30, what="the request to be set aside")
    refused = [e for e in hosted.events("cancel request refused; set aside") if e.get("request") == request.name]
    assert len(refused) == 1, hosted.log()[-3000:]
    # The request acted on nothing: an item of that name converts.
    hosted.converts(victim, "victim")
    # ... and it stays harmless across a restart (nothing left to trip over).
    assert hosted.stop() == 0
    hosted.start()
    hosted.converts(image, "second")
    assert hosted.stop() == 0
    assert SECRET not in hosted.log()
    for d in (hosted.outgoing, hosted.failed):
        for f in d.glob("*.json"):
            assert SECRET not in f.read_text()


def test_a_fifo_request_neither_stops_claiming_nor_delays_sigterm(hosted: Hosted, image: Path) -> None:
    hosted.start()
    for i in range(3):
        os.mkfifo(hosted.incoming / f".convd-cancel.pipe{i}", 0o666)
    hosted.converts(image, "through")
    assert hosted.stop() == 0


def test_a_cancel_request_naming_a_refused_name_plants_nothing_in_failed(hosted: Hosted) -> None:
    # victim.json is a name the intake refuses (it would take the record's name):
    # a cancel for it must not move those bytes to failed/victim.json.
    forged = {"schema": 1, "name": "victim", "status": "failed",
              "error": {"code": "cancelled", "message": "forged"}}
    hosted.start()
    (hosted.incoming / "victim.json").write_text(json.dumps(forged))
    _request(hosted.incoming / ".convd-cancel.victim.json", {"inode": None, "reason": "forge"})
    wait_for(lambda: not os.path.lexists(hosted.incoming / ".convd-cancel.victim.json"), 30,
             what="the request to be set aside")
    assert os.listdir(hosted.failed) == []
    assert (hosted.incoming / "victim.json").exists()
    refused = hosted.events("cancel request refused; set aside")
    assert len(refused) == 1 and "intake refuses" in str(refused[0]["reason"])
    hosted.assert_alive()
    assert hosted.stop() == 0


def test_ten_thousand_future_dated_requests_are_bounded_and_expire_and_items_still_convert(
        hosted: Hosted, image: Path) -> None:
    n = 10_000
    future = time.time() + 10 * 365 * 86400
    hosted.start()
    body = json.dumps({"inode": None, "reason": "flood", "requested_at": future})
    for i in range(n):
        tmp = hosted.incoming / f".flood{i}.tmp"
        tmp.write_text(body)
        tmp.chmod(0o644)
        os.rename(tmp, hosted.incoming / f".convd-cancel.ghost{i}")

    def left() -> int:
        return sum(1 for f in os.listdir(hosted.incoming) if f.startswith(".convd-cancel."))

    # Past the bound, requests are refused at once; the rest wait no longer than
    # convd's own staleness, whatever date they state.
    wait_for(lambda: left() <= MAX_CANCEL_REQUESTS, 60, what="the flood to be cut to the bound")
    hosted.converts(image, "during-the-flood")
    wait_for(lambda: left() == 0, 90, what="the remaining requests to expire")
    over = hosted.events("too many cancel requests; the newest were refused and set aside")
    assert over and sum(int(str(e["refused"])) for e in over) == n - MAX_CANCEL_REQUESTS
    assert hosted.stop() == 0


def test_an_expectation_the_daemon_may_not_read_is_refused_with_a_record_saying_so(
        hosted: Hosted, image: Path) -> None:
    if not hosted.as_user:
        pytest.skip("a daemon running as root reads a mode-000 file (needs root, setpriv and `make glance-venv`)")
    hosted.start()
    _request(hosted.incoming / ".convd-expect.locked", {"size": image.stat().st_size}, mode=0)
    hosted.drop(image, "locked")
    rec = wait_for(lambda: hosted.record("locked"), 60, what="record of locked")
    err = rec["error"]
    assert isinstance(err, dict) and err["code"] == "corrupt_image"
    assert err["message"].startswith("the expectation .convd-expect.locked cannot be used: it cannot be opened")
    assert (hosted.failed / "locked").read_bytes() == image.read_bytes()
    assert not os.path.lexists(hosted.incoming / ".convd-expect.locked")
    hosted.converts(image, "after")
    assert hosted.stop() == 0


def test_convd_cancel_of_a_refused_name_moves_nothing(tmp_path: Path) -> None:
    # With no daemon running, `convd cancel` withdraws items itself: never a name
    # the intake refuses (victim.json would land in failed/ as another item's record).
    cfg = write_config(tmp_path)
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "victim.json").write_text('{"forged": true}')
    done = run(convd_bin(), "cancel", "victim.json", "-c", cfg, "--wait", "2", check=False)
    assert done.returncode == 1 and "not an item" in done.stdout + done.stderr
    assert (incoming / "victim.json").exists()
    assert not (tmp_path / "spool" / "failed" / "victim.json").exists()


# -- another producer's sidecars: planted under a victim's name, they count for nothing -----------

# Names of this module's own (other suites make and remove theirs at the same time).
PRODUCER_A, PRODUCER_B = "convdtest-sidecar-a", "convdtest-sidecar-b"
NEEDS_USERS = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="producers as other users need root and setpriv (util-linux)")

# Run as a producer: put a file in incoming/ the way producers do, through a
# dot-temp and a rename (which, in the sticky incoming/, can never replace
# another user's file).
_PLANT = """
import os, shutil, sys
kind, dest, what = sys.argv[1:4]
tmp = os.path.join(os.path.dirname(dest), "." + os.path.basename(dest) + ".part")
if kind == "json":
    with open(tmp, "w") as f:
        f.write(what)
elif kind == "symlink":
    os.symlink(what, tmp)
else:
    shutil.copyfile(what, tmp)
if kind != "symlink":
    os.chmod(tmp, 0o644)
os.rename(tmp, dest)
"""


@pytest.fixture
def producers(convd_user: None) -> Iterator[tuple[int, int]]:
    """Two producer users, A and B: their uids."""
    with system_users(None, PRODUCER_A, PRODUCER_B):
        yield pwd.getpwnam(PRODUCER_A).pw_uid, pwd.getpwnam(PRODUCER_B).pw_uid


def _plant(user: str, dest: Path, kind: str, what: object) -> None:
    """As ``user``: ``dest`` holding ``what`` (``json``: a body; ``symlink``: a target; ``copy``: a file)."""
    text = what if isinstance(what, str) else json.dumps(what)
    run(*as_user(user, "/usr/bin/python3", "-c", _PLANT, kind, str(dest), text))


def _owned(path: Path, data: bytes, uid: int) -> None:
    """``path`` holding ``data``, owned by ``uid`` (as that producer would have made it)."""
    path.write_bytes(data)
    os.chown(path, uid, uid)


def _sticky(hosted: Hosted) -> None:
    # As the unit's tmpfiles snippet makes it: nobody removes or replaces another's file.
    hosted.incoming.chmod(0o3777)


def _readable(hosted: Hosted, src: Path, name: str) -> Path:
    """``src`` copied where the producers can read it."""
    dst = hosted.base / name
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
    return dst


def _set_aside(hosted: Hosted, sidecar: str) -> list[dict[str, object]]:
    return [e for e in hosted.events("sidecar not the producer's; ignored") if e.get("sidecar") == sidecar]


@NEEDS_USERS
def test_another_producers_layout_and_expectation_are_set_aside_and_the_victim_converts_as_configured(
        hosted: Hosted, producers: tuple[int, int], image: Path) -> None:
    uid_a, uid_b = producers
    _sticky(hosted)
    src = _readable(hosted, image, "victim.qcow2")
    # B plants both before A drops (the order a producer's own sidecars come in),
    # a layout the daemon would make and an expectation the bytes would fail.
    _plant(PRODUCER_B, hosted.incoming / ".convd-layout.victim", "json", {"raw": {"preallocation": "full"}})
    _plant(PRODUCER_B, hosted.incoming / ".convd-expect.victim", "json", {"size": 1})
    # ... and, under a second name, ones that could not even be read: links.
    _plant(PRODUCER_B, hosted.incoming / ".convd-layout.victim2", "symlink", "/etc/passwd")
    _plant(PRODUCER_B, hosted.incoming / ".convd-expect.victim2", "symlink", "/nonexistent")
    hosted.start()
    _plant(PRODUCER_A, hosted.incoming / "victim", "copy", str(src))
    _plant(PRODUCER_A, hosted.incoming / "victim2", "copy", str(src))
    for name in ("victim", "victim2"):
        rec = wait_for(lambda n=name: hosted.record(n), 60, what=f"record of {name}")
        assert rec["status"] == "converted", rec
        assert rec["target"]["layout"] == {"preallocation": "off"}, rec  # the daemon's own [target.raw]
        for prefix in (".convd-layout.", ".convd-expect."):
            sidecar = f"{prefix}{name}"
            # Left for B's own drop of that name, if any: never B's to take A's away either.
            assert os.path.lexists(hosted.incoming / sidecar)
            logged = _set_aside(hosted, sidecar)
            assert len(logged) == 1, hosted.log()[-3000:]
            assert (logged[0]["uid"], logged[0]["producer_uid"], logged[0]["item"]) == (uid_b, uid_a, name)
    # A's own sidecars still count.
    _plant(PRODUCER_A, hosted.incoming / ".convd-layout.own", "json", {"raw": {"preallocation": "full"}})
    _plant(PRODUCER_A, hosted.incoming / ".convd-expect.own", "json", {"size": 1})
    _plant(PRODUCER_A, hosted.incoming / "own", "copy", str(src))
    rec = wait_for(lambda: hosted.record("own"), 60, what="record of own")
    assert rec["status"] == "failed" and rec["error"]["code"] == "corrupt_image", rec
    assert "the producer stated size 1 bytes" in rec["error"]["message"], rec
    _plant(PRODUCER_A, hosted.incoming / ".convd-layout.own2", "json", {"raw": {"preallocation": "full"}})
    _plant(PRODUCER_A, hosted.incoming / "own2", "copy", str(src))
    rec = wait_for(lambda: hosted.record("own2"), 60, what="record of own2")
    assert rec["status"] == "converted" and rec["target"]["layout"] == {"preallocation": "full"}, rec
    assert not _set_aside(hosted, ".convd-layout.own") and not _set_aside(hosted, ".convd-layout.own2")
    assert hosted.stop() == 0


@NEEDS_USERS
def test_another_producers_cancel_request_waiting_at_start_is_set_aside_and_the_victim_converts(
        hosted: Hosted, producers: tuple[int, int], image: Path) -> None:
    # No daemon runs: B's request for A's name waits, then A drops. A starting
    # daemon looks at every request at once and would claim A's item to cancel it.
    uid_a, uid_b = producers
    _sticky(hosted)
    src = _readable(hosted, image, "victim.qcow2")
    _plant(PRODUCER_B, hosted.incoming / ".convd-cancel.victim", "json", {"inode": None, "reason": "B was here"})
    _plant(PRODUCER_A, hosted.incoming / "victim", "copy", str(src))
    # A may not even remove it: the directory is sticky.
    gone = run(*as_user(PRODUCER_A, "rm", "-f", str(hosted.incoming / ".convd-cancel.victim")), check=False)
    assert gone.returncode != 0 and os.path.lexists(hosted.incoming / ".convd-cancel.victim")
    hosted.start()
    rec = wait_for(lambda: hosted.record("victim"), 60, what="record of victim")
    assert rec["status"] == "converted", rec
    wait_for(lambda: not os.path.lexists(hosted.incoming / ".convd-cancel.victim"), 30,
             what="B's request to be set aside")
    logged = _set_aside(hosted, ".convd-cancel.victim")
    assert [(e["uid"], e["producer_uid"]) for e in logged] == [(uid_b, uid_a)], hosted.log()[-3000:]
    assert "B was here" not in json.dumps(rec)
    # A's own request, and root's, waiting the same way, still cancel.
    assert hosted.stop() == 0
    _plant(PRODUCER_A, hosted.incoming / ".convd-cancel.mine", "json", {"inode": None, "reason": "A's own"})
    _plant(PRODUCER_A, hosted.incoming / "mine", "copy", str(src))
    _plant(PRODUCER_A, hosted.incoming / "by-root", "copy", str(src))
    _request(hosted.incoming / ".convd-cancel.by-root", {"inode": None, "reason": "root's"})
    hosted.start()
    for name, reason in (("mine", "A's own"), ("by-root", "root's")):
        rec = wait_for(lambda n=name: hosted.record(n), 60, what=f"record of {name}")
        assert rec["status"] == "failed" and rec["error"]["code"] == "cancelled", rec
        assert rec["error"]["message"] == f"cancelled: {reason}"
        assert (hosted.failed / name).read_bytes() == src.read_bytes()
    assert len(_set_aside(hosted, ".convd-cancel.victim")) == 1 and not _set_aside(hosted, ".convd-cancel.mine")
    assert hosted.stop() == 0


@NEEDS_USERS
@pytest.mark.parametrize("asker", ["B", "B-cli", "A", "root", "convd"])
def test_a_cancel_request_for_an_item_in_work_counts_only_from_its_producer_root_or_convd(
        hosted: Hosted, producers: tuple[int, int], tmp_path: Path, asker: str) -> None:
    if asker in ("convd", "B-cli") and not hosted.as_user:
        pytest.skip("convd's own user, and a convd another user can run, need `make glance-venv`")
    uid_a, uid_b = producers
    _sticky(hosted)
    # qemu-img convert -r: a convert of 16 s, long enough to ask in (see test_cancel's SLOW).
    with open(hosted.config, "a") as f:
        f.write('[convert.qemu_args]\nqcow2 = ["-r", "1M"]\n')
    src = tmp_path / "big.qcow2"
    run("qemu-img", "create", "-f", "qcow2", src, str(32 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 9 0 {16 * MiB}", src)
    src = _readable(hosted, src, "big.qcow2")
    hosted.start()
    _plant(PRODUCER_A, hosted.incoming / "big", "copy", str(src))
    paths = protocol.SpoolPaths.under(hosted.root)
    try:
        wait_for(lambda: (protocol.item_progress(paths, "big") or {}).get("stage") == "convert", 60,
                 what="the item to convert")
    except AssertionError:
        raise AssertionError(hosted.log()[-4000:]) from None
    request = hosted.incoming / ".convd-cancel.big"
    body = {"inode": None, "reason": f"asked by {asker}"}
    if asker in ("A", "B"):
        _plant(PRODUCER_A if asker == "A" else PRODUCER_B, request, "json", body)
    elif asker == "convd":
        _plant(CONVD_USER, request, "json", body)
    elif asker == "B-cli":
        # B may run `convd cancel` too: its request is B's, and the command says it was set aside.
        done = run(*as_user(PRODUCER_B, hosted.convd, "cancel", "big", "-c", str(hosted.config), "--wait", "5"),
                   check=False)
        assert done.returncode == 1 and "set the cancel request aside" in done.stdout + done.stderr, done
    else:
        _request(request, body)
    rec = wait_for(lambda: hosted.record("big"), 120, what="record of big")
    if asker.startswith("B"):
        assert rec["status"] == "converted", rec
        wait_for(lambda: not os.path.lexists(request), 30, what="B's request to be set aside")
        logged = _set_aside(hosted, request.name)
        assert [(e["uid"], e["producer_uid"]) for e in logged] == [(uid_b, uid_a)], hosted.log()[-3000:]
    else:
        assert rec["status"] == "failed" and rec["error"]["code"] == "cancelled", rec
        assert rec["error"]["message"] == f"cancelled: asked by {asker}"
        assert not _set_aside(hosted, request.name)
    assert hosted.stop() == 0


@NEEDS_USERS
def test_another_producers_priority_mark_is_set_aside_and_the_producers_own_counts(
        tmp_path: Path, producers: tuple[int, int]) -> None:
    uid_a, uid_b = producers
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name, marker in (("victim", uid_b), ("own", uid_a), ("by-root", 0)):
        _owned(incoming / name, b"\0" * 512, uid_a)
        _owned(incoming / f"{protocol.PRIORITY_PREFIX}{name}", b'{"priority": "high"}', marker)
    intake = Intake(incoming, 0.5)
    with structlog.testing.capture_logs() as logs:
        for name in ("victim", "own", "by-root"):
            intake.saw(name, renamed=True)
    assert {n: c.priority for n, c in intake.pending.items()} == {"victim": False, "own": True, "by-root": True}
    assert (incoming / f"{protocol.PRIORITY_PREFIX}victim").exists()  # B's, for B's own drop of the name
    assert (incoming / f"{protocol.PRIORITY_PREFIX}own").exists()  # removed at claim, as ever
    # At claim only the producer's (or root's) mark goes.
    for name in ("victim", "own", "by-root"):
        protocol.clear_priority(incoming, name, uid_a)
    assert sorted(f for f in os.listdir(incoming) if f.startswith(protocol.PRIORITY_PREFIX)) == \
        [f"{protocol.PRIORITY_PREFIX}victim"]
    refused = [e for e in logs if e["event"] == "sidecar not the producer's; ignored"]
    assert [(e["sidecar"], e["uid"], e["producer_uid"]) for e in refused] == \
        [(f"{protocol.PRIORITY_PREFIX}victim", uid_b, uid_a)]


@NEEDS_USERS
@pytest.mark.parametrize("kind", ["file", "symlink", "directory", "fifo"])
def test_a_sidecar_is_attributed_to_its_owner_whatever_it_is(
        tmp_path: Path, producers: tuple[int, int], kind: str) -> None:
    uid_a, uid_b = producers
    path = tmp_path / ".convd-expect.victim"
    if kind == "file":
        path.write_text('{"size": 1}')
    elif kind == "symlink":
        os.symlink("/etc/passwd", path)
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    os.lchown(path, uid_b, uid_b)
    if kind == "file":
        assert protocol.read_sidecar_owned(path) == ({"size": 1}, uid_b)
    else:
        with pytest.raises(protocol.SidecarError) as err:
            protocol.read_sidecar_owned(path)
        assert err.value.owner == uid_b  # from the descriptor looked at, never a second lookup
    assert protocol.foreign_sidecar(uid_b, uid_a) is not None
    assert protocol.foreign_sidecar(None, uid_a) is not None
    for honoured in (uid_a, 0, os.geteuid()):
        assert protocol.foreign_sidecar(honoured, uid_a) is None
    assert protocol.foreign_sidecar(uid_a, None) is not None  # producer unknown: root's and convd's only


@NEEDS_USERS
def test_another_producers_file_claimed_first_under_the_name_leaves_the_victims_sidecars_for_its_own_drop(
        hosted: Hosted, producers: tuple[int, int], image: Path) -> None:
    # The trial's race: A writes its sidecars, then (a slow copy) its file; B
    # renames a file of its own in under A's name between the two.  B's claim
    # must not take A's sidecars away: A's drop, when it lands, has them.
    uid_a, uid_b = producers
    _sticky(hosted)
    src = _readable(hosted, image, "raced.qcow2")
    junk = hosted.base / "junk"
    junk.write_bytes(b"")
    junk.chmod(0o644)
    hosted.start()
    _plant(PRODUCER_A, hosted.incoming / ".convd-layout.raced", "json", {"raw": {"preallocation": "full"}})
    _plant(PRODUCER_A, hosted.incoming / ".convd-expect.raced", "json", {"size": src.stat().st_size})
    _plant(PRODUCER_B, hosted.incoming / "raced", "copy", str(junk))
    first = wait_for(lambda: hosted.record("raced"), 60, what="the record of B's file")
    assert first["status"] == "failed", first  # B's empty file, on its own merits
    for sidecar in (".convd-layout.raced", ".convd-expect.raced"):
        assert os.path.lexists(hosted.incoming / sidecar), sidecar
        logged = _set_aside(hosted, sidecar)
        assert [(e["uid"], e["producer_uid"]) for e in logged] == [(uid_a, uid_b)]
    _plant(PRODUCER_A, hosted.incoming / "raced", "copy", str(src))
    rec = wait_for(lambda: hosted.outgoing.joinpath("raced.json").exists() and hosted.record("raced"), 60,
                   what="the record of A's file")
    assert rec["status"] == "converted" and rec["target"]["layout"] == {"preallocation": "full"}, rec
    assert not os.path.lexists(hosted.incoming / ".convd-layout.raced")  # taken with A's item
    assert hosted.stop() == 0


@NEEDS_USERS
def test_one_producers_flood_of_cancel_requests_does_not_refuse_anothers(
        tmp_path: Path, producers: tuple[int, int]) -> None:
    uid_a, uid_b = producers
    incoming = tmp_path / "incoming"
    incoming.mkdir()

    def request(name: str, uid: int) -> None:
        _owned(incoming / f"{protocol.CANCEL_PREFIX}{name}", json.dumps({"name": name, "inode": None}).encode(), uid)

    for i in range(MAX_CANCEL_REQUESTS + 10):
        request(f"ghost{i}", uid_b)
    request("mine", uid_a)
    book = CancelBook(incoming, lambda name: None)
    refused, over = book.refresh()
    assert over == 10 and refused == []
    assert "mine" in book.entries and book.entries["mine"].request.uid == uid_a
    assert sum(1 for e in book.entries.values() if e.request.uid == uid_b) == MAX_CANCEL_REQUESTS


@NEEDS_USERS
def test_a_hard_linked_sidecar_belongs_to_no_one_and_counts_for_no_item(
        tmp_path: Path, producers: tuple[int, int]) -> None:
    # B links a file of A's (one A left writable, or any with protected_hardlinks
    # off) under a sidecar name: its owner says nothing of who put it there.
    uid_a, _ = producers
    mine = tmp_path / "a-file"
    mine.write_text('{"raw": {"preallocation": "full"}}')
    os.chown(mine, uid_a, uid_a)
    linked = tmp_path / ".convd-layout.victim"
    os.link(mine, linked)
    with pytest.raises(protocol.SidecarError, match="2 hard links") as caught:
        protocol.read_sidecar_owned(linked)
    assert caught.value.owner is None
    assert protocol.foreign_sidecar(caught.value.owner, uid_a) is not None


def test_a_failed_hand_in_leaves_none_of_its_sidecars_behind(tmp_path: Path, image: Path) -> None:
    # E.g. another producer holds incoming/.NAME.part (here a directory: the
    # rename of the caller's file onto it fails before anything is copied).
    paths = protocol.SpoolPaths.under(tmp_path / "spool")
    for d in (paths.incoming, paths.work, paths.outgoing, paths.failed):
        d.mkdir(parents=True)
    (paths.incoming / ".held.part").mkdir()
    src = tmp_path / "src.qcow2"
    shutil.copyfile(image, src)
    with pytest.raises(OSError):
        protocol.hand_in(src, paths, "held", expect={"size": src.stat().st_size},
                         layout={"raw": {"preallocation": "full"}})
    assert sorted(os.listdir(paths.incoming)) == [".held.part"]
    assert src.exists()
