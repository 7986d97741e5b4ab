"""A real glance-api (Glance 33.0.0 under uWSGI) for tests and the benchmark, and a small REST client.

Glance runs from its own virtualenv (``make glance-venv``: ``.glance-venv``),
with SQLite, file stores and no Keystone: the ``context`` middleware trusts
``X-Identity-Status``/``X-Roles``/``X-Project-Id``/``X-User-Id`` headers, as
Glance's own functional tests do.  The recipe is ``shared/glance/recipe.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["GLANCE_VENV", "GlanceClient", "GlanceServer", "free_port", "glance_venv_problem"]

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


class GlanceServer:
    """glance-api in ``directory`` on a free loopback port; stopped by its master's pid.

    ``plugins`` is ``image_import_plugins``; ``import_conf`` adds sections to
    glance-image-import.conf (e.g. ``{"convd": {"spool": ..., "timeout": 5}}``);
    ``user`` runs it as that user (the directory must be theirs).
    """

    def __init__(self, directory: Path, *, plugins: list[str], import_conf: dict[str, dict[str, Any]] | None = None,
                 web_port: int | None = None, user: str | None = None, venv: Path = GLANCE_VENV) -> None:
        self.dir = directory
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
        (etc / "glance-api.conf").write_text(f"""\
[DEFAULT]
debug = true
log_file = {self.log_file}
enabled_backends = local:file
enabled_import_methods = [glance-direct,web-download]

[database]
# SQLite stands in for MySQL.  Not in WAL mode: Glance reads, then writes in
# one transaction, which WAL fails at once (SQLITE_BUSY_SNAPSHOT) whenever
# another thread committed in between; the rollback journal waits instead.
connection = sqlite:///{d}/glance.sqlite

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
        (etc / "glance-api-paste.ini").write_text(PASTE.format(d=d))
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
""")

    def _chown(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.dir):
            for n in [*dirnames, *filenames]:
                shutil.chown(os.path.join(dirpath, n), self.user, self.user)

    def _as_user(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "--", *argv]

    def start(self, timeout: float = 60.0) -> GlanceServer:
        self._write_config()
        if self.user is not None:
            self._chown()
        env = {**os.environ, "OS_GLANCE_CONFIG_DIR": str(self.dir / "etc"),
               "PATH": f"{self.venv}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        env.pop("VIRTUAL_ENV", None)
        if self.user is not None:
            env["HOME"] = str(self.dir)
            env["PATH"] = f"{self.venv}/bin:/usr/local/bin:/usr/bin:/bin"
        subprocess.run(self._as_user([str(self.venv / "bin" / "glance-manage"), "--config-file",
                                      str(self.dir / "etc" / "glance-api.conf"), "db_sync"]),
                       check=True, capture_output=True, env=env, cwd=self.dir)
        out = open(self.dir / "uwsgi.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(self._as_user([str(self.venv / "bin" / "uwsgi"), "--ini",
                                                    str(self.dir / "etc" / "uwsgi.ini")]),
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.dir, start_new_session=True)
        out.close()
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
                self.stop()
                raise RuntimeError(f"glance-api did not come up:\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # die-on-term: master and worker exit
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self) -> GlanceClient:
        return GlanceClient(self.url)


class GlanceClient:
    """Glance's v2 REST API over urllib, with the trusted-header identity."""

    def __init__(self, url: str) -> None:
        self.url = url

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None, expect: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        headers = dict(AUTH)
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        for attempt in range(3):
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    status, data = r.status, r.read()
                break
            except urllib.error.HTTPError as exc:
                status, data = exc.code, exc.read()
                break
            except TimeoutError:
                # glance-api under SQLite has been seen to stall a request while
                # its import threads contend for the database; reads are safe to repeat.
                if method != "GET" or attempt == 2:
                    raise
        if status not in expect:
            raise AssertionError(f"{method} {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data) if data else None

    def create(self, name: str, disk_format: str, container_format: str = "bare") -> str:
        body = json.dumps({"name": name, "disk_format": disk_format, "container_format": container_format})
        return str(self.request("POST", "/v2/images", body.encode(), "application/json")["id"])

    def stage(self, image_id: str, path: Path) -> None:
        with open(path, "rb") as fh:
            self.request("PUT", f"/v2/images/{image_id}/stage", fh.read(), "application/octet-stream")

    def import_(self, image_id: str, method: str = "glance-direct", uri: str | None = None) -> None:
        m: dict[str, Any] = {"name": method}
        if uri:
            m["uri"] = uri
        self.request("POST", f"/v2/images/{image_id}/import", json.dumps({"method": m}).encode(),
                     "application/json")

    def image(self, image_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v2/images/{image_id}"))

    def tasks(self, image_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/v2/images/{image_id}/tasks")["tasks"])

    def patch(self, image_id: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/v2/images/{image_id}", json.dumps(ops).encode(),
                                 "application/openstack-images-v2.1-json-patch"))

    def wait_import(self, image_id: str, ntasks: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        """The ``ntasks``-th import task of the image once it has finished (and its lock is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            tasks = sorted(self.tasks(image_id), key=lambda t: t["created_at"])
            if (len(tasks) >= ntasks and tasks[ntasks - 1]["status"] in ("success", "failure")
                    and not self.image(image_id).get("os_glance_import_task")):
                return tasks[ntasks - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"import of {image_id} did not finish in {timeout}s: {tasks}")
            time.sleep(0.2)
