"""The ``convd`` import plugin inside a real glance-api, driven over Glance's REST API.

One glance-api (Glance 33.0.0 under uWSGI, from ``make glance-venv``) on a
private MariaDB, and one ``convd run``, share a temp directory for the
session; the staging directory and the spool are on one filesystem, so the
hand-off is a rename.  Tests that need another Glance configuration start
their own on the same MariaDB.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from convd import protocol
from convd_testing.glance_server import (
    GlanceClient,
    GlanceServer,
    MariaDB,
    glance_venv_problem,
    mariadb_problem,
    portable_venv,
)

from conftest import (
    CORPUS,
    Daemon,
    MiB,
    Spool,
    convd_bin,
    images_equal,
    make_image,
    run,
    system_users,
    unit_spool,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.skipif(glance_venv_problem() is not None, reason=str(glance_venv_problem())),
              pytest.mark.skipif(mariadb_problem() is not None, reason=str(mariadb_problem()))]

VIRTUAL = 16 * MiB


@dataclass
class Env:
    root: Path
    db: MariaDB
    glance: GlanceServer
    client: GlanceClient
    config: Path
    daemon: Daemon
    spool: Spool
    web: Path
    web_port: int

    @property
    def paths(self) -> protocol.SpoolPaths:
        return protocol.SpoolPaths.under(self.spool.root)

    def restart_daemon(self) -> None:
        if self.daemon.proc.poll() is None:
            self.daemon.stop()
        self.daemon = Daemon(self.config)
        self.daemon.wait_ready()

    def reload(self, **sections: dict[str, Any]) -> None:
        """Rewrite the daemon's config (the session's, plus ``sections``) and SIGHUP it."""
        n = sum(1 for e in self.daemon.events() if e.get("event") == "reloaded")
        daemon_config(self.root, **sections)
        self.daemon.signal(signal.SIGHUP)
        wait_for(lambda: sum(1 for e in self.daemon.events() if e.get("event") == "reloaded") > n,
                 what="the daemon to reload")


def daemon_config(root: Path, **sections: dict[str, Any]) -> Path:
    base: dict[str, dict[str, Any]] = {
        "convert": {"max_workers": 1, "retry_backoff": 0.2},
        "checksum": {"algorithms": ["sha256", "sha512"]},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return write_config(root, **base)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


@pytest.fixture(scope="session")
def glance_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("glance")
    web = root / "web"
    web.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _QuietHandler(*a, directory=str(web)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    config = daemon_config(root)
    db = MariaDB(root / "mariadb")
    glance = GlanceServer(root / "glance", plugins=["convd"], web_port=httpd.server_address[1], db=db,
                          import_conf={"convd": {"spool": root / "spool", "timeout": 120,
                                                 "poll_interval": 0.5, "heartbeat_interval": 0.5}})
    env = Env(root, db, glance, glance.client(), config, Daemon(config), Spool(root / "spool"), web,
              httpd.server_address[1])
    try:
        env.daemon.wait_ready()
        db.start()
        glance.start()
        yield env
    finally:
        glance.stop()
        db.stop()
        httpd.shutdown()
        httpd.server_close()
        if env.daemon.proc.poll() is None:
            env.daemon.stop()


def sha512(path: Path) -> str:
    """Glance's default os_hash_algo, of a stored file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha512").hexdigest()


def import_staged(client: GlanceClient, src: Path, disk_format: str) -> str:
    image_id = client.create(src.name, disk_format)
    client.stage(image_id, src)
    client.import_(image_id)
    return image_id


