"""Priority (contract section 9): the Glance plugin's hand-ins before bulk drops, neither starving.

Order is read from the daemon's own ``claimed`` events; nothing here
measures time.  The hand-ins are made with ``convd.protocol.hand_in``, the
function the Glance plugin calls (its ``[convd] priority`` option is the
``priority`` argument), so no Glance is needed to show the order.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from convd import protocol

from conftest import MiB, make_image, wait_for, write_config


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("prio") / "small.qcow2", "qcow2", 4 * MiB)


def claim_order(daemon) -> list[str]:
    return [e["item"] for e in daemon.events() if e.get("event") == "claimed"]


def glance_hand_in(spool, src: Path, name: str, tmp_path: Path) -> None:
    staged = tmp_path / f"staging-{name}"
    shutil.copyfile(src, staged)
    protocol.hand_in(staged, protocol.SpoolPaths.under(spool.root), name, priority="high")


def test_glance_hand_in_overtakes_a_backlog_of_50_dropped_files(tmp_path, spool, daemon_factory, small):
    cfg = write_config(tmp_path, convert={"max_workers": 1})
    for d in ("incoming", "work", "outgoing", "failed"):
        (spool.root / d).mkdir(parents=True, exist_ok=True)
    backlog = [spool.drop(small, f"bulk-{i:02d}") for i in range(50)]
    glance_hand_in(spool, small, "image-1", tmp_path)
    d = daemon_factory(cfg)
    # While the backlog drains, a second import arrives.
    wait_for(lambda: len(claim_order(d)) >= 3, 60, what="the backlog to start")
    glance_hand_in(spool, small, "image-2", tmp_path)
    done_at_hand_in = sum(1 for n in os.listdir(spool.outgoing) if n.endswith(".json"))
    for name in [*backlog, "image-1", "image-2"]:
        assert spool.wait_record(name, timeout=120)["status"] == "converted"
    d.stop()
    order = claim_order(d)
    assert sorted(order) == sorted([*backlog, "image-1", "image-2"])
    # Waiting at start-up with the whole backlog: taken first.
    assert order[0] == "image-1"
    # Arriving later: taken at the next free claim; before it, only what was
    # done or claimed (max_workers * 2 ahead) when it came, and what the
    # daemon claimed before the watcher reported it (one turn of dispatch).
    assert order.index("image-2") <= done_at_hand_in + 2 + 2, order
    assert done_at_hand_in + 4 < 40  # the hand-in really came before most of the backlog
    assert not [n for n in os.listdir(spool.incoming) if n.startswith(protocol.PRIORITY_PREFIX)]


def test_a_stream_of_imports_does_not_starve_dropped_files(tmp_path, spool, daemon_factory, small):
    # The documented rule: after [convert] priority_burst marked names in a
    # row, the oldest waiting dropped file goes next.
    cfg = write_config(tmp_path, convert={"max_workers": 1, "priority_burst": 4})
    for d in ("incoming", "work", "outgoing", "failed"):
        (spool.root / d).mkdir(parents=True, exist_ok=True)
    bulk = [spool.drop(small, f"bulk-{i}") for i in range(5)]
    marked = []
    for i in range(10):
        glance_hand_in(spool, small, f"image-{i}", tmp_path)
        marked.append(f"image-{i}")
    d = daemon_factory(cfg)
    for name in bulk + marked:
        spool.wait_record(name, timeout=120)
    d.stop()
    kinds = "".join("M" if n.startswith("image-") else "B" for n in claim_order(d))
    assert kinds == "MMMMBMMMMBMMBBB", claim_order(d)


def test_priority_sidecar_that_is_not_a_regular_file_counts_for_nothing(tmp_path, spool, daemon_factory, small):
    # A producer's sidecar is read without following links or blocking: a
    # FIFO or a symlink is "normal", and the intake does not hang on it.
    cfg = write_config(tmp_path, convert={"max_workers": 1})
    for d in ("incoming", "work", "outgoing", "failed"):
        (spool.root / d).mkdir(parents=True, exist_ok=True)
    os.mkfifo(spool.incoming / f"{protocol.PRIORITY_PREFIX}fifo")
    target = tmp_path / "prio.json"
    target.write_text('{"priority": "high"}')
    os.symlink(target, spool.incoming / f"{protocol.PRIORITY_PREFIX}link")
    spool.drop(small, "bulk")
    spool.drop(small, "fifo")
    spool.drop(small, "link")
    glance_hand_in(spool, small, "image", tmp_path)
    assert protocol.read_priority(spool.incoming, "fifo") == "normal"
    assert protocol.read_priority(spool.incoming, "link") == "normal"
    assert protocol.read_priority(spool.incoming, "image") == "high"
    d = daemon_factory(cfg)
    for name in ("bulk", "fifo", "link", "image"):
        spool.wait_record(name)
    d.stop()
    assert claim_order(d)[0] == "image"
