"""A hostile producer, fuzzed (issue 24): a seeded random schedule of drops, renames,
reopens for writing, truncations, shared mappings, swaps for links, cancel requests,
expectations and archives, run by a producer of another user against a real
``convd run``.  Whatever the interleaving, nothing outside the spool (a canary
only the daemon may read) reaches any output, record or log line, every
published record's checksum is its file's, every drop ends, and the daemon
lives and stops on SIGTERM.

The schedule is fixed per seed; what wins each race with the daemon is not, so
the assertions hold for any interleaving.  ``CONVD_HOSTILE_SEEDS`` (comma
separated) explores other seeds by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from convd_testing.glance_server import GLANCE_VENV, reachable_convd

from conftest import MiB, as_user, convd_bin, images_equal, make_image, run, system_users, unit_spool, wait_for

# This module's own users and group: test_custody and test_hostile_sidecars make
# and remove theirs, and may run at the same time.
PRODUCER, CONVD_USER, GROUP = "convdfuzz-producer", "convdfuzz-convd", "convdfuzz-spool"
SEEDS = [int(s) for s in os.environ.get("CONVD_HOSTILE_SEEDS", "1,2,3").split(",")]
STEPS = 36
# Valid drops, by payload: the qemu-img format of the disk each holds (the tar's is good.qcow2)
GOOD = {"good.qcow2": "qcow2", "good.vmdk": "vmdk", "good.raw": "raw", "good.tar": "qcow2"}
# Headers (or whole files) naming the canary: what a reopen writes at offset 0
EVIL = ("evil-backing.qcow2", "evil-json.qcow2", "evil-datafile.qcow2", "evil-extent.vmdk")
ARCHIVES = ("link.tar", "hardlink.tar", "link.tar.gz")
EXPECTS = (*[None] * 7, "right", "right", "right", "wrong", "symlink", "fifo", "directory", "huge", "bad_field")
CANCELS = ("valid", "valid_inode", "wrong_inode", "malformed", "fifo", "symlink", "directory", "deep")
REOPENS = ("backing", "json", "datafile", "extent", "truncate", "mmap")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="another user (useradd, setpriv) needs root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) switches users"),
]


@pytest.fixture
def users() -> Iterator[None]:
    """The producer, convd's unprivileged user and the spool group; removed again if made here."""
    with system_users(GROUP, CONVD_USER, PRODUCER):
        yield



def schedule(seed: int) -> list[dict[str, Any]]:
    """The producer's steps for ``seed``: the same list every time."""
    rng = random.Random(seed)
    steps: list[dict[str, Any]] = []
    dropped: list[str] = []
    holding: list[str] = []  # dropped with a read-only descriptor kept
    writing: list[str] = []  # written in place, not yet finished
    refused: list[str] = []
    for i in range(STEPS):
        roll = rng.random()
        pause = round(rng.uniform(0.0, 0.3), 3)
        if roll < 0.40 or not dropped:
            payload = rng.choice([*GOOD, *GOOD, *GOOD, *ARCHIVES, *EVIL])
            name = f"s{seed}-{i}-{payload}"
            how = rng.choice(("rename", "rename", "inplace"))
            hold = rng.random() < 0.7
            steps.append({"op": "drop", "name": name, "payload": payload, "pause": pause, "how": how, "hold": hold,
                          "expect": rng.choice(EXPECTS)})
            dropped.append(name)
            holding += [name] if hold else []
            writing += [name] if how == "inplace" else []
        elif roll < 0.58 and holding:
            # "claimed": the moment the name leaves incoming/, the window before custody.
            steps.append({"op": "reopen", "name": rng.choice(holding), "attack": rng.choice(REOPENS),
                          "when": rng.choice(("now", "claimed", "claimed")), "keep": rng.random() < 0.5,
                          "pause": pause})
        elif roll < 0.64:
            steps.append({"op": "away", "name": rng.choice(dropped), "pause": pause})
        elif roll < 0.71:
            steps.append({"op": "swap", "name": rng.choice(dropped), "pause": pause,
                          "to": rng.choice(("symlink", "hardlink_canary", "hardlink_own", "fifo"))})
        elif roll < 0.84:
            target = rng.choice([*dropped, *refused, f"s{seed}-{i + 1}-good.qcow2", f"s{seed}-nothing"])
            steps.append({"op": "cancel", "name": target, "variant": rng.choice(CANCELS), "pause": pause})
        elif roll < 0.89:
            name = rng.choice((f"s{seed}-{i}-refused.img.json", f"s{seed}-{i}-" + "n" * 240))
            steps.append({"op": "refused", "name": name, "pause": pause})
            refused.append(name)
        elif writing:
            name = writing.pop(rng.randrange(len(writing)))
            steps.append({"op": "finish", "name": name, "pause": pause})
    return steps