def assert_active_raw(env: Env, image_id: str, src: Path, fmt: str, task: dict[str, Any]) -> None:
    assert task["status"] == "success", task["message"]
    img = env.client.image(image_id)
    stored = env.glance.images / image_id
    assert (img["status"], img["disk_format"], img["container_format"]) == ("active", "raw", "bare")
    # as qemu computes it (a VHD's is rounded to its CHS geometry)
    virtual = json.loads(run("qemu-img", "info", "-f", fmt, "--output=json", src).stdout)["virtual-size"]
    assert img["size"] == img["virtual_size"] == virtual == stored.stat().st_size
    assert images_equal(src, fmt, stored, "raw")
    assert (img["os_hash_algo"], img["os_hash_value"]) == ("sha512", sha512(stored))
    # convd did the conversion (a plugin that failed to load is skipped silently)
    assert any(e.get("event") == "claimed" and e.get("item") == image_id for e in env.daemon.events())
    assert not any(n.startswith(image_id) for n in os.listdir(env.spool.outgoing))


def at_once(call: Callable[[str], None], ids: list[str]) -> None:
    """``call(image_id)`` for every id, each in its own thread, released at the same
    moment (a barrier), as a cloud's users do; the first error is raised."""
    barrier = threading.Barrier(len(ids))
    errors: list[BaseException] = []

    def one(image_id: str) -> None:
        try:
            barrier.wait(30)
            call(image_id)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def assert_back_to_queued(env: Env, image_id: str, disk_format: str) -> None:
    img = env.client.image(image_id)
    assert (img["status"], img["disk_format"]) == ("queued", disk_format)
    assert img["os_glance_failed_import"] == "local"
    assert not (env.glance.images / image_id).exists()


FORMATS = [
    ("qcow2", "qcow2", None),
    ("vmdk", "vmdk", "subformat=monolithicSparse"),
    ("vmdk", "vmdk", "subformat=streamOptimized"),
    ("vpc", "vhd", None),
    ("vhdx", "vhdx", None),
    ("vdi", "vdi", None),
]


@pytest.mark.parametrize(("fmt", "disk_format", "opts"), FORMATS,
                         ids=["qcow2", "vmdk-sparse", "vmdk-streamOptimized", "vhd", "vhdx", "vdi"])
def test_glance_direct_upload_ends_active_as_raw(glance_env: Env, tmp_path: Path, fmt: str,
                                                 disk_format: str, opts: str | None) -> None:
    src = make_image(tmp_path / f"disk.{disk_format}", fmt, VIRTUAL, opts=opts)
    image_id = import_staged(glance_env.client, src, disk_format)
    task = glance_env.client.wait_import(image_id)
    assert_active_raw(glance_env, image_id, src, fmt, task)


def test_web_download_goes_through_convd(glance_env: Env, tmp_path: Path) -> None:
    src = make_image(glance_env.web / "web.qcow2", "qcow2", VIRTUAL, seed=7)
    image_id = glance_env.client.create("web", "qcow2")
    glance_env.client.import_(image_id, "web-download", f"http://127.0.0.1:{glance_env.web_port}/web.qcow2")
    task = glance_env.client.wait_import(image_id)
    assert_active_raw(glance_env, image_id, src, "qcow2", task)


def test_web_download_reject_reaches_the_user_and_the_image_imports_again(glance_env: Env, tmp_path: Path) -> None:
    # The download task before the plugin reverts the image to queued itself:
    # the plugin must leave that to it, or Glance's revert fails and the
    # image stays locked ("Image has active task") with "Internal Error".
    src = make_image(glance_env.web / "wd.vmdk", "vmdk", VIRTUAL, opts="subformat=monolithicSparse", seed=8)
    client = glance_env.client
    image_id = client.create("wd", "qcow2")
    url = f"http://127.0.0.1:{glance_env.web_port}/wd.vmdk"
    client.import_(image_id, "web-download", url)
    task = client.wait_import(image_id)
    assert task["status"] == "failure"
    assert task["message"].startswith("convd: format_mismatch: "), task["message"]
    assert_back_to_queued(glance_env, image_id, "qcow2")
    client.patch(image_id, [{"op": "replace", "path": "/disk_format", "value": "vmdk"}])
    client.import_(image_id, "web-download", url)
    assert_active_raw(glance_env, image_id, src, "vmdk", client.wait_import(image_id, ntasks=2))


