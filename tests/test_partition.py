"""A node cut off the shared filesystem while it converts, alive (issue 25, part 2).

On kernel NFSv4.2 (the User-Mode Linux lab of tests/sharedfs.py) node1's
link goes down inside the guest; on CephFS (a one-node cluster, one
ceph-fuse client per node) node1's client goes silent.  Its daemon is never
signalled.  Cut off longer than the filesystem's lease, its instance lock
lapses, the survivor adopts its claims, and when the link is back node1
must find out, abandon them untouched, and go on converting new drops
without a restart.  Cut off for less than the lease, nothing is adopted.

Each image ends exactly once in ``outgoing/``, identical to its source
(``qemu-img compare``); the figures (adoption and fencing times) are
printed for the report.  Needs root; ``make setup`` installs UML, nfsd and Ceph.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from convd_testing.sharedfs import CephCluster, UmlNfs, ceph_missing, uml_missing

from conftest import REPO, Daemon, MiB, images_equal, make_image, wait_for, write_config

# A UML boot or a Ceph cluster, a lease or an autoclose to wait out, and two batches.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(450)]

# nfsd's --lease-time in the lab (tests/sharedfs.py); the jobs' takeover_interval is 2 s.
NFS_LEASE = 10.0
LOCK_LOST = "this instance had lost its lock on the spool (cut off longer than the filesystem's lease?);" \
    " took it again: items claimed before are abandoned to whoever adopted them"
ABANDONED = "claim lost to another instance; abandoned without publishing, moving or removing anything"
ADOPTED = "adopted an item of a stopped instance"
# A claim whose rename went through but whose directory fsync failed when the cut began.
NOT_DURABLE = "claimed, but not durably; left in work/ for the next start or a take-over"
CLAIMED = ("claimed", NOT_DURABLE)


def ts(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def qcow2_set(d: Path, prefix: str, count: int, size: int) -> Path:
    d.mkdir()
    for i in range(count):
        make_image(d / f"{prefix}{i:02d}.tmp", "qcow2", size, seed=i + 11).rename(d / f"{prefix}{i:02d}")
    for p in d.glob("*.src.raw"):
        p.unlink()
    return d


@pytest.fixture(scope="module")
def nfs_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("the NFS lab needs root (User-Mode Linux with nfsd, network namespaces)")
    why = uml_missing()
    if why:
        pytest.fail(f"cannot run the NFS partition tests: {why}")
    d = tmp_path_factory.mktemp("partition-images")
    # 16-32 MiB each: at node1's 2 MiB/s the cut finds it mid-conversion.
    return qcow2_set(d / "first", "disk", 8, 16 * MiB), qcow2_set(d / "later", "late", 3, 2 * MiB)


def run_nfs(tmp_path: Path, images: tuple[Path, Path], seconds: float) -> dict:
    lab = UmlNfs(tmp_path)
    out = tmp_path / "result.json"
    job = (f"cd {REPO} && {sys.executable} {REPO / 'tests' / 'partition_job.py'} --mounts {lab.mounts[0]} "
           f"{lab.mounts[1]} --images {images[0]} --later {images[1]} --workdir {tmp_path / 'job'} "
           f"--out {out} --partition {seconds}")
    log = lab.run(job, timeout=420)
    assert out.exists(), log[-3000:]
    return json.loads(out.read_text())


def assert_each_once(res: dict, names: set[str]) -> None:
    """Every image in outgoing/ once, identical, nothing else published or failed."""
    assert set(res["records"]) == names, f"missing: {sorted(names - set(res['records']))}"
    assert {n: r for n, r in res["records"].items() if r["dir"] != "outgoing" or not r["identical"]} == {}
    assert res["outgoing"] == sorted(names | {f"{n}.json" for n in names})
    assert res["failed"] == []
    claims = Counter(e[2] for e in res["events"] if e[1] in CLAIMED)
    adopted = Counter(e[2] for e in res["events"] if e[1] == ADOPTED)
    assert set(claims.values()) == {1} and set(adopted.values()) <= {1} and set(claims) == names
    converted = Counter(e[2] for e in res["events"] if e[1] == "converted")
    assert converted == Counter(dict.fromkeys(names, 1)), "an image published by both nodes"
    assert res["leftovers"]["incoming"] == []
    assert {k: v for k, v in res["work"].items() if v} == {}


def node1_rejoined(res: dict, later: Path) -> None:
    """node1 never restarted, and alone took everything dropped after the link came back."""
    assert res["cut"]["node1_alive"] and res["node1_alive_at_end"]
    assert [e for e in res["events"] if e[0] == "node1" and e[1] == "starting"][1:] == []
    late = {p.name for p in later.iterdir()}
    assert {e[2] for e in res["events"] if e[0] == "node1" and e[1] == "converted"} >= late


def test_nfs_node_cut_off_past_the_lease_loses_its_claims_and_rejoins(tmp_path, nfs_images):
    seconds = NFS_LEASE * 2.5
    res = run_nfs(tmp_path, nfs_images, seconds)
    names = {p.name for d in nfs_images for p in d.iterdir()}
    assert res["first_batch_done"] and res["later_done"], res["events"][-20:]
    assert_each_once(res, names)
    node1_rejoined(res, nfs_images[1])
    adopted = [e for e in res["events"] if e[1] == ADOPTED]
    # node2 adopted while node1 was away, and only what node1 held.
    assert adopted and all(e[0] == "node2" for e in adopted)
    assert {e[2] for e in adopted} <= set(res["cut"]["held"])
    assert all(res["cut"]["at"] < ts(e[3]) < res["cut"]["restored_at"] for e in adopted)
    # node1 published none of them: the adopter did.
    converted_by = {e[2]: e[0] for e in res["events"] if e[1] == "converted"}
    assert {converted_by[e[2]] for e in adopted} == {"node2"}
    lost = [e for e in res["events"] if e[0] == "node1" and e[1] == LOCK_LOST]
    assert len(lost) == 1
    fenced = ts(lost[0][3]) - res["cut"]["restored_at"]
    first = min(ts(e[3]) for e in adopted) - res["cut"]["at"]
    behaviour = Counter(e[1] for e in res["events"] if e[0] == "node1" and e[6] in ("warning", "error"))
    print(f"\nNFSv4.2 cut {seconds:.0f} s (lease {NFS_LEASE:.0f} s): node2 adopted {len(adopted)} of the "
          f"{len(res['cut']['held'])} claims node1 held, first {first:.1f} s after the cut; node1 found its lock "
          f"lost {fenced:.1f} s after the link came back; node1 logged {dict(behaviour)}")


def test_nfs_node_cut_off_within_the_lease_keeps_its_claims(tmp_path, nfs_images):
    seconds = NFS_LEASE * 0.4
    res = run_nfs(tmp_path, nfs_images, seconds)
    names = {p.name for d in nfs_images for p in d.iterdir()}
    assert res["first_batch_done"] and res["later_done"], res["events"][-20:]
    assert_each_once(res, names)
    node1_rejoined(res, nfs_images[1])
    assert [e for e in res["events"] if e[1] in (ADOPTED, LOCK_LOST, ABANDONED)] == []
    converted_by = {e[2]: e[0] for e in res["events"] if e[1] == "converted"}
    assert {converted_by[n] for n in res["cut"]["held"]} == {"node1"}
    print(f"\nNFSv4.2 cut {seconds:.0f} s (lease {NFS_LEASE:.0f} s): nothing adopted; node1 finished its "
          f"{len(res['cut']['held'])} claims itself")



# -- CephFS ---------------------------------------------------------------------------------

# The file system's session_timeout and session_autoclose (seconds; 60 and 300 by default):
# the MDS evicts a client silent for session_autoclose, releasing its locks and caps and
# blocklisting its address on the OSDs.
# Ceph refuses a session_timeout under 30 s.
CEPH_SESSION_TIMEOUT, CEPH_AUTOCLOSE = 30, 35
CEPH_SHORT_CUT = 5.0
TAKEOVER = 2.0


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    if os.geteuid() != 0:
        pytest.skip("CephFS tests need root (ceph daemons and FUSE mounts)")
    why = ceph_missing()
    if why:
        pytest.fail(f"cannot run the CephFS partition tests: {why}")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph-partition"), clients=2, memstore_bytes=3 << 30)
    cluster.start()
    try:
        cluster.ceph("fs", "set", "cephfs", "session_timeout", str(CEPH_SESSION_TIMEOUT))
        cluster.ceph("fs", "set", "cephfs", "session_autoclose", str(CEPH_AUTOCLOSE))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ceph_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ceph-partition-images")
    return qcow2_set(d / "first", "disk", 8, 16 * MiB), qcow2_set(d / "later", "late", 3, 2 * MiB)


def _config(tmp_path: Path, name: str, root: Path, **convert: Any) -> Path:
    (tmp_path / name).mkdir()
    return write_config(
        tmp_path / name,
        spool={"root": str(root), "instance": name, "takeover_interval": TAKEOVER},
        watch={"settle": 1.0, "rescan_interval": "5s"},
        convert={"max_workers": 2, "retry_backoff": 0.2, **convert},
        limits={"workspace": "1GiB", "min_free": "64MiB"},
        checksum={"algorithms": []},
        log={"format": "json", "level": "info"},
    )


def _drop(src: Path, incoming: Path) -> None:
    tmp = incoming / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.rename(tmp, incoming / src.name)


def _records(root: Path) -> set[str]:
    return {n[:-5] for d in ("outgoing", "failed") for n in os.listdir(root / d)
            if n.endswith(".json") and not n.startswith(".")}


def _items(root: Path, instance: str) -> list[str]:
    return sorted(n for n in os.listdir(root / "work" / instance) if not n.startswith("."))


def _answers(path: Path, timeout: float = 5.0) -> str:
    """What a fresh process gets listing ``path``: "ok", or its error (a silent client's
    mount must not hang the test)."""
    p = subprocess.run(["timeout", "-s", "KILL", str(timeout), sys.executable, "-c",
                        f"import os\ntry:\n os.listdir({str(path)!r}); print('ok')\n"
                        "except OSError as e: print(e)"], capture_output=True, text=True, check=False)
    return p.stdout.strip() or f"no answer within {timeout:.0f} s"


def run_ceph(ceph: CephCluster, tmp_path: Path, images: tuple[Path, Path], *, past_lease: bool) -> dict:
    spool = f"spool-{time.monotonic_ns()}"
    roots = [m / spool for m in ceph.mounts]
    for d in ("incoming", "work", "outgoing", "failed"):
        (roots[0] / d).mkdir(parents=True)
    # node1 converts slowly, so the cut finds it mid-conversion.
    daemons = [Daemon(_config(tmp_path, "node1", roots[0], rate_limit="1MiB")),
               Daemon(_config(tmp_path, "node2", roots[1]))]
    res: dict[str, Any] = {}
    try:
        for d in daemons:
            d.wait_ready(timeout=60)
        first = sorted(images[0].iterdir())

        def drop_first() -> None:
            for src in first:
                _drop(src, roots[1] / "incoming")  # through node2's client: it stays up

        # Watched while the producer drops, and cut at once, not after the drops: node1
        # could finish what it holds meanwhile and find nothing left at its next look
        # (a CI run timed out so).
        dropping = threading.Thread(target=drop_first, daemon=True)
        dropping.start()
        # Listed through node1's own client just before it goes silent: through node2's, the
        # listing would wait for node1 to give up its caps on the directory, i.e. for its eviction.
        held = wait_for(lambda: _items(roots[0], "node1") or None, timeout=120, interval=0.05,
                        what="node1 to hold a claim")
        ceph.silence(0)
        cut = time.time()
        if past_lease:
            wait_for(lambda: any(e.get("event") == ADOPTED for e in daemons[1].events()) or None,
                     timeout=120, interval=0.2, what="node2 to adopt node1's claims")
            time.sleep(2 * TAKEOVER)
        else:
            time.sleep(CEPH_SHORT_CUT)
        ceph.resume(0)
        restored = time.time()
        # Evicted, a ceph-fuse client stays cut off (blocklisted); it is remounted, as
        # an operator or a mount unit would, while the daemon on it keeps running.
        answers = [_answers(roots[0] / "work")]
        while answers[-1].startswith("no answer") and time.time() - restored < 20:
            answers.append(_answers(roots[0] / "work"))
        res["mount_after_resume"] = answers
        if answers[-1] != "ok":
            ceph.remount(0)
            res["remounted_at"] = time.time()
        res["cut"] = {"at": cut, "restored_at": restored, "held": held, "node1_alive": daemons[0].proc.poll() is None}
        dropping.join(timeout=120)  # a create in incoming/ may have waited for node1's caps
        assert not dropping.is_alive(), "the producer's drops did not finish"
        names = {src.name for src in first}
        wait_for(lambda: _records(roots[1]) >= names or None, timeout=240, interval=0.5,
                 what="every image of the first batch to have a record")
        res["first_batch_done"] = True
        assert daemons[1].stop(timeout=60) == 0, daemons[1].log()[-3000:]
        later = sorted(images[1].iterdir())
        for src in later:
            _drop(src, roots[0] / "incoming")
        wait_for(lambda: _records(roots[1]) >= {s.name for s in later} or None, timeout=120, interval=0.5,
                 what="node1 to take the drops made after it came back")
        res["later_done"] = True
        res["node1_alive_at_end"] = daemons[0].proc.poll() is None
        res["exit_codes"] = [daemons[0].stop(timeout=60), daemons[1].proc.returncode]
        wait_for(lambda: not any(_items(roots[1], i) for i in ("node1", "node2")) or None, timeout=60,
                 interval=0.5, what="work/ to empty")
    finally:
        for d in daemons:
            # Stopped, killed past the timeout, or already dead: its log is closed either way
            # (a daemon that died left it open, and another test on the worker got the warning).
            d.stop(timeout=10, strict=False)
    root = roots[1]
    sources = {p.name: p for d in images for p in d.iterdir()}
    res["records"] = {}
    for name in sorted(_records(root)):
        d = "outgoing" if (root / "outgoing" / f"{name}.json").exists() else "failed"
        rec = json.loads((root / d / f"{name}.json").read_bytes())
        res["records"][name] = {"dir": d, "status": rec.get("status"), "identical": d == "outgoing" and images_equal(
            sources[name], "qcow2", root / "outgoing" / name, "raw")}
    res["outgoing"] = sorted(os.listdir(root / "outgoing"))
    res["failed"] = sorted(os.listdir(root / "failed"))
    res["leftovers"] = {"incoming": sorted(os.listdir(root / "incoming"))}
    res["work"] = {i: _items(root, i) for i in os.listdir(root / "work")
                   if (root / "work" / i).is_dir() and not i.startswith(".")}
    res["events"] = [[f"node{i}", e.get("event"), e.get("item"), e.get("timestamp"), e.get("filesystem"),
                      e.get("polling"), e.get("level")] for i, d in enumerate(daemons, start=1) for e in d.events()]
    shutil.rmtree(root, ignore_errors=True)
    return res


def test_cephfs_node_silent_past_session_autoclose_is_evicted_and_rejoins(ceph, ceph_images, tmp_path):
    res = run_ceph(ceph, tmp_path, ceph_images, past_lease=True)
    names = {p.name for d in ceph_images for p in d.iterdir()}
    assert_each_once(res, names)
    node1_rejoined(res, ceph_images[1])
    adopted = [e for e in res["events"] if e[1] == ADOPTED]
    assert adopted and all(e[0] == "node2" for e in adopted)
    # Only node1's claims (it may have claimed one more between the listing and the cut).
    assert {e[2] for e in adopted} <= {e[2] for e in res["events"] if e[0] == "node1" and e[1] in CLAIMED}
    assert all(res["cut"]["at"] < ts(e[3]) < res["cut"]["restored_at"] for e in adopted)
    converted_by = {e[2]: e[0] for e in res["events"] if e[1] == "converted"}
    assert {converted_by[e[2]] for e in adopted} == {"node2"}
    lost = [e for e in res["events"] if e[0] == "node1" and e[1] == LOCK_LOST]
    assert len(lost) == 1
    back = res.get("remounted_at", res["cut"]["restored_at"])
    behaviour = Counter(e[1] for e in res["events"] if e[0] == "node1" and e[6] in ("warning", "error"))
    print(f"\nCephFS silent client (session_timeout {CEPH_SESSION_TIMEOUT} s, autoclose {CEPH_AUTOCLOSE} s): "
          f"node2 adopted {len(adopted)} of the {len(res['cut']['held'])} claims node1 held, first "
          f"{min(ts(e[3]) for e in adopted) - res['cut']['at']:.1f} s after the cut; node1's mount after SIGCONT: "
          f"{res['mount_after_resume'][-1]!r}{' (remounted)' if 'remounted_at' in res else ''}; node1 found its lock "
          f"lost {ts(lost[0][3]) - back:.1f} s after its mount was back; node1 logged {dict(behaviour)}")


def test_cephfs_node_silent_within_the_session_timeout_keeps_its_claims(ceph, ceph_images, tmp_path):
    res = run_ceph(ceph, tmp_path, ceph_images, past_lease=False)
    names = {p.name for d in ceph_images for p in d.iterdir()}
    assert_each_once(res, names)
    node1_rejoined(res, ceph_images[1])
    assert "remounted_at" not in res and res["mount_after_resume"][-1] == "ok"
    assert [e for e in res["events"] if e[1] in (ADOPTED, LOCK_LOST, ABANDONED)] == []
    claimed_by = {e[2]: e[0] for e in res["events"] if e[1] == "claimed"}
    converted_by = {e[2]: e[0] for e in res["events"] if e[1] == "converted"}
    assert {n for n, who in converted_by.items() if who == "node2"} & {n for n, who in claimed_by.items()
                                                                       if who == "node1"} == set()
    print(f"\nCephFS silent client {CEPH_SHORT_CUT:.0f} s: nothing adopted; node1 finished its "
          f"{len(res['cut']['held'])} claims itself")
