"""The daemon as a service: `convd run` subprocesses under a stand-in service
manager (sd_notify), reloaded with SIGHUP, scraped on /metrics, asked with
`convd status`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, Spool, convd_bin, images_equal, make_image, run, wait_for, write_config

MiB = 1 << 20

DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def start_daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonFactory]:
    """``daemon_factory``, also closing the log of a daemon that exited by itself
    (the factory closes only those it kills), which would otherwise surface as
    an unraisable ResourceWarning in some later test."""
    made: list[Daemon] = []

    def start(config: Path, **kw: Any) -> Daemon:
        daemon = daemon_factory(config, **kw)
        made.append(daemon)
        return daemon

    yield start
    for daemon in made:
        if daemon.proc.poll() is not None:
            daemon.stop()


# --- a stand-in service manager ------------------------------------------


class ServiceManager:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def receive(self) -> list[dict[str, str]]:
        """All messages so far, each as its ``KEY=value`` assignments."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.partition("=")[::2] for line in data.decode().splitlines()))

    def wait(self, pred: Callable[[dict[str, str]], bool], *, after: int = 0,
             timeout: float = 30.0, what: str = "") -> int:
        """Index of the first message from ``after`` on that satisfies ``pred``."""

        def found() -> list[int]:
            return [i for i, msg in enumerate(self.receive()) if i >= after and pred(msg)][:1]

        return int(wait_for(found, timeout, what=what or "a notify message")[0])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServiceManager]:
    # The watchdog is meant for the daemon whatever pid it gets: as systemd
    # does for the main process, name no WATCHDOG_PID.
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    manager = ServiceManager(tmp_path / "notify")
    yield manager
    manager.close()


SUMMARY = re.compile(r"^\d+ queued, \d+ converting, \d+ done, \d+ failed$")


def test_daemon_reports_ready_status_watchdog_reload_and_stop_to_the_service_manager(
    tmp_path: Path, start_daemon: DaemonFactory, service_manager: ServiceManager
) -> None:
    config = write_config(tmp_path)
    env = {"NOTIFY_SOCKET": str(service_manager.path), "WATCHDOG_USEC": "2000000"}
    daemon = start_daemon(config, env=env)

    ready = service_manager.wait(lambda m: m.get("READY") == "1", what="READY=1")
    service_manager.wait(lambda m: SUMMARY.match(m.get("STATUS", "")) is not None, what="a STATUS= summary")
    # Pings keep coming, not just one at start-up.
    first_ping = service_manager.wait(lambda m: m.get("WATCHDOG") == "1", after=ready, what="WATCHDOG=1")
    service_manager.wait(lambda m: m.get("WATCHDOG") == "1", after=first_ping + 1, what="a second WATCHDOG=1")

    seen = len(service_manager.receive())
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.signal(signal.SIGHUP)
    reloading = service_manager.wait(lambda m: m.get("RELOADING") == "1", after=seen, what="RELOADING=1")
    # systemd matches the reload by this timestamp: it must be taken at the reload.
    assert int(service_manager.messages[reloading]["MONOTONIC_USEC"]) >= before_usec
    service_manager.wait(lambda m: m.get("READY") == "1", after=reloading + 1, what="READY=1 after the reload")
    assert daemon.proc.poll() is None

    seen = len(service_manager.receive())
    assert daemon.stop(timeout=30) == 0, daemon.log()[-3000:]
    service_manager.wait(lambda m: m.get("STOPPING") == "1", after=seen, what="STOPPING=1")


# --- reload --------------------------------------------------------------


def _events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event", "").startswith(event)]