def test_staged_data_that_is_not_the_size_glance_counted_fails_the_import_and_goes_back_to_queued(
        glance_env: Env, tmp_path: Path) -> None:
    # The plugin states the size Glance's staging upload counted (contract
    # section 8); bytes added to the staged file since are not what was uploaded.
    src = make_image(tmp_path / "grown.qcow2", "qcow2", VIRTUAL, seed=11)
    client = glance_env.client
    image_id = client.create("grown", "qcow2")
    client.stage(image_id, src)
    size = src.stat().st_size
    with open(glance_env.glance.staging / image_id, "ab") as staged:
        staged.write(b"\0" * 512)
    client.import_(image_id)
    task = client.wait_import(image_id)
    assert task["status"] == "failure"
    assert task["message"].startswith("convd: corrupt_image: "), task["message"]
    assert f"stated size {size} bytes; {size + 512} bytes were received" in task["message"]
    assert_back_to_queued(glance_env, image_id, "qcow2")
    rec = glance_env.spool.record(image_id)
    assert rec["error"]["code"] == "corrupt_image"
    assert not os.path.lexists(glance_env.spool.incoming / f".convd-expect.{image_id}")


@pytest.mark.parametrize("sample", ["qcow-with-backing.qcow2", "qcow-with-datafile.qcow2"])
def test_hostile_image_fails_with_unsafe_image_and_goes_back_to_queued(glance_env: Env, tmp_path: Path,
                                                                       sample: str) -> None:
    src = tmp_path / sample
    shutil.copyfile(CORPUS / sample, src)
    image_id = import_staged(glance_env.client, src, "qcow2")
    task = glance_env.client.wait_import(image_id)
    assert task["status"] == "failure"
    assert task["message"].startswith("convd: unsafe_image: "), task["message"]
    assert_back_to_queued(glance_env, image_id, "qcow2")
    # the operator keeps the original bytes and the record
    assert glance_env.spool.record(image_id)["error"]["code"] == "unsafe_image"
    assert (glance_env.spool.failed / image_id).read_bytes() == src.read_bytes()


def test_declared_qcow2_that_is_vmdk_fails_format_mismatch_then_imports_once_fixed(
        glance_env: Env, tmp_path: Path) -> None:
    src = make_image(tmp_path / "really.vmdk", "vmdk", VIRTUAL, opts="subformat=monolithicSparse")
    client = glance_env.client
    image_id = import_staged(client, src, "qcow2")
    task = client.wait_import(image_id)
    assert task["status"] == "failure"
    assert task["message"].startswith("convd: format_mismatch: "), task["message"]
    assert_back_to_queued(glance_env, image_id, "qcow2")

    client.patch(image_id, [{"op": "replace", "path": "/disk_format", "value": "vmdk"}])
    client.stage(image_id, src)
    client.import_(image_id)
    assert_active_raw(glance_env, image_id, src, "vmdk", client.wait_import(image_id, ntasks=2))


def test_imports_started_at_the_same_moment_all_end_as_they_should(glance_env: Env, tmp_path: Path) -> None:
    # Six images of five formats, one of them hostile, staged, then imported
    # by six clients at once: every flow's first saves meet in Glance's database.
    srcs: list[tuple[Path, str, str]] = []
    for i, (fmt, disk_format, opts) in enumerate(FORMATS[:5]):
        srcs.append((make_image(tmp_path / f"once{i}.{disk_format}", fmt, VIRTUAL, opts=opts, seed=20 + i),
                     fmt, disk_format))
    hostile = tmp_path / "once-hostile.qcow2"
    shutil.copyfile(CORPUS / "qcow-with-backing.qcow2", hostile)
    client = glance_env.client
    ids = [client.create(src.name, disk_format) for src, _, disk_format in srcs]
    bad = client.create(hostile.name, "qcow2")
    staged = {**{i: src for i, (src, _, _) in zip(ids, srcs)}, bad: hostile}
    at_once(lambda i: client.stage(i, staged[i]), [*ids, bad])
    at_once(client.import_, [*ids, bad])
    for image_id, (src, fmt, _) in zip(ids, srcs):
        assert_active_raw(glance_env, image_id, src, fmt, client.wait_import(image_id))
    task = client.wait_import(bad)
    assert task["message"].startswith("convd: unsafe_image: "), task["message"]
    assert_back_to_queued(glance_env, bad, "qcow2")


