"""Two daemons on two kernel NFSv4.2 clients (User-Mode Linux): exactly once, take-over, no delegations.

The host kernel has no NFS client or server (no network filesystems, no
modules), so the real Linux nfsd and NFS client run inside a User-Mode Linux
guest (convd_testing/sharedfs.py: each node a network namespace with its own NFSv4
client identity; addresses only inside the guest).  tests/nfs_job.py drives
the daemons in the guest and reports; the asserts are here.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from convd_testing.sharedfs import UmlNfs, uml_missing

from conftest import REPO, MiB, make_image

pytestmark = pytest.mark.slow

COUNT = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the NFS lab needs root (User-Mode Linux with nfsd, network namespaces)")
    why = uml_missing()
    if why:
        pytest.fail(f"cannot run the NFS tests: {why}")
    d = tmp_path_factory.mktemp("nfs-images")
    for i in range(COUNT):
        make_image(d / f"img{i:02d}.tmp", "qcow2", (2 + i % 3) * MiB, seed=i + 1).rename(d / f"img{i:02d}")
    for p in d.glob("*.src.raw"):
        p.unlink()
    return d


def ts(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run_job(tmp_path: Path, images: Path, *, leases: bool, kill: bool, cut: bool = False,
            settle: float = 1.0) -> dict:
    lab = UmlNfs(tmp_path)
    out = tmp_path / "result.json"
    job = (f"cd {REPO} && {sys.executable} {REPO / 'tests' / 'nfs_job.py'} --mounts {lab.mounts[0]} "
           f"{lab.mounts[1]} --images {images} --workdir {tmp_path / 'job'} --out {out} --settle {settle}"
           + (" --kill" if kill else "") + (" --cut" if cut else ""))
    log = lab.run(job, leases=leases, timeout=280)
    assert out.exists(), log[-3000:]
    return json.loads(out.read_text())


def assert_exactly_once_and_identical(res: dict, images: Path) -> None:
    names = sorted(p.name for p in images.iterdir())
    assert sorted(res["records"]) == names, f"missing: {sorted(set(names) - set(res['records']))}"
    assert {n: r for n, r in res["records"].items() if r["dir"] != "outgoing" or not r["identical"]} == {}
    # Never claimed twice; a claim whose log line the kill cut off (between
    # the rename and the line) shows up as the survivor's adoption instead.
    claims = Counter(e[2] for e in res["events"] if e[1] == "claimed")
    adopted = {e[2] for e in res["events"] if e[1] == "adopted an item of a stopped instance"}
    assert set(claims.values()) == {1} and set(claims) | adopted == set(names)
    assert res["leftovers"]["incoming"] == []
    assert {k: v for k, v in res["work"].items() if v} == {}
    starting = [e for e in res["events"] if e[1] == "starting"]
    assert {e[4] for e in starting} == {"nfs4"} and all(e[5] for e in res["events"] if e[1] == "watching")


def node1_claims(res: dict) -> set[str]:
    """What the killed daemon had claimed, the only items anyone may adopt: its
    claim events, and what its work directory held right after the kill (a
    claim whose log line the kill cut off)."""
    return {e[2] for e in res["events"] if e[1] == "claimed" and e[0] == "node1"} | set(res["killed"]["held"])


def test_two_nfs_clients_and_a_kill_minus_9_convert_each_image_once(tmp_path, images):
    res = run_job(tmp_path, images, leases=True, kill=True)
    assert_exactly_once_and_identical(res, images)
    adopted = [e for e in res["events"] if e[1] == "adopted an item of a stopped instance"]
    assert all(e[0] == "node2" for e in adopted)
    # node1's unfinished claims, adopted by node2 without a restart, each once.
    assert len({e[2] for e in adopted}) == len(adopted)
    assert {e[2] for e in adopted} <= node1_claims(res)
    if adopted:
        first = min(ts(e[3]) for e in adopted) - res["killed"]["at"]
        print(f"NFSv4.2: first adoption {first:.1f} s after kill -9 (takeover_interval 2 s)")
    states = {i["instance"]: i["state"] for i in res["status"]["instances"]}
    assert states["node1"] == "dead" and states["node2"] == "alive"


def test_a_server_without_delegations_does_not_stop_claims(tmp_path, images):
    # nfsd grants no read delegations, so F_SETLEASE on the clients fails with
    # EAGAIN for ever; before, convd read that as "a writer has it open" and
    # claimed nothing (0 of 20 in 150 s).  Now the lease is a hint: each
    # file waits settle, then goes.
    settle = 1.0
    res = run_job(tmp_path, images, leases=False, kill=False, settle=settle)
    assert_exactly_once_and_identical(res, images)
    claimed_at = {e[2]: ts(e[3]) for e in res["events"] if e[1] == "claimed"}
    delays = sorted(claimed_at[n] - t for n, t in res["dropped"].items())
    print(f"claim delay after the rename, no delegations: median {delays[len(delays) // 2]:.1f} s, "
          f"max {delays[-1]:.1f} s (settle {settle} s, poll 0.2 s; UML is slow)")


def test_a_dead_node_claims_move_once_the_server_lease_on_its_lock_expires(tmp_path, images):
    # node1 is cut off the network, then its daemon killed: its NFS client
    # cannot release the lock, so the server keeps it for the lease time
    # (10 s in the lab, 90 s by default); node2 adopts after that, plus at
    # most one takeover_interval (2 s here), without a restart.
    res = run_job(tmp_path, images, leases=True, kill=True, cut=True)
    assert_exactly_once_and_identical(res, images)
    held = res["killed"]["held"]
    adopted = [e for e in res["events"] if e[1] == "adopted an item of a stopped instance"]
    assert {e[2] for e in adopted} <= node1_claims(res) and len({e[2] for e in adopted}) == len(adopted)
    if adopted:
        first = min(ts(e[3]) for e in adopted) - res["killed"]["at"]
        print(f"NFSv4.2 node loss (lease 10 s): first adoption {first:.1f} s after the cut, "
              f"its {len(held)} claims published {res['killed']['published_after']} s after")
