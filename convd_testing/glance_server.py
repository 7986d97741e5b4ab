"""A real glance-api (Glance 33.0.0 under uWSGI) for tests and the benchmark, and a small REST client.

Glance runs from its own virtualenv (``make glance-venv``: ``.glance-venv``),
on MariaDB (Debian's ``mariadb-server``, a private server per test session or
bench run: data directory and socket in a temp dir, no network) as deployments
run it, file stores and no Keystone: the ``context`` middleware trusts
``X-Identity-Status``/``X-Roles``/``X-Project-Id``/``X-User-Id`` headers, as
Glance's own functional tests do.  The recipe is ``shared/glance/recipe.md``.

Every process started here is in its own process group and registered with
:func:`reap`, which atexit and the signal handlers of :func:`stop_on_signals`
run: an interrupted test run or bench leaves nothing behind.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["GLANCE_VENV", "TOKEN", "GlanceClient", "GlanceServer", "MariaDB", "free_port", "glance_venv_problem",
           "mariadb_problem", "portable_venv", "reachable_convd", "reap", "stop_on_signals", "track", "untrack"]

REPO = Path(__file__).resolve().parent.parent
GLANCE_VENV = Path(os.environ.get("CONVD_GLANCE_VENV", REPO / ".glance-venv"))

AUTH = {
    "X-Identity-Status": "Confirmed",
    "X-Roles": "admin,member,reader",
    "X-Project-Id": "convd-tests",
    "X-User-Id": "tester",
}


def glance_venv_problem() -> str | None:
    """Why Glance cannot run here, or None."""
    if not (GLANCE_VENV / ".installed").exists():
        return f"no Glance virtualenv at {GLANCE_VENV} (make glance-venv builds it)"
    return None


def mariadb_problem() -> str | None:
    """Why a private MariaDB cannot run here, or None."""
    missing = [t for t in ("mariadb-install-db", "mariadbd", "mariadb") if shutil.which(t, path=_SBIN_PATH) is None]
    if missing:
        return f"{', '.join(missing)} not found (make glance-venv installs Debian's mariadb-server)"
    return None


# -- nothing left running -----------------------------------------------------------

_TRACKED: dict[int, tuple[subprocess.Popen[bytes], list[Path]]] = {}


def track(proc: subprocess.Popen[bytes], *scratch: Path) -> None:
    """Register ``proc`` (the leader of its own process group) and its scratch
    directories with :func:`reap`."""
    _TRACKED[proc.pid] = (proc, list(scratch))


def untrack(proc: subprocess.Popen[bytes]) -> None:
    _TRACKED.pop(proc.pid, None)


def reap() -> None:
    """Kill every tracked process group still running (SIGTERM, then SIGKILL
    after 5 s) and remove the scratch directories registered with them."""
    procs = list(_TRACKED.values())
    _TRACKED.clear()
    for proc, _ in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    for proc, scratch in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group too
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)


atexit.register(reap)


_INTERRUPT = False


def _exit_on(signum: int, frame: FrameType | None) -> None:
    # Unwinds through every finally and fixture teardown; reap() at exit
    # catches what those did not stop.  Further SIGTERMs would cut that short.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if _INTERRUPT or signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def stop_on_signals(interrupt: bool = False) -> None:
    """SIGTERM and SIGHUP (and SIGINT, as Python does) unwind the program
    instead of killing it, so that cleanup code and :func:`reap` run.  They
    raise SystemExit, or KeyboardInterrupt when ``interrupt`` (pytest ends a
    session on that, with its fixtures' teardown; a SystemExit would only
    fail the test that was running)."""
    global _INTERRUPT
    _INTERRUPT = interrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on)


def portable_venv(dest: Path, venv: Path = GLANCE_VENV) -> Path:
    """A copy of ``venv`` at ``dest`` that runs wherever the checkout lives.

    The Glance venv holds convd as an editable install (a finder pointing
    into the checkout) and scripts whose ``#!`` names the venv's path; a user
    who cannot enter the checkout (root's home is mode 700) can run neither.
    The copy hard-links the venv's files where it can (fast, no new bytes),
    rewrites the scripts in new files, and replaces the editable finder by a
    copy of the ``convd`` package.  ``dest``'s parent must be reachable by
    the users who run it.
    """
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(venv, dest, symlinks=True, copy_function=link_or_copy)
    # the venv's path as pip wrote it into the scripts: as given, or through symlinks
    olds = sorted({str(venv.absolute()).encode(), str(venv.resolve()).encode()}, key=len, reverse=True)
    for script in (dest / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        old = next((o for o in olds if data.startswith(b"#!" + o + b"/")), None)
        if old is not None:
            mode = script.stat().st_mode
            script.unlink()  # a new file: the original is hard-linked
            script.write_bytes(data.replace(old, str(dest.absolute()).encode()))
            script.chmod(mode)
    site = next((dest / "lib").glob("python3*/site-packages"))
    for editable in site.glob("__editable__*convd*"):
        editable.unlink()
    shutil.copytree(REPO / "convd", site / "convd", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


_REACHABLE: Path | None = None


def reachable_convd() -> Path:
    """A ``convd`` that another user can run wherever the checkout lives.

    One :func:`portable_venv` of the Glance venv per test session, under a
    mode-755 directory in /tmp, removed at exit.  Tests that run the daemon
    or a producer as another user take it from here.
    """
    global _REACHABLE
    if _REACHABLE is None:
        base = Path(tempfile.mkdtemp(prefix="convd-venv-", dir="/tmp"))
        base.chmod(0o755)
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        _REACHABLE = portable_venv(base / "venv") / "bin" / "convd"
    return _REACHABLE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PASTE = """\
[composite:glance-api-noauth]
paste.composite_factory = glance.api:root_app_factory
/: api
/healthcheck: healthcheck

[composite:api]
paste.composite_factory = glance.api:pipeline_factory
noauth = versionnegotiation context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = {d}/healthcheck_disable

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory
"""


_SBIN_PATH = f"{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/local/sbin:/usr/sbin:/sbin"
_DB_NAMES = itertools.count()


class MariaDB:
    """A private ``mariadbd`` (Debian's ``mariadb-server``) with its data directory
    in ``directory`` and a unix socket only (``--skip-networking``).

    Run as the calling user (``--user`` names it, so root works too).  Glance
    connects as the SQL user ``glance`` with a password, as a deployer sets it
    up, through :meth:`url` (one database per Glance).
    """

    SQL_USER, SQL_PASSWORD = "glance", "glance-test"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.data = directory / "data"
        self._scratch: list[Path] = []
        sock = directory / "mysqld.sock"
        if len(str(sock)) > 100:  # sun_path holds 108 bytes; pytest's temp paths can be longer
            short = Path(tempfile.mkdtemp(prefix="convd-mariadb-"))
            short.chmod(0o755)  # Glance may run as another user
            self._scratch.append(short)
            sock = short / "mysqld.sock"
        self.socket = sock
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> MariaDB:
        problem = mariadb_problem()
        if problem:
            raise RuntimeError(problem)
        self.dir.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.geteuid()).pw_name
        tool = shutil.which("mariadb-install-db", path=_SBIN_PATH)
        done = subprocess.run([str(tool), "--no-defaults", f"--datadir={self.data}", f"--user={user}",
                               "--auth-root-authentication-method=socket", "--skip-test-db"],
                              capture_output=True, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {done.stdout[-2000:]!r} {done.stderr[-2000:]!r}")
        out = open(self.dir / "mariadbd.out", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [str(shutil.which("mariadbd", path=_SBIN_PATH)), "--no-defaults", f"--datadir={self.data}",
             f"--user={user}", f"--socket={self.socket}", "--skip-networking",
             f"--pid-file={self.dir / 'mariadbd.pid'}", f"--log-error={self.dir / 'mariadbd.err'}",
             f"--tmpdir={self.dir}", "--skip-name-resolve",
             # READ COMMITTED: at MySQL's default REPEATABLE READ,
             # Glance 33's image_set_property_atomic (db/sqlalchemy/api.py: an
             # UPDATE of a missing row, then an INSERT, not retried) takes gap
             # locks, and imports started at the same moment deadlock each other
             # (InnoDB error 1213, HTTP 500 on POST /import) before any plugin runs.
             "--transaction-isolation=READ-COMMITTED",
             # a test database: small, and no fsync per commit
             "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=32M",
             "--innodb-flush-log-at-trx-commit=2", "--max-connections=200"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
            start_new_session=True)
        out.close()
        track(self.proc, *self._scratch)
        deadline = time.monotonic() + timeout
        while self.sql("SELECT 1", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.log()[-3000:]
                self.stop()
                raise RuntimeError(f"mariadbd did not come up:\n{err}")
            time.sleep(0.1)
        self.sql(f"CREATE USER '{self.SQL_USER}'@'localhost' IDENTIFIED BY '{self.SQL_PASSWORD}'; "
                 f"GRANT ALL PRIVILEGES ON *.* TO '{self.SQL_USER}'@'localhost'")
        return self

    def sql(self, statements: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``statements`` as the server's root account (socket authentication)."""
        tool = shutil.which("mariadb", path=_SBIN_PATH)
        done = subprocess.run([str(tool), "--no-defaults", f"--socket={self.socket}", "-u",
                               pwd.getpwuid(os.geteuid()).pw_name, "-e", statements],
                              capture_output=True, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"mariadb: {statements}: {done.stderr.decode(errors='replace')}")
        return done

    def new_database(self, prefix: str = "glance") -> str:
        """A new empty database; its SQLAlchemy URL for Glance (PyMySQL, the socket)."""
        name = f"{prefix}_{os.getpid()}_{next(_DB_NAMES)}"
        self.sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
        return (f"mysql+pymysql://{self.SQL_USER}:{self.SQL_PASSWORD}@localhost/{name}"
                f"?unix_socket={self.socket}&charset=utf8mb4")

    def log(self) -> str:
        try:
            return (self.dir / "mariadbd.err").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean InnoDB shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        untrack(self.proc)
        for d in self._scratch:
            shutil.rmtree(d, ignore_errors=True)
        self.proc = None


class GlanceServer:
    """glance-api in ``directory`` on a free loopback port; stopped by its master's pid.

    ``plugins`` is ``image_import_plugins``; ``import_conf`` adds sections to
    glance-image-import.conf (e.g. ``{"convd": {"spool": ..., "timeout": 5}}``);
    ``user`` runs it as that user (the directory must be theirs).  Its database
    is a new one on ``db``, or on a MariaDB of its own in ``directory/mariadb``
    (started and stopped with it) when ``db`` is None, or ``db_url``'s (another
    GlanceServer's: two glance-api workers of one cloud).

    ``self_reference`` sets ``worker_self_reference_url`` to this worker's URL, as
    kolla-ansible does: Glance records the worker that staged an image and
    forwards a glance-direct import arriving elsewhere to it, with the caller's
    token.  Keystone cannot be had here, so the pipeline then starts with
    :data:`TOKEN_FILTER`, a stand-in for keystonemiddleware that turns the one
    token :data:`TOKEN` into the trusted identity headers and refuses the rest.
    """

    def __init__(self, directory: Path, *, plugins: list[str], import_conf: dict[str, dict[str, Any]] | None = None,
                 web_port: int | None = None, user: str | None = None, venv: Path = GLANCE_VENV,
                 db: MariaDB | None = None, db_url: str | None = None, self_reference: bool = False) -> None:
        self.dir = directory
        self.db = db
        self._own_db: MariaDB | None = None
        self._shared_db_url = db_url
        self.db_url = ""
        self.self_reference = self_reference
        self.venv = venv
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.plugins = plugins
        self.import_conf = import_conf or {}
        self.web_port = web_port
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None
        self.images = directory / "images"
        self.staging = directory / "staging"
        self.log_file = directory / "glance-api.log"

    def _write_config(self) -> None:
        d = self.dir
        etc = d / "etc"
        for sub in ("etc", "images", "staging", "tasks", "locks"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        ports = sorted({80, 443} | ({self.web_port} if self.web_port else set()))
        forwarding = ""
        if self.self_reference:
            forwarding = f"worker_self_reference_url = {self.url}\n"
        (etc / "glance-api.conf").write_text(f"""\
[DEFAULT]
debug = true
{forwarding}log_file = {self.log_file}
enabled_backends = local:file
enabled_import_methods = [glance-direct,web-download]

[database]
connection = {self.db_url}

[glance_store]
default_backend = local

[local]
filesystem_store_datadir = {self.images}/

[os_glance_staging_store]
filesystem_store_datadir = {self.staging}/

[os_glance_tasks_store]
filesystem_store_datadir = {d}/tasks/

[paste_deploy]
flavor = noauth
config_file = {etc}/glance-api-paste.ini

[oslo_concurrency]
lock_path = {d}/locks

[wsgi]
python_interpreter = {self.venv}/bin/python3

[import_filtering_opts]
allowed_hosts = [127.0.0.1]
allowed_ports = [{",".join(str(p) for p in ports)}]
""")
        paste = PASTE.format(d=d)
        if self.self_reference:
            # Glance's forwarding asks keystoneauth for a session against
            # [keystone_authtoken] auth_url; the URL it calls is the stage host's.
            with open(etc / "glance-api.conf", "a") as fh:
                fh.write("\n[keystone_authtoken]\nauth_url = http://127.0.0.1:9/identity\n")
            (etc / "convd_test_token.py").write_text(TOKEN_FILTER)
            paste = paste.replace("noauth = versionnegotiation context rootapp",
                                  "noauth = versionnegotiation tokenidentity context rootapp")
            paste += ("\n[filter:tokenidentity]\npaste.filter_factory = convd_test_token:filter_factory\n"
                      f"token = {TOKEN}\n")
        (etc / "glance-api-paste.ini").write_text(paste)
        lines = ["[image_import_opts]", f"image_import_plugins = {self.plugins!r}", ""]
        for section, body in self.import_conf.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {v}" for k, v in body.items()]
            lines.append("")
        (etc / "glance-image-import.conf").write_text("\n".join(lines))
        (etc / "uwsgi.ini").write_text(f"""\
[uwsgi]
http-socket = 127.0.0.1:{self.port}
module = glance.wsgi.api:application
need-app = true
master = true
processes = 1
threads = 8
enable-threads = true
lazy-apps = true
die-on-term = true
buffer-size = 65535
add-header = Connection: close
http-auto-chunked = true
http-raw-body = true
chunked-input-limit = 10485760
pidfile = {d}/uwsgi.pid
pythonpath = {etc}
""")

    def _chown(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.dir):
            if self._own_db is not None:  # the database server's files stay its own
                dirnames[:] = [n for n in dirnames if Path(dirpath, n) != self._own_db.dir]
            for n in [*dirnames, *filenames]:
                shutil.chown(os.path.join(dirpath, n), self.user, self.user)

    def _as_user(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "--", *argv]

    def start(self, timeout: float = 60.0) -> GlanceServer:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> GlanceServer:
        if self._shared_db_url is not None:
            self.db_url = self._shared_db_url
        else:
            db = self.db
            if db is None:
                db = self._own_db = MariaDB(self.dir / "mariadb").start()
            self.db_url = db.new_database()
        self._write_config()
        if self.user is not None:
            self._chown()
        env = {**os.environ, "OS_GLANCE_CONFIG_DIR": str(self.dir / "etc"),
               "PATH": f"{self.venv}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        env.pop("VIRTUAL_ENV", None)
        if self.user is not None:
            env["HOME"] = str(self.dir)
            env["PATH"] = f"{self.venv}/bin:/usr/local/bin:/usr/bin:/bin"
        # as a deployer runs it, against the empty database
        sync = subprocess.run(self._as_user([str(self.venv / "bin" / "glance-manage"), "--config-file",
                                             str(self.dir / "etc" / "glance-api.conf"), "db_sync"]),
                              capture_output=True, env=env, cwd=self.dir)
        if sync.returncode != 0:
            raise RuntimeError(f"glance-manage db_sync failed: {sync.stderr[-3000:].decode(errors='replace')}")
        out = open(self.dir / "uwsgi.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(self._as_user([str(self.venv / "bin" / "uwsgi"), "--ini",
                                                    str(self.dir / "etc" / "uwsgi.ini")]),
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.dir, start_new_session=True)
        out.close()
        track(self.proc)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "uwsgi.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"glance-api did not come up:\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # die-on-term: master and worker exit
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            untrack(self.proc)
            self.proc = None
        if self._own_db is not None:
            self._own_db.stop()
            self._own_db = None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self) -> GlanceClient:
        return GlanceClient(self.url, TOKEN if self.self_reference else None)


TOKEN = "convd-test-token"

# A paste filter in the glance-api's pythonpath (GlanceServer(self_reference=True)):
# keystonemiddleware's part for one fixed token, since Keystone is not here.  It
# drops the identity headers a caller sent and sets them from the token, as
# auth_token does, so a forwarded import proves the token travelled.
TOKEN_FILTER = f'''\
"""keystonemiddleware's part for the one test token {TOKEN!r} (convd's tests)."""

from oslo_config import cfg

IDENTITY = {{k.upper().replace("-", "_"): v for k, v in {{
    "X-Identity-Status": "Confirmed", "X-Roles": "admin,member,reader",
    "X-Project-Id": "convd-tests", "X-User-Id": "tester"}}.items()}}


def filter_factory(global_conf, token):
    # glance.context reads it; keystonemiddleware's password plugin would register it
    try:
        cfg.CONF.register_opt(cfg.StrOpt("auth_url"), group="keystone_authtoken")
    except cfg.DuplicateOptError:
        pass

    def factory(app):
        def middleware(environ, start_response):
            for key in IDENTITY:
                environ.pop("HTTP_" + key, None)
            if environ.get("HTTP_X_AUTH_TOKEN") == token:
                environ.update({{"HTTP_" + k: v for k, v in IDENTITY.items()}})
            return app(environ, start_response)
        return middleware
    return factory
'''


class GlanceClient:
    """Glance's v2 REST API over urllib, with the trusted-header identity (and
    ``token`` as X-Auth-Token, for a Glance that checks one)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.token = token
        # Each image's import tasks in the order this client started them.  Not
        # by created_at: MySQL keeps it to the second, and a quick failed
        # import and the next one often share a second.
        self._imports: dict[str, list[str]] = {}

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None, expect: tuple[int, ...] = (200, 201, 202, 204),
                timeout: float = 30.0) -> Any:
        headers = dict(AUTH)
        if self.token:
            headers["X-Auth-Token"] = self.token
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        if status not in expect:
            raise AssertionError(f"{method} {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data) if data else None

    def create(self, name: str, disk_format: str, container_format: str = "bare") -> str:
        body = json.dumps({"name": name, "disk_format": disk_format, "container_format": container_format})
        return str(self.request("POST", "/v2/images", body.encode(), "application/json")["id"])

    def stage(self, image_id: str, path: Path) -> None:
        # Glance answers once it has written the whole upload to staging: for the
        # bench's GiB-sized images on a busy disk that can take minutes.
        with open(path, "rb") as fh:
            self.request("PUT", f"/v2/images/{image_id}/stage", fh.read(), "application/octet-stream",
                         timeout=600)

    def import_(self, image_id: str, method: str = "glance-direct", uri: str | None = None) -> None:
        m: dict[str, Any] = {"name": method}
        if uri:
            m["uri"] = uri
        before = {t["id"] for t in self.tasks(image_id)}
        self.request("POST", f"/v2/images/{image_id}/import", json.dumps({"method": m}).encode(),
                     "application/json")
        # Glance creates the task before it answers 202
        new = [t["id"] for t in self.tasks(image_id) if t["id"] not in before]
        assert len(new) == 1, f"POST /v2/images/{image_id}/import made {len(new)} tasks"
        self._imports.setdefault(image_id, []).append(new[0])

    def image(self, image_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v2/images/{image_id}"))

    def tasks(self, image_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/v2/images/{image_id}/tasks")["tasks"])

    def patch(self, image_id: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/v2/images/{image_id}", json.dumps(ops).encode(),
                                 "application/openstack-images-v2.1-json-patch"))

    def wait_import(self, image_id: str, ntasks: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        """The ``ntasks``-th import task this client started on the image, once it has
        finished (and its lock is gone)."""
        task_id = self._imports[image_id][ntasks - 1]
        deadline = time.monotonic() + timeout
        while True:
            tasks = self.tasks(image_id)
            task = next(t for t in tasks if t["id"] == task_id)
            if task["status"] in ("success", "failure") and not self.image(image_id).get("os_glance_import_task"):
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"import of {image_id} did not finish in {timeout}s: {tasks}")
            time.sleep(0.2)