@pytest.mark.slow
def test_import_times_out_while_convd_is_stopped_and_nothing_publishes_later(
        glance_env: Env, tmp_path: Path) -> None:
    short = GlanceServer(tmp_path / "glance", plugins=["convd"], db=glance_env.db,
                         import_conf={"convd": {"spool": glance_env.spool.root, "timeout": 2,
                                                "poll_interval": 0.2, "heartbeat_interval": 1.0}}).start()
    src = make_image(tmp_path / "late.qcow2", "qcow2", VIRTUAL)
    glance_env.daemon.stop()
    try:
        client = short.client()
        image_id = import_staged(client, src, "qcow2")
        task = client.wait_import(image_id)
        assert task["status"] == "failure"
        assert task["message"].startswith("convd: timeout: "), task["message"]
        img = client.image(image_id)
        assert (img["status"], img["disk_format"]) == ("queued", "qcow2")
        # the item waits in incoming/ beside the request to cancel it
        assert image_id in os.listdir(glance_env.spool.incoming)
    finally:
        glance_env.restart_daemon()
        short.stop()
    rec = glance_env.spool.wait_record(image_id)
    assert (rec["status"], rec["error"]["code"]) == ("failed", "cancelled")
    time.sleep(1.0)  # one more turn of the daemon: still nothing published
    assert not [n for n in os.listdir(glance_env.spool.outgoing) if n.startswith(image_id)]
    assert not [n for n in os.listdir(glance_env.spool.incoming) if image_id in n]


