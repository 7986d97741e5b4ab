"""Several daemons on one spool on a real shared filesystem: CephFS, one ceph-fuse client per node.

A one-node Ceph cluster (mon, mgr, a memstore OSD, an MDS) on 127.0.0.1
with three ceph-fuse mounts, one per daemon, as three API nodes would mount
it (each mount is its own CephFS client: own session, caps and locks).
The host kernel has no CephFS or NFS client (convd_testing/sharedfs.py says more),
so this is the real shared filesystem the machine can have.  Needs root;
`make setup` installs the Ceph packages.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from convd_testing.sharedfs import CephCluster, ceph_missing

from conftest import Daemon, MiB, convd_bin, images_equal, make_image, run, wait_for, write_config

pytestmark = pytest.mark.slow

NODES = ("node1", "node2", "node3")
# The test's take-over check interval; the documented bound is lock expiry
# (immediate when only the process dies) + this + the items' own work.
TAKEOVER = 3.0


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    if os.geteuid() != 0:
        pytest.skip("CephFS tests need root (ceph daemons and FUSE mounts)")
    why = ceph_missing()
    if why:
        pytest.fail(f"cannot run the CephFS tests: {why}")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"), clients=len(NODES), memstore_bytes=4 << 30)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Node:
    """A daemon on one ceph-fuse mount, with its own instance name."""

    def __init__(self, name: str, mount: Path, spool_dir: str, confdir: Path) -> None:
        self.name = name
        self.root = mount / spool_dir
        confdir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(
            confdir,
            spool={"root": str(self.root), "instance": name, "takeover_interval": TAKEOVER},
            watch={"settle": 1.0, "rescan_interval": "5s"},
            convert={"max_workers": 2, "retry_backoff": 0.2},
            limits={"workspace": "1GiB", "min_free": "64MiB"},
            checksum={"algorithms": []},
        )
        self.daemon: Daemon | None = None

    def start(self) -> Daemon:
        self.daemon = Daemon(self.config)
        self.daemon.wait_ready(timeout=60)
        return self.daemon


@pytest.fixture
def nodes(ceph: CephCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Node]]:
    spool_dir = f"spool-{request.node.name[:40]}-{time.monotonic_ns()}"
    made = [Node(n, m, spool_dir, tmp_path / n) for n, m in zip(NODES, ceph.mounts, strict=True)]
    yield made
    for n in made:
        d = n.daemon
        if d is not None:
            if d.proc.poll() is None:
                d.kill_group()
            else:
                d._log.close()
    shutil.rmtree(made[0].root, ignore_errors=True)


def make_images(tmp_path: Path, count: int, prefix: str) -> dict[str, Path]:
    pristine = tmp_path / f"pristine-{prefix}"
    pristine.mkdir()
    return {f"{prefix}-{i:03d}": make_image(pristine / f"{i}.qcow2", "qcow2", (2 + i % 3) * MiB, seed=i + 1)
            for i in range(count)}


def drop_all(images: dict[str, Path], nodes: list[Node]) -> None:
    """Producers on every node: write under a dot-name, fsync, rename in."""
    for i, (name, src) in enumerate(images.items()):
        incoming = nodes[i % len(nodes)].root / "incoming"
        tmp = incoming / f".{name}.part"
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.rename(tmp, incoming / name)


def records(root: Path) -> dict[str, dict[str, Any]]:
    """The records every consumer sees, found by listing outgoing/ and failed/ (never stat() polling)."""
    out = {}
    for d in ("outgoing", "failed"):
        for n in os.listdir(root / d):
            if n.endswith(".json") and not n.startswith("."):
                out[n[:-5]] = {**json.loads((root / d / n).read_bytes()), "_dir": d}
    return out


def items_in_work(root: Path) -> dict[str, list[str]]:
    out = {}
    for inst in os.listdir(root / "work"):
        p = root / "work" / inst
        if p.is_dir() and not inst.startswith("."):
            out[inst] = sorted(n for n in os.listdir(p) if not n.startswith("."))
    return out


def stop_all(daemons: list[Daemon]) -> None:
    rcs = [d.stop(timeout=30) for d in daemons]
    assert rcs == [0] * len(daemons), "\n".join(d.log()[-3000:] for d, rc in zip(daemons, rcs) if rc)


def assert_exactly_once_and_identical(root: Path, images: dict[str, Path], daemons: list[Daemon]) -> None:
    recs = records(root)
    assert set(recs) >= set(images)
    failed = {n: r["error"] for n, r in recs.items() if r["_dir"] == "failed"}
    assert failed == {}
    for name, src in images.items():
        assert recs[name]["status"] == "converted", recs[name]
        assert images_equal(src, "qcow2", root / "outgoing" / name, "raw"), name
    # Each claimed out of incoming/ at most once; a claim whose log line a
    # kill -9 cut off (between the rename and the line) shows up as the
    # survivor's adoption instead.
    events = [e for d in daemons for e in d.events() if e.get("item") in images]
    claims = Counter(e["item"] for e in events if e.get("event") == "claimed")
    adopted = {e["item"] for e in events if e.get("event") == "adopted an item of a stopped instance"}
    assert set(claims.values()) == {1} and set(claims) | adopted == set(images)
    assert os.listdir(root / "incoming") == []
    assert {k: v for k, v in items_in_work(root).items() if v} == {}


def test_three_daemons_on_cephfs_convert_each_image_exactly_once(ceph, nodes, tmp_path):
    images = make_images(tmp_path, 60, "batch")
    daemons = [n.start() for n in nodes]
    for d in daemons:  # found shared: polling, and no O_DIRECT through FUSE
        assert '"filesystem": "fuse.ceph-fuse"' in d.log() and '"polling": true' in d.log()
        assert '"direct_io": false' in d.log()
    drop_all(images, nodes)
    wait_for(lambda: set(records(nodes[0].root)) >= set(images), timeout=240, interval=0.5,
             what="60 records on CephFS")
    wait_for(lambda: not any(items_in_work(nodes[0].root).values()), timeout=60, interval=0.5)
    stop_all(daemons)
    assert_exactly_once_and_identical(nodes[0].root, images, daemons)
    per_node = Counter(e["item"].split("-")[0] for d in daemons for e in d.events() if e.get("event") == "claimed")
    assert sum(per_node.values()) == 60


def test_survivors_finish_a_killed_daemon_claims_without_a_restart(ceph, nodes, tmp_path):
    images = make_images(tmp_path, 60, "kill")
    victim = nodes[0]
    # The victim converts slowly, so its claims last: unslowed, it could finish
    # its share while the producers were still dropping and never hold two at
    # a look (a CI run timed out here so).
    victim.config.write_text(victim.config.read_text().replace("[convert]\n", '[convert]\nrate_limit = "1MiB"\n'))
    daemons = [n.start() for n in nodes]
    # The producers drop while the victim is watched, not before.
    dropping = threading.Thread(target=drop_all, args=(images, nodes), daemon=True)
    dropping.start()
    # kill -9 once the victim holds at least two claims mid-batch.
    held = wait_for(lambda: (lambda w: w if len(w) >= 2 else None)(items_in_work(victim.root).get(victim.name, [])),
                    timeout=120, interval=0.05, what="the victim to hold two claims")
    victim.daemon.kill_group()
    killed_at = time.monotonic()
    held = items_in_work(victim.root).get(victim.name, [])
    dropping.join()
    # Nobody restarts anything: the two survivors must adopt and finish them.
    wait_for(lambda: set(records(victim.root)) >= set(held), timeout=120, interval=0.2,
             what="the killed daemon's claims to be finished")
    took = time.monotonic() - killed_at
    wait_for(lambda: set(records(victim.root)) >= set(images), timeout=240, interval=0.5,
             what="all 60 records after the kill")
    survivors = daemons[1:]
    adopted = [e for d in survivors for e in d.events() if e.get("event") == "adopted an item of a stopped instance"]
    assert Counter(e["item"] for e in adopted) == Counter(dict.fromkeys(held, 1))
    assert {e["instance"] for e in adopted} <= {victim.name}
    wait_for(lambda: not any(items_in_work(victim.root).values()), timeout=60, interval=0.5)
    # One view of the cluster, from any node: the victim is dead, the others alive.
    st = json.loads(run(convd_bin(), "status", "-c", nodes[1].config, "--json").stdout)
    assert {i["instance"]: i["state"] for i in st["instances"]} == {
        victim.name: "dead", nodes[1].name: "alive", nodes[2].name: "alive"}
    stop_all(survivors)
    assert_exactly_once_and_identical(victim.root, images, daemons)
    print(f"take-over: {len(held)} claims of the killed daemon finished {took:.1f} s after the kill")
