"""Live take-over: exactly one survivor adopts a dead instance's items, and probing never
makes a starting daemon refuse.

The races are run with real processes (each its own open file descriptions,
as separate daemons have) on real flock'ed files under tmp_path; the
shared-filesystem version with real daemons is tests/test_sharedfs.py.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from convd.config import Config, SpoolConfig
from convd.errors import ConfigError
from convd.pipeline.spool import Spool, instance_lock_state
from convd.pipeline.takeover import TakeOver
from convd.status import HEARTBEAT_STALE, instances, locate

from conftest import MiB, images_equal, make_image, wait_for, write_config

ITEMS = 12


def spool_cfg(root: Path, instance: str) -> SpoolConfig:
    return SpoolConfig(root=root, incoming=root / "incoming", work=root / "work", outgoing=root / "outgoing",
                       failed=root / "failed", instance=instance)


def make_claims(root: Path, instance: str, names: list[str]) -> None:
    """Items claimed by ``instance``, whose daemon then died (lock released, items left)."""
    sp = Spool(spool_cfg(root, instance))
    sp.prepare()
    for n in names:
        (root / "incoming" / n).write_bytes(n.encode())
        assert sp.claim(n) is not None
    sp.close()


def _survivor(root: Path, instance: str, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    sp = Spool(spool_cfg(root, instance))
    sp.prepare()
    barrier.wait()
    claims, stopped = TakeOver(sp).run()
    out.put((instance, sorted(c.name for c in claims), stopped))
    sp.close()


@pytest.mark.parametrize("trial", range(5))
def test_two_survivors_adopt_a_dead_instance_items_exactly_once(tmp_path, trial):
    names = [f"img{i:02d}" for i in range(ITEMS)]
    make_claims(tmp_path, "dead", names)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_survivor, args=(tmp_path, inst, barrier, out)) for inst in ("a", "b")]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        inst, adopted, _stopped = out.get(timeout=60)
        results[inst] = adopted
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(results["a"] + results["b"]) == names  # every item once, none twice
    for inst, adopted in results.items():
        on_disk = sorted(e.name for e in os.scandir(tmp_path / "work" / inst) if e.is_dir())
        assert on_disk == adopted
        for n in adopted:
            assert (tmp_path / "work" / inst / n / "source").read_bytes() == n.encode()
    assert not [e for e in os.scandir(tmp_path / "work" / "dead") if e.is_dir()]


def test_items_of_a_running_instance_are_not_taken_over(tmp_path):
    make_claims(tmp_path, "busy", ["x"])
    owner = Spool(spool_cfg(tmp_path, "busy"))
    owner.prepare()
    other = Spool(spool_cfg(tmp_path, "other"))
    other.prepare()
    try:
        assert TakeOver(other).run() == ([], [])
        assert instance_lock_state(tmp_path / "work" / "busy") == "held"
        assert (tmp_path / "work" / "busy" / "x" / "source").exists()
    finally:
        owner.close()
        other.close()
    assert instance_lock_state(tmp_path / "work" / "busy") == "free"


def test_adopted_items_are_ready_to_run_again(tmp_path):
    make_claims(tmp_path, "dead", ["half"])
    (tmp_path / "work" / "dead" / "half" / "output").write_bytes(b"partial")  # mid-convert at the crash
    sp = Spool(spool_cfg(tmp_path, "live"))
    sp.prepare()
    try:
        claims, stopped = TakeOver(sp).run()
    finally:
        sp.close()
    assert stopped == ["dead"]
    assert [c.name for c in claims] == ["half"]
    assert claims[0].dir == tmp_path / "work" / "live" / "half"
    assert not claims[0].output.exists()  # a partial output is worthless
    assert claims[0].source.read_bytes() == b"half"


def test_an_item_whose_name_is_in_flight_here_waits_for_the_next_check(tmp_path):
    make_claims(tmp_path, "dead", ["same"])
    sp = Spool(spool_cfg(tmp_path, "live"))
    sp.prepare()
    try:
        (tmp_path / "incoming" / "same").write_bytes(b"mine")
        assert sp.claim("same") is not None
        assert TakeOver(sp).run()[0] == []
        assert (tmp_path / "work" / "dead" / "same" / "source").read_bytes() == b"same"
        assert (tmp_path / "work" / "live" / "same" / "source").read_bytes() == b"mine"
    finally:
        sp.close()


def _prober(root: Path, stop: mp.synchronize.Event, probes: mp.Value) -> None:
    d = root / "work" / "owner"
    while not stop.is_set():
        instance_lock_state(d)
        with probes.get_lock():
            probes.value += 1


def test_a_starting_daemon_is_never_refused_because_peers_probe_its_lock(tmp_path):
    # Two peers probe the owner's lock as fast as they can (as live take-over
    # and `convd status` do) while the owner starts and stops 200 times.  Before
    # the .adopt door, a probe holding .lock at the owner's start made it refuse
    # ("another convd with instance ... is running") about once in ten starts.
    first = Spool(spool_cfg(tmp_path, "owner"))
    first.prepare()  # directories and lock files exist
    first.close()
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    probes = ctx.Value("l", 0)
    procs = [ctx.Process(target=_prober, args=(tmp_path, stop, probes)) for _ in range(2)]
    for p in procs:
        p.start()
    refused = 0
    try:
        while probes.value < 10:  # both probers under way
            pass
        for _ in range(200):
            sp = Spool(spool_cfg(tmp_path, "owner"))
            try:
                sp.prepare()
            except ConfigError:
                refused += 1
            finally:
                sp.close()
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
    assert refused == 0
    assert probes.value > 200


def test_a_second_daemon_with_the_same_instance_is_still_refused(tmp_path):
    first = Spool(spool_cfg(tmp_path, "twin"))
    first.prepare()
    try:
        with pytest.raises(ConfigError, match="another convd with instance 'twin' is running"):
            Spool(spool_cfg(tmp_path, "twin")).prepare()
    finally:
        first.close()


def write_heartbeat(root: Path, instance: str, age: float) -> None:
    (root / "work" / instance / ".status.json").write_text(json.dumps(
        {"instance": instance, "pid": 1, "host": "h", "updated_at": time.time() - age, "in_flight": []}))


def test_status_tells_alive_stale_and_dead_instances_and_what_each_holds(tmp_path):
    make_claims(tmp_path, "dead", ["a", "b"])
    spools = {name: Spool(spool_cfg(tmp_path, name)) for name in ("alive", "stale")}
    for sp in spools.values():
        sp.prepare()
    try:
        write_heartbeat(tmp_path, "alive", 1)
        write_heartbeat(tmp_path, "stale", HEARTBEAT_STALE + 5)  # lock held, heartbeat stopped: hung
        write_heartbeat(tmp_path, "dead", 1)  # a fresh heartbeat does not outvote a free lock
        insts = {i["instance"]: i for i in instances(tmp_path / "work")}
        assert {k: v["state"] for k, v in insts.items()} == {"alive": "alive", "stale": "stale", "dead": "dead"}
        assert insts["dead"]["items"] == ["a", "b"]
        cfg = Config(spool=spool_cfg(tmp_path, "alive"))
        assert locate(cfg, "a") == {"where": "work", "instance": "dead", "state": "dead"}
        assert locate(cfg, "nothing") is None
    finally:
        for sp in spools.values():
            sp.close()


# -- end to end, on a local spool: real daemons, a real kill -9 --------------------------


def peer_configs(tmp_path: Path, root: Path, **sections: dict) -> dict[str, Path]:
    """Configs of daemons alpha and beta on one spool, checking each other every second."""
    configs = {}
    for inst in ("alpha", "beta"):
        (tmp_path / inst).mkdir()
        configs[inst] = write_config(tmp_path / inst, spool={"root": str(root), "instance": inst,
                                                             "takeover_interval": 1}, **sections)
    return configs


def test_a_running_daemon_finishes_a_killed_peer_claims_without_a_restart(tmp_path, daemon_factory):
    root = tmp_path / "spool"
    configs = peer_configs(tmp_path, root, convert={"max_workers": 1})
    alpha = daemon_factory(configs["alpha"])
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    images = {f"img{i}": make_image(pristine / f"{i}.qcow2", "qcow2", (4 + i) * MiB, seed=i + 1) for i in range(4)}
    for name, src in images.items():
        tmp = root / "incoming" / f".{name}.part"
        shutil.copyfile(src, tmp)
        os.rename(tmp, root / "incoming" / name)
    held = wait_for(lambda: [n for n in os.listdir(root / "work" / "alpha") if not n.startswith(".")], timeout=30,
                    what="alpha to claim")
    # beta starts once alpha holds claims (started first, under load it took them all).
    beta = daemon_factory(configs["beta"])
    alpha.kill_group()
    for name in images:
        wait_for(lambda n=name: (root / "outgoing" / f"{n}.json").exists(), timeout=60, what=f"record of {name}")
    assert beta.stop() == 0
    for name, src in images.items():
        assert json.loads((root / "outgoing" / f"{name}.json").read_bytes())["status"] == "converted"
        assert images_equal(src, "qcow2", root / "outgoing" / name, "raw")
    assert os.listdir(root / "failed") == []
    adopted = [e["item"] for e in beta.events() if e.get("event") == "adopted an item of a stopped instance"]
    claimed = Counter(e["item"] for d in (alpha, beta) for e in d.events() if e.get("event") == "claimed")
    # Each out of incoming/ at most once; a claim whose log line the kill -9
    # cut off (between the rename and the line) shows up as beta's adoption.
    assert set(claimed.values()) == {1} and set(claimed) | set(adopted) == set(images)
    unfinished = [n for n in held if n not in (e["item"] for e in alpha.events() if e.get("event") == "converted")]
    assert set(unfinished) <= set(adopted)
    assert len(adopted) == len(set(adopted))


def test_a_daemon_started_first_adopts_a_peer_that_dies_later(tmp_path, daemon_factory):
    # Take-over while running, not at start: beta is up before alpha dies.
    root = tmp_path / "spool"
    configs = peer_configs(tmp_path, root)
    beta = daemon_factory(configs["beta"])
    beta_started = len(beta.events())
    alpha = daemon_factory(configs["alpha"])
    # A claim alpha holds: put it in place as alpha's own (the file stays while alpha runs).
    src = make_image(tmp_path / "orphan.qcow2", "qcow2", 4 * MiB)
    item = root / "work" / "alpha" / "orphan"
    item.mkdir()
    shutil.copyfile(src, item / "source")
    assert (item / "source").exists()  # alive alpha: beta leaves it alone
    alpha.kill_group()
    wait_for(lambda: (root / "outgoing" / "orphan.json").exists(), timeout=60, what="the orphan's record")
    assert images_equal(src, "qcow2", root / "outgoing" / "orphan", "raw")
    assert any(e.get("event") == "took over the items of stopped instances" for e in beta.events()[beta_started:])
    assert beta.stop() == 0
