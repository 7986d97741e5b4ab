"""The design not taken, measured: one long-lived ``qemu-storage-daemon`` per
worker driven over QMP, against a qemu-img process per step (issue 12).

Per small image, the QMP path does what convd's detect and convert do:
``blockdev-add`` with an explicit driver (this parses the unvetted header),
``query-named-block-nodes`` (the ``qemu-img info`` check), a raw target
created by us and added, a ``blockdev-backup`` job (``sync=full``) for the
copy, then ``blockdev-del`` of both nodes.  The process path is what convd
runs: ``qemu-img info`` under limits, then ``qemu-img convert``, both
through convd's launcher.  CPU is read from ``/proc`` (caller, launcher,
qemu-storage-daemon, qemu-img), so other load on the machine does not count.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["available", "compare"]


def available() -> bool:
    return shutil.which("qemu-storage-daemon") is not None


def _cpu(pid: int, children: bool = True) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    idx = (11, 12, 13, 14) if children else (11, 12)
    return sum(int(f[i]) for i in idx) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.io = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            msg = json.loads(self.io.readline())
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, name: str, **args: Any) -> Any:
        self.io.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.io.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error'].get('desc')}")
        return reply["return"]

    def wait_event(self, name: str) -> dict[str, Any]:
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            msg = json.loads(self.io.readline())
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.io.close()
        self.sock.close()


def _qsd_item(qmp: _Qmp, src: Path, dst: Path) -> None:
    qmp.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "src", "read-only": True,
                               "file": {"driver": "file", "filename": str(src), "read-only": True}})
    nodes = qmp.cmd("query-named-block-nodes", flat=True)
    image = next(n for n in nodes if n["node-name"] == "src")["image"]
    if image.get("backing-filename") or image.get("format") != "qcow2":
        raise RuntimeError(f"unexpected image info {image}")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    os.ftruncate(fd, image["virtual-size"])
    os.close(fd)
    qmp.cmd("blockdev-add", **{"driver": "raw", "node-name": "dst", "discard": "unmap", "detect-zeroes": "unmap",
                               "file": {"driver": "file", "filename": str(dst)}})
    qmp.cmd("blockdev-backup", **{"job-id": "copy", "device": "src", "target": "dst", "sync": "full"})
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED")
    if ev["data"].get("error"):
        raise RuntimeError(ev["data"]["error"])
    qmp.cmd("blockdev-del", **{"node-name": "dst"})
    qmp.cmd("blockdev-del", **{"node-name": "src"})


def _run_qsd(sources: Sequence[Path], outdir: Path) -> dict[str, float]:
    sock = outdir / "qsd.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(["qemu-storage-daemon", "--chardev", f"socket,path={sock},server=on,wait=off,id=m",
                             "--monitor", "chardev=m"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.01)
        qmp = _Qmp(sock)
        outs = [outdir / f"qsd-{i:04d}.raw" for i in range(len(sources))]
        _qsd_item(qmp, sources[0], outs[0])  # warm-up
        outs[0].unlink()
        c0, q0, t0 = _self_cpu(), _cpu(proc.pid, children=False), time.monotonic()
        for src, dst in zip(sources, outs):
            _qsd_item(qmp, src, dst)
        wall, c1, q1 = time.monotonic() - t0, _self_cpu(), _cpu(proc.pid, children=False)
        same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(sources[0]),
                               str(outs[0])]).returncode == 0
        for o in outs:
            o.unlink()
        qmp.close()
    finally:
        proc.terminate()
        proc.wait()
    n = len(sources)
    return {"wall": wall / n, "cpu_client": (c1 - c0) / n, "cpu_server": (q1 - q0) / n, "identical": same}


def _run_processes(sources: Sequence[Path], outdir: Path) -> dict[str, float]:
    from convd.qemu import img as qemu
    from convd.qemu import launcher

    async def go() -> dict[str, float]:
        outs = [outdir / f"proc-{i:04d}.raw" for i in range(len(sources))]
        lch = launcher.get()
        c0, l0, t0 = _self_cpu(), _cpu(lch.pid), time.monotonic()
        for src, dst in zip(sources, outs):
            await qemu.info(str(src), "qcow2", cpu_time=30, address_space=1 << 30)
            await qemu.convert(str(src), "qcow2", str(dst), "raw", extra_args=qemu.convert_args("qcow2", "raw", None),
                               timeout=60)
        wall, c1, l1 = time.monotonic() - t0, _self_cpu(), _cpu(lch.pid)
        for o in outs:
            o.unlink()
        n = len(sources)
        return {"wall": wall / n, "cpu_client": (c1 - c0) / n, "cpu_server": (l1 - l0) / n, "identical": True}

    try:
        return asyncio.run(go())
    finally:
        launcher.shutdown()


def compare(sources: Sequence[Path], outdir: Path, reps: int) -> dict[str, Any]:
    """Per-image wall and CPU of both designs, ``reps`` alternating runs over ``sources``."""
    outdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {"qsd": [], "processes": []}
    for rep in range(reps):
        order = ("qsd", "processes") if rep % 2 == 0 else ("processes", "qsd")
        for how in order:
            runs[how].append((_run_qsd if how == "qsd" else _run_processes)(sources, outdir))
    return {how: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu_client", "cpu_server")}
            | {"identical": all(r["identical"] for r in rs), "count": len(sources)}
            for how, rs in runs.items()}
