"""Shared fixtures: real images made with qemu-img/qemu-io, spools, and `convd run` subprocesses."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

# The harness lives in convd_testing (shared with bench/); the tests import it from here too.
from convd_testing.daemon import Daemon, Spool, convd_bin, wait_for  # noqa: F401 - re-exported to the tests
from convd_testing.glance_server import reap, stop_on_signals

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "os-test-images"
MiB = 1 << 20


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI's cancel, a timeout) ends the run as Ctrl-C does: fixtures
    # tear down, and every tracked process group is reaped at exit.
    stop_on_signals(interrupt=True)
    if hasattr(config, "workerinput"):
        # An xdist worker: the controller forwards its SIGTERM, and a terminal's
        # Ctrl-C reaches the worker too; the first unwinds, the rest are ignored
        # so that the teardown (MariaDB, Ceph, UML...) runs to its end.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _worker_stop)
    elif config.getoption("numprocesses", None):
        # xdist's controller: left alone, it stops the workers (execnet kills
        # them after a few seconds) before their fixtures have stopped what they
        # started.  It first lets each worker unwind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _controller_stop)


_STOPPING = False


def _worker_stop(signum: int, frame: Any) -> None:
    global _STOPPING
    _STOPPING = True
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def pytest_unconfigure(config: pytest.Config) -> None:
    # A stopped worker has torn its fixtures down: it exits, which is what the
    # controller waits for (left alone, it would wait for the controller).
    if hasattr(config, "workerinput") and _STOPPING:
        reap()
        os._exit(130)


def _controller_stop(signum: int, frame: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    me = str(os.getpid())
    workers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].split()[1] == me:
            workers.append(int(pid))
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
    # Their teardown: a MariaDB's clean shutdown alone may take 30 s.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and
                                              b"zombie" not in Path(f"/proc/{pid}/status").read_bytes()
                                              for pid in workers):
        time.sleep(0.2)
    raise KeyboardInterrupt


# `make test` runs the suite on several xdist workers.  The tests of a module
# that starts one server for all its tests form one unit of work, so the
# server starts once, on one worker: Glance (glance-api and MariaDB, a session
# fixture); the Ceph clusters of test_rbd and test_sharedfs (3 and 4 GiB of
# memstore: one at a time on this machine); test_partition's NFS and CephFS
# cuts (its own 3 GiB cluster, beside them).  (xdist's own `xdist_group` marks
# do nothing with pytest 9.2: xdist renames the items through an attribute
# pytest no longer reads; the scheduler below groups by module instead.)
XDIST_GROUPS = {"test_glance": "glance", "test_rbd": "ceph", "test_sharedfs": "ceph", "test_partition": "partition"}
# The longest first, one to a worker (xdist hands each worker its first unit
# and then one more ahead: keep the 5th to 8th short), so that none starts
# near the end: the 30 power cuts, then the partitions, Glance's and Ceph's groups.
LONGEST_FIRST = ("tests/test_powercut.py::test_power_cuts_at_seeded_moments_lose_nothing_and_publish_nothing_"
                 "half_written[30-cuts]", "tests/test_partition.py::", "tests/test_glance.py::",
                 "tests/test_rbd.py::", "tests/test_sharedfs.py::")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((n for n, p in enumerate(LONGEST_FIRST) if item.nodeid.startswith(p)), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: each module's own order is kept


# The hook exists only where pytest-xdist is installed (the test extras): an
# older venv still runs the suite in one process.
if importlib.util.find_spec("xdist") is not None:
    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        """Each test its own unit of work, except the groups of :data:`XDIST_GROUPS`."""
        if config.getoption("dist") not in ("load", "loadgroup"):
            return None
        from xdist.scheduler import LoadScopeScheduling

        class Grouped(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
                return XDIST_GROUPS.get(module, nodeid)

        return Grouped(config, log)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def run(*argv: str | os.PathLike[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in argv], check=check, capture_output=True, text=True, **kw)


def qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def make_image(path: Path, fmt: str, virtual: int = 16 * MiB, *, opts: str | None = None,
               data: bool = True, seed: int = 1, compress: bool = False) -> Path:
    """An image with random extents, written zeros and holes, made by qemu itself.

    Written as raw with qemu-io, then converted to ``fmt`` (with ``opts``)
    so every format holds the same guest content.
    """
    raw = path.with_name(path.name + ".src.raw")
    run("qemu-img", "create", "-f", "raw", raw, str(virtual))
    if data:
        step = max(virtual // 8, 65536)
        cmds = []
        for i, off in enumerate(range(0, virtual, step)):
            length = min(step // 2, virtual - off)
            if i % 3 == 0:
                cmds.append(f"write -P {(seed * 37 + i) % 251 + 1} {off} {length}")
            elif i % 3 == 1:
                cmds.append(f"write -z {off} {length}")
        # a tail of random bytes so content is not all patterns
        rnd = os.urandom(65536)
        with open(raw, "r+b") as fh:
            fh.seek(virtual - 65536)
            fh.write(rnd)
        if cmds:
            qemu_io(raw, "raw", *cmds)
    if fmt == "raw":
        raw.rename(path)
        return path
    argv: list[str] = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
    if opts:
        argv += ["-o", opts]
    if compress:
        argv += ["-c"]
    run(*argv, raw, path)
    raw.unlink()
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def images_equal(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    return run("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False).returncode == 0


def write_config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """A config for a spool under tmp_path; ``sections`` override keys."""
    base: dict[str, dict[str, Any]] = {
        "spool": {"root": str(tmp_path / "spool"), "instance": "test"},
        "watch": {"settle": 0.5, "rescan_interval": "2s"},
        "log": {"format": "json", "level": "debug"},
        "metrics": {"listen": ""},
        "convert": {"retry_backoff": 0.2},
    }
    for name, body in sections.items():
        base.setdefault(name, {}).update(body)
    lines = []
    for name, body in base.items():
        lines.append(f"[{name}]")
        for k, v in body.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path = tmp_path / "convd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# Who holds each test user and group made here, shared by every pytest process on
# the machine (xdist's workers, another checkout's run): root's, so in /run.
_USERS_STATE = Path("/run/convd-test-users.json") if Path("/run").is_dir() else Path("/tmp/convd-test-users.json")


@contextlib.contextmanager
def _users_state() -> Iterator[dict[str, dict[str, Any]]]:
    """The holders of the test users and groups, under an exclusive lock; written back on exit.
    Holders whose process is gone (a run that was killed) are dropped."""
    with open(_USERS_STATE.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state: dict[str, dict[str, Any]] = json.loads(_USERS_STATE.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        for entry in state.values():
            entry["holders"] = [pid for pid in entry["holders"] if _alive(pid)]
        yield state
        tmp = _USERS_STATE.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, _USERS_STATE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def system_users(group: str | None, *users: str, consumers: str | None = None,
                 consuming: tuple[str, ...] = ()) -> Iterator[None]:
    """System ``users`` (each also in a group of its own name), all in ``group``
    unless it is None, for the tests that run convd, a producer or Glance as other
    users; removed again once no test holds them, if a test made them.
    ``consumers``: a second group (systemd/convd.tmpfiles' convd-consumers), with
    the ``consuming`` users (made if need be, and also in ``group``) in it.

    Tests on other xdist workers (or in another run) may use the same names at
    the same moment: who holds what is kept in one locked file, and the last
    holder of a name this suite made removes it.
    """
    names = [("group", g) for g in (group, consumers) if g]
    names += [("user", u) for u in (*users, *consuming)]
    me = os.getpid()
    with _users_state() as state:
        for kind, name in names:
            entry = state.setdefault(f"{kind}:{name}", {"made": False, "holders": []})
            if kind == "group":
                if run("getent", "group", name, check=False).returncode != 0:
                    run("groupadd", "-f", "--system", name)
                    entry["made"] = True
            else:
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    run("useradd", "--system", "--user-group", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name)
                    entry["made"] = True
                if group:
                    run("usermod", "-a", "-G", group, name)
                if consumers and name in consuming:
                    run("usermod", "-a", "-G", consumers, name)
            entry["holders"].append(me)
    try:
        yield
    finally:
        with _users_state() as state:
            # users first: a group is removed once no user has it as its own
            for kind, name in sorted(names, key=lambda n: n[0] != "user"):
                entry = state.get(f"{kind}:{name}")
                if entry is None:
                    continue
                if me in entry["holders"]:
                    entry["holders"].remove(me)
                if not entry["holders"]:
                    if entry["made"]:
                        run("userdel" if kind == "user" else "groupdel", name, check=False)
                    del state[f"{kind}:{name}"]


TMPFILES = Path(__file__).resolve().parent.parent / "systemd" / "convd.tmpfiles"


def unit_spool(base: Path, owner: str, group: str, consumers: str | None = None) -> Path:
    """``base/spool`` as systemd/convd.tmpfiles makes it (systemd-tmpfiles itself runs
    the snippet), owned by ``owner`` and ``group`` (the tests' users), its
    convd-consumers group ``consumers`` (none when None: its ACL entries are left out)."""
    spool = base / "spool"
    text = TMPFILES.read_text()
    text = text.replace("group:convd-consumers:", f"group:{consumers}:") if consumers \
        else re.sub(r"group:convd-consumers:[rwx-]+,", "", text)
    text = text.replace("/var/lib/convd", str(spool))
    text = re.sub(r"^(d\s+\S+\s+\d+)\s+convd\s+convd", rf"\1 {owner} {group}", text, flags=re.MULTILINE)
    snippet = base / "convd-tmpfiles.conf"
    snippet.write_text(text)
    run("systemd-tmpfiles", "--create", snippet)
    snippet.unlink()
    return spool


def as_user(user: str, *argv: str) -> list[str]:
    """``argv`` run as ``user`` with its groups (``setpriv``)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(config: Path, ready: bool = True, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(config, env)
        made.append(d)
        if ready:
            d.wait_ready()
        return d

    yield make
    for d in made:
        if d.proc.poll() is None:
            d.kill_group()
        else:
            d._log.close()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")
