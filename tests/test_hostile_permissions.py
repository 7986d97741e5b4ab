"""Who may do what in the spool (systemd/convd.tmpfiles, docs/operations.md): a producer
gets incoming/ and read access to the results, nothing more; a consumer (Glance)
also takes results away from outgoing/ and reads the daemons' status in work/.

The spool is made by systemd-tmpfiles from the packaged snippet; convd runs as
its own user with the capabilities the unit grants, and the producers and the
consumer as other users (``setpriv``), as in the documented deployment.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from convd.config import SpoolConfig
from convd.pipeline.spool import Spool
from convd_testing.glance_server import GLANCE_VENV, reachable_convd

from conftest import CORPUS, MiB, as_user, make_image, run, system_users, unit_spool, wait_for

# This module's own names: other suites make and remove theirs at the same time.
CONVD_USER, PRODUCER, OTHER, CONSUMER = ("convdtest-permd", "convdtest-perm1", "convdtest-perm2",
                                         "convdtest-permc")
GROUP, CONSUMERS = "convdtest-perm-spool", "convdtest-perm-take"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="other users (useradd, setpriv) need root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) switches users"),
    pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles makes the spool"),
]

# Run as another user: each operation (argv[1], a JSON list of [op, path, path2])
# is tried and answered "ok" or the errno's name, one JSON list on stdout.
PROBE = r"""
import errno, json, os, sys
out = []
for op, path, *rest in json.loads(sys.argv[1]):
    try:
        if op == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif op == "write":
            os.close(os.open(path, os.O_WRONLY))
        elif op == "create":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif op == "unlink":
            os.unlink(path)
        elif op == "rename":
            os.rename(path, rest[0])
        elif op == "chmod":
            os.chmod(path, 0o666)
        elif op == "list":
            os.listdir(path)
        elif op == "drop":  # as a producer drops: a dot-temp name, then rename
            tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".part")
            with open(rest[0], "rb") as src, open(tmp, "xb") as dst:
                dst.write(src.read())
            os.chmod(tmp, 0o640)
            os.rename(tmp, path)
        out.append("ok")
    except OSError as exc:
        out.append(errno.errorcode.get(exc.errno, str(exc.errno)))
