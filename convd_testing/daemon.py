"""A real ``convd run`` subprocess on a spool, fed by the producer protocol: the one
``Daemon`` and ``Spool`` the tests (tests/conftest.py) and the benchmark (bench/) use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convd_testing.glance_server import track, untrack

__all__ = ["Daemon", "Spool", "convd_bin", "stage_private", "wait_for"]


def convd_bin() -> str:
    """The ``convd`` of this environment (beside ``sys.executable``), else the one on PATH."""
    exe = Path(sys.executable).with_name("convd")
    found = str(exe) if exe.exists() else shutil.which("convd")
    if not found:
        raise FileNotFoundError("convd is not installed in this environment; run `make setup` first")
    return found


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """``pred()`` once it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


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
    """``convd run -c CONFIG`` in its own process group, its JSON log in a file.

    ``log_path``: where the log goes (appended to); by default a new file
    beside the config.  ``label`` names the daemon in errors.
    """

    def __init__(self, config: Path, env: dict[str, str] | None = None, *, spool: Spool | None = None,
                 label: str = "convd", log_path: Path | None = None) -> None:
        self.config, self.spool, self.label = config, spool, label
        self.log_path = log_path or config.with_name(f"daemon-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._offset = self.log_path.stat().st_size
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [convd_bin(), "run", "-c", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        track(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

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

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """The ``watching`` event, once the daemon logged it; AssertionError if it exits or takes longer."""
        seen: list[dict[str, Any]] = []

        def ready() -> bool:
            seen.extend(e for e in self.new_events() if e.get("event") == "watching")
            return bool(seen) or self.proc.poll() is not None

        wait_for(ready, timeout, what=f"{self.label} to start watching")
        assert self.proc.poll() is None, f"{self.label} exited {self.proc.returncode}:\n{self.log()}"
        return seen[0]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        untrack(self.proc)
        self._log.close()

    def stop(self, timeout: float = 10.0, *, strict: bool = True) -> int:
        """SIGTERM and wait; past ``timeout`` the group is killed and, if ``strict``, AssertionError."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                if strict:
                    raise AssertionError(f"{self.label} did not stop within {timeout}s:\n{self.tail()}") from None
        untrack(self.proc)
        self._log.close()
        return self.proc.returncode

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


class Spool:
    """The four directories under one root, and the producer's and consumer's sides of the protocol."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming, self.work = root / "incoming", root / "work"
        self.outgoing, self.failed = root / "outgoing", root / "failed"

    def create(self) -> None:
        for d in (self.incoming, self.work, self.outgoing, self.failed):
            d.mkdir(parents=True, exist_ok=True)

    # -- the producer ----------------------------------------------------------

    def drop(self, src: Path, name: str | None = None) -> str:
        """Producer protocol: write elsewhere, rename into incoming/."""
        name = name or src.name
        tmp = self.incoming / f".{name}.part"
        shutil.copyfile(src, tmp)
        os.rename(tmp, self.incoming / name)
        return name

    def stage_copy(self, src: Path, name: str) -> Path:
        """Pre-stage a private copy of ``src`` beside the spool, flushed like a finished upload.

        Not a hard link: convd refuses a source with a second name (it could be
        changed after the safety checks).  The copy is untimed.
        """
        return stage_private(src, self.root / f".stage-{name}")

    def drop_staged(self, staged: Path, name: str) -> None:
        """The producer's rename into ``incoming/`` (the moment timings start from)."""
        os.rename(staged, self.incoming / name)

    # -- the consumer ----------------------------------------------------------

    def record(self, name: str) -> dict[str, Any] | None:
        for d in (self.outgoing, self.failed):
            p = d / f"{name}.json"
            if p.exists():
                return json.loads(p.read_text())
        return None

    def wait_record(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        return wait_for(lambda: self.record(name), timeout, what=f"record of {name}")

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

    # -- work/ -----------------------------------------------------------------

    def wait_work_empty(self, timeout: float = 10.0) -> None:
        """Wait until no item files are left under ``work/``.

        A claim directory is removed after its record is durable (the record
        is the commit point), so a test that has just read a record waits
        for that removal rather than racing it.
        """
        wait_for(lambda: self.work_files() == [], timeout=timeout, what="work/ to be emptied")

    def work_files(self) -> list[str]:
        out = []
        for dirpath, _dirs, files in os.walk(self.work):
            for f in files:
                if not f.startswith("."):
                    out.append(os.path.relpath(os.path.join(dirpath, f), self.work))
        return out


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
