"""A ``convd run`` subprocess on a spool of its own, fed by the producer protocol."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.inotify import DirWatch

__all__ = ["Daemon", "Spool", "convd_bin", "parse_ts", "stage_private", "write_config"]


def convd_bin() -> str:
    exe = Path(sys.executable).with_name("convd")
    found = str(exe) if exe.exists() else shutil.which("convd")
    if not found:
        raise SystemExit("convd is not installed in this environment; run `make setup` first")
    return found


def parse_ts(value: str) -> float:
    """structlog's ISO UTC timestamp as seconds since the epoch."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_config(root: Path, *, target: str, algorithms: Iterable[str], max_workers: int = 2,
                 **extra: dict[str, Any]) -> Path:
    """The config the bench runs convd with: its own spool under ``root``, JSON logs, no metrics."""
    sections: dict[str, dict[str, Any]] = {
        "spool": {"root": str(root), "instance": "bench"},
        "convert": {"max_workers": max_workers, "target_format": target},
        "limits": {"workspace": "64GiB", "min_free": "1GiB"},
        "watch": {"settle": 2.0},
        "checksum": {"algorithms": list(algorithms)},
        "log": {"format": "json", "level": "info"},
        "metrics": {"listen": ""},
    }
    for name, body in extra.items():
        sections.setdefault(name, {}).update(body)
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items()) + "\n"
                   for name, body in sections.items())
    path = root / "convd.toml"
    path.write_text(text)
    return path


def stage_private(src: Path, staged: Path) -> Path:
    """A private copy of ``src`` at ``staged``, flushed like a finished upload (untimed).

    Every method gets its source this way, bare qemu-img as well as convd: a
    freshly written copy and an old, often-read file do not convert at the
    same speed on this kind of VM (docs/benchmarks.md, "Fresh sources"), and
    a producer's upload is always fresh.
    """
    staged.unlink(missing_ok=True)
    # Dense, as an upload written over HTTP is: the raw source's holes become
    # written zeros in every method's copy alike.
    shutil.copyfile(src, staged)
    fd = os.open(staged, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return staged


class Spool:
    """The four directories under one root, and the producer's side of the protocol."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming, self.work = root / "incoming", root / "work"
        self.outgoing, self.failed = root / "outgoing", root / "failed"

    def create(self) -> None:
        for d in (self.incoming, self.work, self.outgoing, self.failed):
            d.mkdir(parents=True, exist_ok=True)

    def stage_copy(self, src: Path, name: str) -> Path:
        """Pre-stage a private copy of ``src`` beside the spool, flushed like a finished upload.

        Not a hard link: convd refuses a source with a second name (it could be
        changed after the safety checks).  The copy is untimed.
        """
        return stage_private(src, self.root / f".stage-{name}")

    def drop_staged(self, staged: Path, name: str) -> None:
        """The producer's rename into ``incoming/`` (the moment timings start from)."""
        os.rename(staged, self.incoming / name)

    def watch(self) -> DirWatch:
        return DirWatch([self.outgoing, self.failed])

    def result(self, directory: str, name: str) -> dict[str, Any]:
        """The record of ``name``; raises when the item landed in ``failed/``."""
        rec = json.loads((Path(directory) / f"{name}.json").read_text())
        if rec.get("status") == "failed" or Path(directory) == self.failed:
            err = rec.get("error", {})
            raise RuntimeError(f"convd rejected {name}: {err.get('code')}: {err.get('message')}")
        return rec

    def consume(self, name: str) -> None:
        """What a consumer does after reading the result: take it away."""
        for d in (self.outgoing, self.failed):
            for n in (name, f"{name}.json"):
                try:
                    os.unlink(d / n)
                except FileNotFoundError:
                    pass

    def clear_outgoing(self) -> None:
        for d in (self.outgoing, self.failed):
            with os.scandir(d) as it:
                for e in it:
                    os.unlink(e.path)


def _stat(pid: int) -> tuple[float, float, float, float] | None:
    """(utime, stime, cutime, cstime) of ``pid`` in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    # after the comm field: state=0 ... utime=11 stime=12 cutime=13 cstime=14
    return tuple(int(fields[i]) / tick for i in (11, 12, 13, 14))  # type: ignore[return-value]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class Daemon:
    """``convd run -c CONFIG`` in its own process group, JSON log to a file."""

    def __init__(self, config: Path, spool: Spool, label: str) -> None:
        self.config, self.spool, self.label = config, spool, label
        self.log_path = config.with_name("daemon.log")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._offset = self.log_path.stat().st_size
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [convd_bin(), "run", "-c", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def new_events(self) -> list[dict[str, Any]]:
        """JSON log lines written since the last call."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        out = []
        for line in data[:cut].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.new_events():
                if ev.get("event") == "watching":
                    return ev
            if self.proc.poll() is not None:
                raise RuntimeError(f"convd ({self.label}) exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.02)
        raise RuntimeError(f"convd ({self.label}) did not start watching within {timeout:g} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def status(self, field: str) -> int | None:
        """A ``/proc/PID/status`` field in bytes (VmHWM, VmRSS)."""
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except FileNotFoundError:
            return None
        return None

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (the daemon itself, every process below it: its launcher,
        qemu-img, any exec wrappers; reaped ones and, for the launcher, running ones)."""
        me = _stat(self.pid)
        if me is None:
            return (float("nan"), float("nan"))
        below = me[2] + me[3]
        for child in _children(self.pid):
            st = _stat(child)
            if st is not None:
                below += sum(st)
        return (me[0] + me[1], below)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
