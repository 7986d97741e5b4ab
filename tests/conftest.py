"""Shared fixtures: real images made with qemu-img/qemu-io, spools, and `convd run` subprocesses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

# The harness lives in convd_testing (shared with bench/); the tests import it from here too.
from convd_testing.daemon import Daemon, Spool, convd_bin, wait_for  # noqa: F401 - re-exported to the tests
from convd_testing.glance_server import stop_on_signals

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "os-test-images"
MiB = 1 << 20


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI's cancel, a timeout) ends the run as Ctrl-C does: fixtures
    # tear down, and every tracked process group is reaped at exit.
    stop_on_signals(interrupt=True)


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


@contextlib.contextmanager
def system_users(group: str, *users: str, consumers: str | None = None,
                 consuming: tuple[str, ...] = ()) -> Iterator[None]:
    """System ``users`` in ``group`` (each also in a group of its own name), for the
    tests that run convd, a producer or Glance as other users; removed again if
    made here.  ``consumers``: a second group (systemd/convd.tmpfiles' convd-consumers),
    with the ``consuming`` users (made if need be, and also in ``group``) in it."""
    made_groups = [g for g in (group, consumers) if g and run("getent", "group", g, check=False).returncode != 0]
    for g in made_groups:
        run("groupadd", "-f", "--system", g)
    made = []
    for user in (*users, *consuming):
        try:
            pwd.getpwnam(user)
        except KeyError:
            run("useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", user)
            made.append(user)
        run("usermod", "-a", "-G", group, user)
        if consumers and user in consuming:
            run("usermod", "-a", "-G", consumers, user)
    try:
        yield
    finally:
        for user in made:
            run("userdel", user, check=False)
        for g in made_groups:
            run("groupdel", g, check=False)


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