# The producer (system python, stdlib only): runs the steps in order, and reports
# what each did (one JSON line each) for the failure message.  Everything it may
# fail at (a race lost, a refused open) is an outcome, never its exit.
PRODUCER_SCRIPT = r"""
import hashlib, json, mmap, os, sys, time
incoming, scratch, payloads, canary, canary_json, canary_expect, steps_path = sys.argv[1:8]
steps = json.load(open(steps_path))
os.umask(0o027)
held, writers, rws, maps, rest = {}, {}, {}, {}, {}

def data(payload):
    return open(os.path.join(payloads, payload), "rb").read()

def put(path, body, mode=0o640):
    tmp = os.path.join(incoming, "." + os.path.basename(path) + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(body if isinstance(body, bytes) else body.encode())
    os.chmod(tmp, mode)
    os.rename(tmp, path)

def hostile(path, kind):
    if kind == "fifo":
        os.mkfifo(path, 0o640)
    elif kind == "directory":
        os.mkdir(path)
        open(os.path.join(path, "inside"), "w").close()
    else:
        raise ValueError(kind)

def expect(name, kind, body):
    path = os.path.join(incoming, ".convd-expect." + name)
    if kind == "right":
        put(path, json.dumps({"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}))
    elif kind == "wrong":
        put(path, json.dumps({"size": len(body) + 1}))
    elif kind == "symlink":
        os.symlink(canary_expect, path)
    elif kind == "huge":
        put(path, json.dumps({"size": len(body), "pad": "x" * 8192}))
    elif kind == "bad_field":
        put(path, json.dumps({"sha265": "00"}))
    else:
        hostile(path, kind)

def step(s):
    name, op = s["name"], s["op"]
    final = os.path.join(incoming, name)
    if op == "drop":
        body = data(s["payload"])
        if s["expect"]:
            expect(name, s["expect"], body)
        if s["how"] == "rename":
            tmp = os.path.join(incoming, "." + name + ".part")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            os.write(fd, body)
            os.close(fd)
            if s["hold"]:
                held[name] = os.open(tmp, os.O_RDONLY)
            os.rename(tmp, final)
            return "dropped"
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        half = len(body) // 2
        os.write(fd, body[:half])
        writers[name], rest[name] = fd, body[half:]
        if s["hold"]:
            held[name] = os.open(final, os.O_RDONLY)
        return "writing in place"
    if op == "finish":
        return finish(name)
    if op == "reopen":
        if name not in held:
            return "no descriptor held"
        if s["when"] == "claimed":
            deadline = time.monotonic() + 5
            while os.path.lexists(final) and time.monotonic() < deadline:
                time.sleep(0.002)
        rw = os.open(f"/proc/self/fd/{held[name]}", os.O_RDWR | os.O_NONBLOCK)
        attack = s["attack"]
        if attack == "truncate":
            os.ftruncate(rw, os.fstat(rw).st_size // 3)
        else:
            evil = data({"backing": "evil-backing.qcow2", "json": "evil-json.qcow2", "mmap": "evil-backing.qcow2",
                         "datafile": "evil-datafile.qcow2", "extent": "evil-extent.vmdk"}[attack])
            if attack == "mmap":
                size = os.fstat(rw).st_size
                if size < len(evil):
                    os.ftruncate(rw, len(evil))
                m = mmap.mmap(rw, len(evil), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                m[0:1] = m[0:1]  # dirty it: later stores move no timestamp
                time.sleep(0.05)
                m[:len(evil)] = evil
                maps.setdefault(name, []).append(m)
            else:
                os.pwrite(rw, evil, 0)
        if s["keep"] or attack == "mmap":
            rws.setdefault(name, []).append(rw)
        else:
            os.close(rw)
        return "rewritten"
    if op == "away":
        away = os.path.join(scratch, name)
        os.rename(final, away)
        time.sleep(0.1)
        os.rename(away, final)
        return "renamed away and back"
    if op == "swap":
        tmp = os.path.join(incoming, "." + name + ".swap")
        to = s["to"]
        if to == "symlink":
            os.symlink(canary, tmp)
        elif to == "hardlink_canary":
            os.link(canary, tmp)  # protected_hardlinks: refused unless the producer may write it
        elif to == "hardlink_own":
            own = os.path.join(scratch, name + ".own")
            with open(own, "wb") as fh:
                fh.write(data("good.raw"))
            os.chown(own, -1, os.stat(incoming).st_gid)  # readable by convd, as a file of another's may be
            os.link(own, tmp)
        else:
            os.mkfifo(tmp, 0o640)
        os.rename(tmp, final)
        return "swapped"
    if op == "cancel":
        path = os.path.join(incoming, ".convd-cancel." + name)
        v = s["variant"]
        if v in ("valid", "valid_inode", "wrong_inode"):
            inode = None
            if v != "valid" and name in held:
                inode = os.fstat(held[name]).st_ino + (v == "wrong_inode")
            put(path, json.dumps({"name": name, "inode": inode, "reason": "fuzz " + v}))
        elif v == "malformed":
            put(path, '{"inode": "x", "reason": ')
        elif v == "deep":
            put(path, "[" * 500 + "]" * 500)
        elif v == "symlink":
            os.symlink(canary_json, path)
        else:
            hostile(path, v)
        return "requested"
    if op == "refused":
        put(final, b"refused " * 64)
        return "dropped"
    raise ValueError(op)

def finish(name):
    fd = writers.pop(name, None)
    if fd is None:
        return "nothing to finish"
    os.write(fd, rest.pop(name))
    os.close(fd)
    return "finished"

for s in steps:
    try:
        got = step(s)
    except OSError as exc:
        got = f"{type(exc).__name__}: {exc.strerror}"
    print(json.dumps({**s, "got": got}), flush=True)
    time.sleep(s["pause"])
for name in list(writers):
    finish(name)
for ms in maps.values():
    for m in ms:
        m.close()
for fds in rws.values():
    for fd in fds:
        os.close(fd)
for fd in held.values():
    os.close(fd)
print(json.dumps({"op": "end"}), flush=True)
"""