def _converting(image_dir: str) -> list[int]:
    """pids of the qemu-img convert children working on a spool item."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(b"qemu-img") and argv[1] == b"convert" \
                and any(image_dir.encode() in a for a in argv):
            pids.append(int(pid))
    return pids


@pytest.fixture
def slow_convert(glance_env: Env) -> Iterator[None]:
    """qcow2 converts limited to 2 MiB/s (qemu-img convert -r): long enough to watch and cancel.

    The window must outlast Glance's next heartbeat and a `convd cancel`
    process's start under load (over 4 s at a load average of 12 on 2 cores).
    """
    glance_env.reload(**{"convert.qemu_args": {"qcow2": ["-r", "2M"]}})
    yield
    glance_env.reload(**{"convert.qemu_args": {}})


def test_cancel_during_convert_stops_qemu_img_and_fails_the_import(
        glance_env: Env, tmp_path: Path, slow_convert: None) -> None:
    src = tmp_path / "big.qcow2"
    run("qemu-img", "create", "-f", "qcow2", src, str(256 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {96 * MiB}", src)  # 48 s at 2 MiB/s
    client = glance_env.client
    image_id = client.create("big", "qcow2")
    client.stage(image_id, src)
    client.import_(image_id)
    work = str(glance_env.spool.work / "test" / image_id)
    wait_for(lambda: _converting(work), what="qemu-img convert to start")
    # the task shows convd's progress while it waits
    wait_for(lambda: any(t["message"].startswith("convd: convert") and "(qcow2 \u2192 raw)" in t["message"]
                         for t in client.tasks(image_id)), what="a progress message on the task")
    pids = _converting(work)
    done = run(convd_bin(), "cancel", image_id, "-c", glance_env.config, check=False)
    assert done.returncode == 0, done.stderr
    assert not _converting(work)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
    task = client.wait_import(image_id)
    assert task["status"] == "failure"
    assert task["message"].startswith("convd: cancelled"), task["message"]
    img = client.image(image_id)
    assert (img["status"], img["disk_format"], img["os_glance_failed_import"]) == ("queued", "qcow2", "local")
    assert glance_env.spool.record(image_id)["error"]["code"] == "cancelled"
    assert not (glance_env.spool.outgoing / image_id).exists()


def test_four_imports_at_once_with_one_worker_all_succeed_one_convert_at_a_time(
        glance_env: Env, tmp_path: Path) -> None:
    # 2 s per convert: long enough to sample.
    glance_env.reload(**{"convert.qemu_args": {"qcow2": ["-r", "8M"]}})
    try:
        srcs = []
        for i in range(4):
            src = tmp_path / f"four{i}.qcow2"
            run("qemu-img", "create", "-f", "qcow2", src, str(VIRTUAL))
            run("qemu-io", "-f", "qcow2", "-c", f"write -P {i + 1} 0 {VIRTUAL}", src)
            srcs.append(src)
        client = glance_env.client
        ids = [client.create(s.name, "qcow2") for s in srcs]
        for image_id, src in zip(ids, srcs):
            client.stage(image_id, src)
        at_once(client.import_, ids)
        most = seen = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = len(_converting(str(glance_env.spool.work)))
            most, seen = max(most, now), seen + (now > 0)
            if all(t["status"] in ("success", "failure") for i in ids for t in client.tasks(i)):
                break
            time.sleep(0.05)
        for image_id, src in zip(ids, srcs):
            assert_active_raw(glance_env, image_id, src, "qcow2", client.wait_import(image_id))
        assert seen and most == 1
    finally:
        glance_env.reload(**{"convert.qemu_args": {}})


# -- Glance and convd as different users ------------------------------------------

GLANCE_USER, CONVD_USER, GROUP = "convdtest-glance", "convdtest-convd", "convdtest-spool"
CONSUMERS = "convdtest-consumers"  # systemd/convd.tmpfiles' convd-consumers


@pytest.fixture
def two_users() -> Iterator[None]:
    """The two service users, the spool's group and its consumers' (Glance's); removed again if made here."""
    with system_users(GROUP, CONVD_USER, consumers=CONSUMERS, consuming=(GLANCE_USER,)):
        yield


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="creating the two users (useradd) needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to switch users")
def test_glance_and_convd_as_different_users_share_the_spool_and_no_one_else_gets_in(
        tmp_path: Path, two_users: None) -> None:
    # /tmp/pytest-of-root is 0700: the two users need a tree they can reach.
    base = Path(tempfile.mkdtemp(prefix="convd-users-", dir="/tmp"))
    base.chmod(0o755)
    try:
        _two_users(base, tmp_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _two_users(base: Path, tmp_path: Path) -> None:
    # What convd.tmpfiles makes, with the test's users and groups.
    spool = unit_spool(base, CONVD_USER, GROUP, CONSUMERS)
    conf = base / "convd.toml"
    conf.write_text(f'[spool]\nroot = "{spool}"\ninstance = "users"\n[log]\nformat = "json"\n'
                    '[metrics]\nlisten = ""\n[watch]\nsettle = 0.5\n')
    conf.chmod(0o644)
    # What the two users run, where they can reach it: not the checkout's
    # venv, which may live where they cannot enter (root's home is 0700).
    venv = portable_venv(base / "venv")
    log = open(base / "convd.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        ["setpriv", f"--reuid={CONVD_USER}", f"--regid={CONVD_USER}", "--init-groups", "--",
         "sh", "-c", f'umask 0027; exec "{venv}/bin/convd" run -c "{conf}"'],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=base)
    gdir = base / "glance"
    gdir.mkdir()
    shutil.chown(gdir, GLANCE_USER, GLANCE_USER)
    glance = GlanceServer(gdir, plugins=["convd"], user=GLANCE_USER, venv=venv,
                          import_conf={"convd": {"spool": spool, "timeout": 60, "poll_interval": 0.5,
                                                 "heartbeat_interval": 0.5}})
    try:
        wait_for(lambda: b'"watching"' in (base / "convd.log").read_bytes() or daemon.poll() is not None,
                 what="convd to start")
        assert daemon.poll() is None, (base / "convd.log").read_text()
        glance.start()
        client = glance.client()
        src = make_image(tmp_path / "users.qcow2", "qcow2", VIRTUAL)
        ok = import_staged(client, src, "qcow2")
        task = client.wait_import(ok)
        assert task["status"] == "success", task["message"] + glance.log()[-2000:]
        assert images_equal(src, "qcow2", gdir / "images" / ok, "raw")
        hostile = tmp_path / "hostile.qcow2"
        shutil.copyfile(CORPUS / "qcow-with-backing.qcow2", hostile)
        bad = import_staged(client, hostile, "qcow2")
        task = client.wait_import(bad)
        assert task["message"].startswith("convd: unsafe_image: "), task["message"]
        # the reject is the daemon's, readable by the group, the original bytes kept
        rec = spool / "failed" / f"{bad}.json"
        st = rec.stat()
        assert (pwd.getpwuid(st.st_uid).pw_name, st.st_mode & 0o777) == (CONVD_USER, 0o640)
        assert json.loads(rec.read_text())["error"]["code"] == "unsafe_image"
        # the Glance user took the result away; nobody else may even look
        assert os.listdir(spool / "outgoing") == []
        for d in ("incoming", "outgoing", "failed", "work"):
            peek = run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                       "ls", spool / d, check=False)
            assert peek.returncode != 0, d
    finally:
        glance.stop()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        log.close()


