"""Shutdown is prompt even while a long checksum runs in a thread."""

from __future__ import annotations

import json
import signal
import time

from conftest import run, wait_for, write_config


def test_sigterm_during_a_long_checksum_exits_within_ten_seconds(tmp_path, spool, daemon_factory):
    # 40 GiB of holes: the raw output is instant to write, and its sha256 takes
    # far longer than the contract's 10 s to compute.
    img = tmp_path / "holes.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "40G")
    cfg = write_config(tmp_path, checksum={"algorithms": ["sha256", "sha512"]})
    d = daemon_factory(cfg)
    spool.drop(img)
    status = spool.work / "test" / ".status.json"

    def publishing() -> bool:
        try:
            snap = json.loads(status.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return any(i["stage"] == "publish" for i in snap["in_flight"])

    wait_for(publishing, 60, what="the item to reach publish")
    time.sleep(0.5)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    d.proc.wait(15)
    assert d.proc.returncode == 0
    assert time.monotonic() - t0 < 10, "the contract allows 10 s"
    assert (spool.work / "test" / "holes.qcow2" / "source").exists(), "the source waits for the next start"
    assert not (spool.outgoing / "holes.qcow2.json").exists()