def test_reload_refuses_a_bad_config_and_keeps_converting_with_the_old_one(
    tmp_path: Path, start_daemon: DaemonFactory, spool: Spool
) -> None:
    config = write_config(tmp_path)
    daemon = start_daemon(config)
    # Would switch to qcow2 if the file were taken, but the unknown key spoils it.
    write_config(tmp_path, convert={"target_format": "qcow2", "no_such_key": 1})
    daemon.signal(signal.SIGHUP)

    refused = wait_for(lambda: _events(daemon, "reload refused"), 30, what="the reload to be refused")
    assert refused[0]["level"] == "error"
    assert "no_such_key" in refused[0]["error"]
    assert daemon.proc.poll() is None

    source = make_image(tmp_path / "disk.qcow2", "qcow2", 4 * MiB)
    rec = spool.wait_record(spool.drop(source))
    assert rec["status"] == "converted"
    assert rec["target"]["format"] == "raw"
    assert images_equal(source, "qcow2", spool.outgoing / "disk.qcow2", "raw")
    assert daemon.stop(timeout=30) == 0


def test_reload_with_a_new_target_format_converts_the_next_image_to_it(
    tmp_path: Path, start_daemon: DaemonFactory, spool: Spool
) -> None:
    config = write_config(tmp_path)
    daemon = start_daemon(config)
    before = make_image(tmp_path / "before.qcow2", "qcow2", 4 * MiB, seed=1)
    assert spool.wait_record(spool.drop(before))["target"]["format"] == "raw"

    write_config(tmp_path, convert={"target_format": "qcow2"})
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: _events(daemon, "reloaded"), 30, what="the reload")

    # Not qcow2 itself, which would be published as a passthrough.
    after = make_image(tmp_path / "after.vmdk", "vmdk", 4 * MiB, seed=2)
    rec = spool.wait_record(spool.drop(after))
    assert rec["status"] == "converted"
    assert rec["target"]["format"] == "qcow2"
    published = spool.outgoing / "after.vmdk"
    # Probed, not named: our own output, and the check must not presume the answer.
    info = json.loads(run("qemu-img", "info", "--output=json", published).stdout)
    assert info["format"] == "qcow2"
    assert images_equal(after, "vmdk", published, "qcow2")
    assert daemon.stop(timeout=30) == 0