def test_deleting_an_image_while_it_converts_cancels_the_conversion(
        glance_env: Env, tmp_path: Path, slow_convert: None) -> None:
    src = tmp_path / "doomed.qcow2"
    run("qemu-img", "create", "-f", "qcow2", src, str(256 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 5 0 {96 * MiB}", src)  # 48 s at 2 MiB/s
    # Its own Glance, beating every 0.5 s: the plugin notices the deletion at its next heartbeat.
    watched = GlanceServer(tmp_path / "glance", plugins=["convd"],
                           import_conf={"convd": {"spool": glance_env.spool.root, "timeout": 120,
                                                  "poll_interval": 0.5, "heartbeat_interval": 0.5}}).start()
    try:
        client = watched.client()
        image_id = client.create("doomed", "qcow2")
        client.stage(image_id, src)
        client.import_(image_id)
        work = str(glance_env.spool.work / "test" / image_id)
        wait_for(lambda: _converting(work), what="qemu-img convert to start")
        client.request("DELETE", f"/v2/images/{image_id}")
        rec = glance_env.spool.wait_record(image_id, timeout=60)
        assert (rec["status"], rec["error"]["code"]) == ("failed", "cancelled"), rec
        assert "image deleted during its import" in rec["error"]["message"]
        assert not _converting(work)
        assert not (glance_env.spool.outgoing / image_id).exists()
        wait_for(lambda: "the image was deleted during its import" in watched.log(),
                 what="the import to fail saying why")
    finally:
        watched.stop()


def test_import_called_on_another_worker_is_converted_by_the_node_that_staged_it(
        glance_env: Env, tmp_path: Path) -> None:
    """kolla-ansible's layout: staging per node, no shared staging directory.

    Two glance-api workers of one cloud (one database), each with its own
    staging directory and ``worker_self_reference_url``, and beside each a
    convd with its own spool that only that worker's plugin points at.  The
    image is staged on A and its import called on B: Glance forwards the
    import to A, and A's convd converts it; B's staging and spool never see it.
    """
    nodes: dict[str, tuple[Path, Daemon, GlanceServer]] = {}
    try:
        db_url = None
        for n in ("a", "b"):
            root = tmp_path / n
            root.mkdir()
            daemon = Daemon(daemon_config(root))
            glance = GlanceServer(root / "glance", plugins=["convd"], db=glance_env.db, db_url=db_url,
                                  self_reference=True,
                                  import_conf={"convd": {"spool": root / "spool", "timeout": 120,
                                                         "poll_interval": 0.5, "heartbeat_interval": 0.5}})
            nodes[n] = (root, daemon, glance)
            daemon.wait_ready()
            glance.start()
            db_url = glance.db_url
        (root_a, daemon_a, glance_a), (root_b, daemon_b, glance_b) = nodes["a"], nodes["b"]
        src = make_image(tmp_path / "disk.qcow2", "qcow2", VIRTUAL)
        on_a, on_b = glance_a.client(), glance_b.client()
        image_id = on_a.create(src.name, "qcow2")
        on_a.stage(image_id, src)
        assert os.listdir(glance_a.staging) == [image_id] and os.listdir(glance_b.staging) == []

        on_b.import_(image_id)
        task = on_b.wait_import(image_id)

        assert task["status"] == "success", task["message"]
        img = on_b.image(image_id)
        assert (img["status"], img["disk_format"], img["container_format"]) == ("active", "raw", "bare")
        stored = glance_a.images / image_id  # A ran the import: A's file store has it
        assert not (glance_b.images / image_id).exists()
        assert img["size"] == img["virtual_size"] == VIRTUAL == stored.stat().st_size
        assert images_equal(src, "qcow2", stored, "raw")
        assert (img["os_hash_algo"], img["os_hash_value"]) == ("sha512", sha512(stored))
        # B forwarded the request; A's convd converted, B's never saw the image
        assert "Proxying POST request to host" in glance_b.log()
        assert any(e.get("event") == "claimed" and e.get("item") == image_id for e in daemon_a.events())
        assert not any(e.get("item") == image_id for e in daemon_b.events())
        for leaf in ("incoming", "work", "outgoing", "failed"):
            assert not any(image_id in n for n in os.listdir(root_b / "spool" / leaf)), leaf
            assert not any(n.startswith(image_id) for n in os.listdir(root_a / "spool" / leaf)
                           if leaf != "failed"), leaf
        assert os.listdir(glance_a.staging) == os.listdir(glance_b.staging) == []
    finally:
        for _, daemon, glance in nodes.values():
            glance.stop()
            if daemon.proc.poll() is None:
                daemon.stop()


def test_an_import_to_a_store_with_a_configured_layout_gets_that_layout(glance_env: Env, tmp_path: Path) -> None:
    """[convd] target_layout: the plugin asks for the layout the store wants
    (incoming/.convd-layout.NAME), over the daemon's own [target.qcow2]."""
    root = tmp_path / "node"
    root.mkdir()
    daemon = Daemon(daemon_config(root, convert={"target_format": "qcow2"}))
    glance = GlanceServer(root / "glance", plugins=["convd"], db=glance_env.db,
                          import_conf={"convd": {"spool": root / "spool", "timeout": 120, "poll_interval": 0.5,
                                                 "target_layout": "local:qcow2.compression=zstd;"
                                                                  "qcow2.cluster_size=128KiB"}})
    try:
        daemon.wait_ready()
        glance.start()
        client = glance.client()
        src = make_image(tmp_path / "disk.vmdk", "vmdk", VIRTUAL, opts="subformat=monolithicSparse")
        image_id = import_staged(client, src, "vmdk")
        task = client.wait_import(image_id)
        assert task["status"] == "success", task["message"]
        img = client.image(image_id)
        assert (img["status"], img["disk_format"]) == ("active", "qcow2")
        stored = glance.images / image_id
        info = json.loads(run("qemu-img", "info", "-f", "qcow2", "--output=json", stored).stdout)
        assert info["cluster-size"] == 128 * 1024
        assert info["format-specific"]["data"]["compression-type"] == "zstd"
        assert img["virtual_size"] == info["virtual-size"] == VIRTUAL
        assert images_equal(src, "vmdk", stored, "qcow2")
        assert any(e.get("event") == "claimed" and e.get("item") == image_id for e in daemon.events())
    finally:
        glance.stop()
        if daemon.proc.poll() is None:
            daemon.stop()