print(json.dumps(out))
"""


@pytest.fixture
def users() -> Iterator[None]:
    with system_users(GROUP, CONVD_USER, PRODUCER, OTHER, consumers=CONSUMERS, consuming=(CONSUMER,)):
        yield


@pytest.fixture
def base() -> Iterator[Path]:
    # /tmp/pytest-of-root is 0700: the users need a tree they can reach.
    b = Path(tempfile.mkdtemp(prefix="convd-perm-", dir="/tmp"))
    b.chmod(0o755)
    yield b
    shutil.rmtree(b, ignore_errors=True)


def probe(user: str, *ops: tuple[str, ...]) -> list[str]:
    out = run(*as_user(user, "/usr/bin/python3", "-c", PROBE, json.dumps([[str(a) for a in op] for op in ops])))
    return list(json.loads(out.stdout))


@pytest.mark.slow
# "no-chown": an older unit's CAP_LEASE alone; convd reads private copies, and
# a reject stays its producer's inode (docs/operations.md: the consumer knows
# its reject by that inode); the directories keep everything else as it is.
@pytest.mark.parametrize("caps", ["+lease,+chown", "+lease"], ids=["unit", "no-chown"])
def test_a_producer_reads_results_and_changes_nothing_but_its_own_drops_and_a_consumer_takes_results(
        base: Path, users: None, caps: str) -> None:
    if not (GLANCE_VENV / "bin" / "convd").exists():
        pytest.skip(f"convd for another user is copied from the Glance venv: make glance-venv ({GLANCE_VENV})")
    spool = unit_spool(base, CONVD_USER, GROUP, CONSUMERS)
    inc, work, out, failed = (spool / d for d in ("incoming", "work", "outgoing", "failed"))
    good = make_image(base / "good.qcow2", "qcow2", 4 * MiB)
    bad = base / "bad.qcow2"
    shutil.copyfile(CORPUS / "qcow-with-backing.qcow2", bad)
    for p in (good, bad):
        p.chmod(0o644)
    conf = base / "convd.toml"
    conf.write_text(f'[spool]\nroot = "{spool}"\ninstance = "perm"\n[log]\nformat = "json"\n'
                    '[metrics]\nlisten = ""\n[watch]\nsettle = 0.5\n')
    conf.chmod(0o644)
    log_path = base / "convd.log"
    with open(log_path, "wb") as log:
        # As the unit runs it: convd's user, its capabilities ambient, UMask=0027.
        daemon = subprocess.Popen(
            ["setpriv", f"--reuid={CONVD_USER}", f"--regid={CONVD_USER}", "--init-groups",
             f"--inh-caps={caps}", f"--ambient-caps={caps}", "--",
             "sh", "-c", f'umask 0027; exec "{reachable_convd()}" run -c "{conf}"'],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=base)
    try:
        wait_for(lambda: b'"watching"' in log_path.read_bytes() or daemon.poll() is not None, what="convd")
        assert daemon.poll() is None, log_path.read_text()
        # Another producer's upload still being written, under a name convd ignores.
        assert probe(OTHER, ("create", inc / ".theirs.part")) == ["ok"]
        assert probe(PRODUCER, ("drop", inc / "good", good), ("drop", inc / "bad", bad)) == ["ok", "ok"]
        wait_for(lambda: (out / "good.json").exists() and (failed / "bad.json").exists(), timeout=120,
                 what="both records")
        status = work / "perm" / ".status.json"
        assert status.exists()

        everything = [out / "good", out / "good.json", failed / "bad", failed / "bad.json"]
        # What the producer may not write: all of it, but the reject's bytes only
        # when convd could take them (without CAP_CHOWN they stay the producer's).
        results = everything if "chown" in caps else [p for p in everything if p != failed / "bad"]
        n = len(results)
        got = probe(
            PRODUCER,
            *[("read", p) for p in everything],
            *[("write", p) for p in results],
            *[("chmod", p) for p in results],
            *[("unlink", p) for p in everything],
            *[("rename", p, p.with_name("mine")) for p in everything],
            ("create", out / "planted"), ("create", failed / "planted.json"),
            ("list", work), ("read", status), ("list", work / "perm"),
            # the sticky incoming/: another producer's file is not this one's to take
            ("unlink", inc / ".theirs.part"), ("rename", inc / ".theirs.part", inc / ".stolen.part"),
        )
        assert got == (["ok"] * 4 + ["EACCES"] * n + ["EPERM"] * n + ["EACCES"] * 8 + ["EACCES"] * 2
                       + ["EACCES"] * 3 + ["EPERM"] * 2), got
        # Results and rejects are convd's, with no write bit for anyone else;
        # the reject's bytes are those dropped.
        for p in results:
            st = p.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam(CONVD_USER).pw_uid, 0o640), p
        assert (failed / "bad").read_bytes() == bad.read_bytes()

        # `convd cancel` as a producer, who cannot see into work/: answered from the records.
        done = run(*as_user(PRODUCER, str(reachable_convd()), "cancel", "good", "-c", str(conf), "--wait", "5"),
                   check=False)
        assert done.returncode == 1 and "already published" in done.stdout + done.stderr, done
        # The consumer reads where an item is, takes the result away, and leaves
        # rejects for the operator.
        taken = base / "taken"
        taken.mkdir()
        shutil.chown(taken, CONSUMER, CONSUMER)
        got = probe(CONSUMER, ("list", work), ("read", status), ("read", failed / "bad.json"),
                    ("unlink", failed / "bad.json"), ("write", out / "good"),
                    ("unlink", out / "good.json"), ("rename", out / "good", taken / "good"))
        assert got == ["ok", "ok", "ok", "EACCES", "EACCES", "ok", "ok"], got
        assert os.listdir(out) == []
        # Nobody else gets in at all.
        for d in (spool, inc, work, out, failed):
            peek = run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "ls", d,
                       check=False)
            assert peek.returncode != 0, d
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)


def test_a_claimed_items_directory_is_convds_alone(tmp_path: Path) -> None:
    # work/<instance>/ is readable by consumers (status, locks); an item's
    # directory, holding another producer's bytes, never is.
    root = tmp_path / "spool"
    sp = Spool(SpoolConfig(root=root, incoming=root / "incoming", work=root / "work", outgoing=root / "outgoing",
                           failed=root / "failed", instance="perm"))
    sp.prepare()
    try:
        (root / "incoming" / "item").write_bytes(b"\0" * 512)
        claim = sp.claim("item")
        assert claim is not None
        assert os.stat(claim.dir).st_mode & 0o777 == 0o700
    finally:
        sp.close()