# --- metrics -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_converted_images_and_show_queue_and_workspace(
    tmp_path: Path, start_daemon: DaemonFactory, spool: Spool
) -> None:
    port = _free_port()
    config = write_config(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    daemon = start_daemon(config)

    samples = _scrape(port)
    assert _value(samples, "convd_images_total", status="converted") in (None, 0.0)

    names = [spool.drop(make_image(tmp_path / f"disk{i}.qcow2", "qcow2", 4 * MiB, seed=i)) for i in range(3)]
    for name in names:
        assert spool.wait_record(name)["status"] == "converted"

    # The counter moves just after the record lands; give it a moment.
    def converted_three() -> Samples | None:
        s = _scrape(port)
        return s if _value(s, "convd_images_total", status="converted") == 3.0 else None

    samples = wait_for(converted_three, 30, interval=0.5, what='convd_images_total{status="converted"} 3.0')
    assert _value(samples, "convd_images_total", status="failed") in (None, 0.0)
    build_info = [v for (name, _), v in samples.items() if name == "convd_build_info"]
    assert build_info == [1.0]

    # Gauges are refreshed every second; once idle, nothing is queued or reserved.
    def idle() -> bool:
        s = _scrape(port)
        return _value(s, "convd_queue_depth") == 0.0 and _value(s, "convd_workspace_reserved_bytes") == 0.0

    wait_for(idle, 30, interval=0.5, what="an empty queue and no reserved workspace")
    assert daemon.stop(timeout=30) == 0


def test_run_exits_1_naming_metrics_listen_when_the_port_is_taken(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
        daemon = start_daemon(config, ready=False)
        assert daemon.proc.wait(timeout=60) == 1
    # The line on stderr, where an operator starting it by hand looks.
    assert any(line.startswith("convd: [metrics] listen") for line in daemon.log().splitlines()), daemon.log()
    assert not _events(daemon, "watching")


# --- convd status --------------------------------------------------------


def _status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(convd_bin(), "status", "-c", config, *extra, check=False, timeout=60)


def _status_json(config: Path) -> dict[str, Any]:
    result = _status(config, "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def _records(directory: Path) -> int:
    return sum(1 for p in directory.iterdir() if p.name.endswith(".json") and not p.name.startswith("."))


def test_status_shows_the_running_daemon_spool_and_counters(
    tmp_path: Path, start_daemon: DaemonFactory, spool: Spool
) -> None:
    config = write_config(tmp_path)
    daemon = start_daemon(config)
    backed = tmp_path / "backed.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", "/etc/hosts", backed, "1M")
    names = [spool.drop(make_image(tmp_path / f"disk{i}.qcow2", "qcow2", 4 * MiB, seed=i)) for i in range(2)]
    names.append(spool.drop(backed))
    records = {name: spool.wait_record(name) for name in names}
    assert records["backed.qcow2"]["error"]["code"] == "unsafe_image"

    # The daemon refreshes its snapshot every second: wait for it to catch up.
    def counted() -> dict[str, Any] | None:
        st = _status_json(config)
        done = st["daemon"] and st["daemon"]["counters"]["converted"] + st["daemon"]["counters"]["failed"]
        return st if done == 3 else None

    st = wait_for(counted, 30, interval=0.5, what="status to count the finished images")
    assert st["running"] is True
    assert st["daemon"]["pid"] == daemon.proc.pid
    assert st["daemon"]["counters"] == {"converted": 2, "passthrough": 0, "failed": 1}
    assert st["spool"] == {"root": str(spool.root), "incoming": 0,
                           "outgoing": _records(spool.outgoing), "failed": _records(spool.failed)}
    assert (st["spool"]["outgoing"], st["spool"]["failed"]) == (2, 1)

    human = _status(config)
    assert human.returncode == 0, human.stderr
    assert str(spool.root) in human.stdout
    assert f"pid {daemon.proc.pid}" in human.stdout

    assert daemon.stop(timeout=30) == 0
    st = _status_json(config)
    assert st["running"] is False
    assert (st["spool"]["outgoing"], st["spool"]["failed"]) == (2, 1)
    assert "not running" in _status(config).stdout


# --- producers writing in place --------------------------------------------


def _write_chunk(path: Path, data: bytes, offset: int) -> None:
    """One chunk the way a producer appending in a loop writes it: open, write, close."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_daemon_survives_a_producer_reopening_its_file_in_incoming(
    tmp_path: Path, start_daemon: DaemonFactory, spool: Spool
) -> None:
    # A long settle: the file must stay in incoming/ for the whole test.
    config = write_config(tmp_path, watch={"settle": 60})
    spool.incoming.mkdir(parents=True)
    content = bytearray(os.urandom(MiB))
    target = spool.incoming / "disk.raw"
    target.write_bytes(content)
    daemon = start_daemon(config)

    # Every open for writing may land while the daemon holds its probe lease.
    deadline = time.monotonic() + 8
    chunk = 0
    while daemon.proc.poll() is None and time.monotonic() < deadline:
        offset = (chunk % (MiB // 4096)) * 4096
        data = os.urandom(4096)
        try:
            _write_chunk(target, data, offset)
        except FileNotFoundError:
            pytest.fail("incoming/disk.raw was taken while its producer was still writing it")
        content[offset:offset + 4096] = data
        chunk += 1

    assert daemon.proc.poll() is None, daemon.log()[-3000:]
    assert daemon.stop(timeout=30) == 0
    assert target.read_bytes() == bytes(content)


def test_file_closed_and_reopened_by_its_producer_is_taken_whole_after_it_settles(
    tmp_path: Path, start_daemon: DaemonFactory, spool: Spool
) -> None:
    config = write_config(tmp_path, watch={"settle": 10})
    daemon = start_daemon(config)
    first, second = os.urandom(MiB), os.urandom(MiB)
    target = spool.incoming / "disk.raw"
    # `cat part1 > f; sleep 2; cat part2 >> f`: closed in between, still being
    # written, and still for much less than settle.
    with open(target, "ab") as fh:
        fh.write(first)
    time.sleep(2)
    with open(target, "ab") as fh:
        fh.write(second)

    rec = spool.wait_record("disk.raw")
    assert rec["status"] == "passthrough"
    assert rec["source"]["size"] == 2 * MiB
    assert (spool.outgoing / "disk.raw").read_bytes() == first + second
    assert daemon.stop(timeout=30) == 0