def _payloads(d: Path, tmp: Path, canary: Path) -> None:
    """Valid images, headers naming the canary, and archives linking to it, readable by the producer."""
    d.mkdir()
    make_image(d / "good.qcow2", "qcow2", 2 * MiB, seed=3)
    make_image(d / "good.vmdk", "vmdk", 2 * MiB, seed=4)
    make_image(d / "good.raw", "raw", MiB, seed=5)
    with tarfile.open(d / "good.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(d / "good.qcow2", arcname="disk.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", canary, "-F", "raw", d / "evil-backing.qcow2", str(MiB))
    spec = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": str(canary)}})
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", f"json:{spec}", "-F", "raw", d / "evil-json.qcow2",
        str(MiB))
    # A data file of the canary's name: made with a decoy of the same length, renamed in the header.
    decoy = canary.with_name("d" * (len(canary.name) - 4) + ".raw")
    assert len(str(decoy)) == len(str(canary))
    run("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={decoy}", tmp / "df.qcow2", str(MiB))
    decoy.unlink(missing_ok=True)
    body = (tmp / "df.qcow2").read_bytes()
    assert body.count(os.fsencode(decoy)) == 1
    (d / "evil-datafile.qcow2").write_bytes(body.replace(os.fsencode(decoy), os.fsencode(canary)))
    (d / "evil-extent.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW 2048 FLAT "{canary}" 0\nddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\n'
        'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n')
    for arc, kind in (("link.tar", tarfile.SYMTYPE), ("hardlink.tar", tarfile.LNKTYPE)):
        with tarfile.open(d / arc, "w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("disk.raw")
            info.type, info.linkname = kind, str(canary)
            tar.addfile(info)
    with tarfile.open(d / "link.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("disk.raw")
        info.type, info.linkname = tarfile.SYMTYPE, str(canary)
        tar.addfile(info)
        raw = (d / "good.raw").read_bytes()
        info = tarfile.TarInfo("second.raw")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    for p in d.iterdir():
        p.chmod(0o644)




def _as_unit(exe: str, *args: str) -> list[str]:
    # As the unit runs convd: its own user with CAP_LEASE and CAP_CHOWN, ambient.
    return ["setpriv", f"--reuid={CONVD_USER}", f"--regid={CONVD_USER}", "--init-groups",
            "--inh-caps=+lease,+chown", "--ambient-caps=+lease,+chown", "--",
            "sh", "-c", f'umask 0027; exec "{exe}" "$@"', "convd", *args]


def _daemon_argv(daemon: str, conf: Path) -> list[str]:
    if daemon == "root":
        return [convd_bin(), "run", "-c", str(conf)]
    # The checkout may be where that user cannot enter (root's home): a copy of the
    # Glance venv's convd made reachable.
    if not (GLANCE_VENV / "bin" / "convd").exists():
        pytest.skip(f"convd for another user is copied from the Glance venv: make glance-venv ({GLANCE_VENV})")
    return _as_unit(str(reachable_convd()), "run", "-c", str(conf))


def _regular_files(top: Path) -> Iterator[Path]:
    """Every regular file under ``top``, never through a link, never opening a FIFO."""
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            p = Path(dirpath, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                yield p


def _ended(spool: Path, name: str) -> bool:
    if (spool / "outgoing" / f"{name}.json").exists() or (spool / "failed" / f"{name}.json").exists():
        return True
    return any(f.startswith(f"{name}.") and f.endswith(".json") and f[len(name) + 1:-5].isdigit()
               for f in os.listdir(spool / "failed"))


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "daemon"), [*((s, "root") for s in SEEDS), (SEEDS[0] + 100, "unit")])
def test_a_fuzzed_hostile_producer_gets_nothing_outside_the_spool_and_the_daemon_lives(
        tmp_path: Path, users: None, seed: int, daemon: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="convd-fuzz-", dir="/tmp"))
    base.chmod(0o755)
    try:
        _fuzz(base, tmp_path, seed, daemon)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fuzz(base: Path, tmp_path: Path, seed: int, daemon: str) -> None:
    daemon_user = "root" if daemon == "root" else CONVD_USER
    spool = unit_spool(base, daemon_user, GROUP)
    # The canaries: outside the spool, readable by the daemon only.  The marker
    # is never given to the producer, so it can reach the spool only through convd.
    marker = hashlib.sha256(os.urandom(16)).hexdigest()
    canary, canary_json, canary_expect = base / "canary.raw", base / "canary.json", base / "canary-expect.json"
    canary.write_bytes(marker.encode() * (2 * MiB // len(marker)))
    canary_json.write_text(json.dumps({"inode": None, "reason": marker}))
    canary_expect.write_text(json.dumps({"sha256": marker}))
    for c in (canary, canary_json, canary_expect):
        shutil.chown(c, daemon_user, daemon_user)
        c.chmod(0o600)
    payloads = base / "payloads"
    _payloads(payloads, tmp_path, canary)
    scratch = base / "producer"
    scratch.mkdir()
    shutil.chown(scratch, PRODUCER, PRODUCER)
    steps = schedule(seed)
    steps_path = base / "steps.json"
    steps_path.write_text(json.dumps(steps))
    steps_path.chmod(0o644)
    rng = random.Random(seed)
    target = rng.choice(("raw", "raw", "qcow2"))
    conf = base / "convd.toml"
    conf.write_text(f'[spool]\nroot = "{spool}"\ninstance = "fuzz"\n[log]\nformat = "json"\nlevel = "debug"\n'
                    '[metrics]\nlisten = ""\n[watch]\nsettle = 0.5\nrescan_interval = "1s"\n'
                    f'[convert]\ntarget_format = "{target}"\nretry_backoff = 0.2\n')
    conf.chmod(0o644)
    log_path = base / "convd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_daemon_argv(daemon, conf), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=base)

    def alive() -> None:
        assert proc.poll() is None, f"convd died ({proc.returncode}):\n{log_path.read_text()[-4000:]}"

    try:
        wait_for(lambda: b'"watching"' in log_path.read_bytes() or proc.poll() is not None, what="convd to start")
        alive()
        producer = subprocess.Popen(
            as_user(PRODUCER, "/usr/bin/python3", "-c", PRODUCER_SCRIPT, str(spool / "incoming"), str(scratch),
                    str(payloads), str(canary), str(canary_json), str(canary_expect), str(steps_path)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The daemon lives through the whole schedule, not only at its end.
        while producer.poll() is None:
            alive()
            time.sleep(0.1)
        out, err = producer.communicate()
        assert producer.returncode == 0 and out.rstrip().endswith('{"op": "end"}'), err
        report = out

        dropped = {s["name"] for s in steps if s["op"] == "drop"}
        refused = {s["name"] for s in steps if s["op"] == "refused"}
        claims = spool / "work" / "fuzz"

        def settled() -> bool:
            alive()
            left = {f for f in os.listdir(spool / "incoming") if not f.startswith(".")}
            busy = [f for f in os.listdir(claims) if not f.startswith(".")] if claims.exists() else []
            return left <= refused and not busy and all(_ended(spool, n) for n in dropped)

        wait_for(settled, 120, 0.2, what=f"every drop to end (producer's steps:\n{report})")
        for name in refused:
            assert (spool / "incoming" / name).exists(), name
            assert not any(os.path.lexists(spool / d / name) for d in ("outgoing", "failed")), name

        records: dict[Path, dict[str, Any]] = {}
        for d in ("outgoing", "failed"):
            for p in (spool / d).glob("*.json"):
                records[p] = json.loads(p.read_text())
        for p, rec in records.items():
            if p.parent.name == "outgoing":
                assert rec["status"] in ("converted", "passthrough"), rec
                published = p.with_name(p.name[:-5])
                assert rec["target"]["checksums"]["sha256"] == hashlib.sha256(published.read_bytes()).hexdigest()
            else:
                assert rec["error"]["code"] != "internal_error", rec

        # Drops nothing else touched convert, to what the producer dropped.
        touched = {s["name"] for s in steps if s["op"] in ("reopen", "away", "swap", "cancel")}
        for s in steps:
            name = s["name"]
            if s["op"] != "drop" or name in touched or s["payload"] not in GOOD or s["expect"] not in (None, "right"):
                continue
            rec = records[spool / "outgoing" / f"{name}.json"] if (spool / "outgoing" / f"{name}.json").exists() \
                else records[spool / "failed" / f"{name}.json"]
            assert rec["status"] in ("converted", "passthrough"), (rec, report)
            src = payloads / ("good.qcow2" if s["payload"] == "good.tar" else s["payload"])
            assert images_equal(src, GOOD[s["payload"]], spool / "outgoing" / name, target), name

        # A file of the producer's outside the spool (hard-linked in) is still its own:
        # convd took no inode that has another name.
        for p in _regular_files(scratch):
            assert p.stat().st_uid == pwd.getpwnam(PRODUCER).pw_uid, f"convd took {p} (producer's steps:\n{report})"
        alive()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(f"convd did not stop within 10 s of SIGTERM:\n{log_path.read_text()[-3000:]}"
                                     ) from None
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    # Nothing of the canaries anywhere in the spool, nor in the log (read once the
    # daemon has stopped: nothing changes under the scan).
    needle = marker.encode()
    for p in [*_regular_files(spool), log_path]:
        assert needle not in p.read_bytes(), f"the canary's bytes reached {p} (producer's steps:\n{report})"
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]
