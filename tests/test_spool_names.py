"""Names in the spool (issue 24): one name limit (241 bytes, as documented), numbering in
``failed/`` that does not slow down with every reject of a name, and a refused name logged
once rather than at every rescan."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from convd.config import SpoolConfig
from convd.pipeline.layout import MAX_NAME_BYTES
from convd.pipeline.spool import Spool as SpoolOf

from conftest import Daemon, MiB, Spool, make_image, write_config


def test_the_name_limit_is_the_documented_241_bytes() -> None:
    assert MAX_NAME_BYTES == 241
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    ops = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    assert "241 bytes" in readme and "241 bytes" in ops


def test_a_241_byte_name_converts_and_a_242_byte_name_waits_logged_once(
        tmp_path: Path, daemon_factory: Callable[..., Daemon], spool: Spool) -> None:
    d = daemon_factory(write_config(tmp_path, watch={"settle": 0.5, "rescan_interval": "0.3s"}))
    src = make_image(tmp_path / "n.qcow2", "qcow2", 4 * MiB)
    fits, too_long = "a" * 241, "b" * 242
    spool.drop(src, fits)
    spool.drop(src, too_long)
    assert spool.wait_record(fits)["status"] == "converted"
    # Several rescans later (every 0.3 s) it still waits, and was logged once.
    time.sleep(2)
    assert (spool.incoming / too_long).exists()
    refused = [e for e in d.events() if e.get("event") == "name refused; left in incoming/"]
    assert len(refused) == 1 and refused[0]["item"] == too_long
    assert d.stop() == 0


def test_failed_numbering_finds_a_free_number_in_a_few_looks_however_many_rejects_came_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "spool"
    sp = SpoolOf(SpoolConfig(root=root, incoming=root / "incoming", work=root / "work",
                             outgoing=root / "outgoing", failed=root / "failed", instance="t"))
    sp.failed.mkdir(parents=True)
    for n in ["bad"] + [f"bad.{i}" for i in range(1, 5001)]:
        (sp.failed / n).write_bytes(b"x")
        (sp.failed / f"{n}.json").write_text("{}")
    looks = 0
    free = sp._failed_free

    def counted(candidate: str) -> bool:
        nonlocal looks
        looks += 1
        return free(candidate)

    monkeypatch.setattr(sp, "_failed_free", counted)
    first = sp.free_failed_name("bad")
    assert first == "bad.5001"
    assert looks < 40  # doubling then halving: about 2 log2(5000), not 5000
    (sp.failed / first).write_bytes(b"x")
    looks = 0
    assert sp.free_failed_name("bad") == "bad.5002"
    assert looks <= 3  # remembered: the name itself, then the next number
