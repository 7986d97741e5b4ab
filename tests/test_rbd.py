"""Publishing straight into Ceph RBD (``[publish] to = "rbd"``) against a real one-node cluster.

The cluster is convd_testing/sharedfs.py's (mon, mgr, one memstore OSD on
127.0.0.1) without a file system, one per module: it takes about half a
minute before ``ceph df`` reports a new pool.  Needs root, the Ceph
packages and qemu's rbd driver (``make sharedfs-deps`` installs them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from convd_testing.sharedfs import CephCluster, ceph_missing

from conftest import Daemon, MiB, Spool, convd_bin, make_image, run, wait_for, write_config

POOL = "images"


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    if os.geteuid() != 0:
        pytest.skip("RBD tests need root (ceph daemons)")
    why = ceph_missing()
    if why:
        pytest.fail(f"cannot run the RBD tests: {why}")
    if not any(Path(f"/usr/lib/{d}/qemu/block-rbd.so").exists() for d in os.listdir("/usr/lib")):
        pytest.fail("qemu's rbd driver is missing: run `make sharedfs-deps` (apt-get install qemu-block-extra)")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"), clients=0, memstore_bytes=3 << 30)
    cluster.start()
    try:
        cluster.rbd_pool(POOL)
        # A killed writer's watch keeps its image from removal until the OSD
        # drops it (30 s by default): shorter here, for the kill test's sake.
        cluster.ceph("config", "set", "osd", "osd_client_watch_timeout", "5")
        yield cluster
    finally:
        cluster.stop()


def rbd(ceph: CephCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("rbd", "--conf", str(ceph.conf), "--id", "admin", *args, check=check)


def images(ceph: CephCluster, pool: str = POOL) -> list[str]:
    return json.loads(rbd(ceph, "ls", "--format", "json", pool).stdout)


def qemu_spec(ceph: CephCluster, name: str, pool: str = POOL) -> str:
    return f"rbd:{pool}/{name}:id=admin:conf={ceph.conf}"


def used_bytes(ceph: CephCluster, name: str) -> tuple[int, int]:
    """``rbd du``: (provisioned, used) bytes of the image itself (its snapshot shares the data)."""
    du = json.loads(rbd(ceph, "du", "--format", "json", f"{POOL}/{name}").stdout)
    head = next(i for i in du["images"] if "snapshot" not in i)
    return head["provisioned_size"], head["used_size"]


def config(tmp_path: Path, ceph: CephCluster, pool: str = POOL, **sections: dict[str, Any]) -> Path:
    return write_config(
        tmp_path,
        publish={"to": "rbd"},
        **{"publish.rbd": {"pool": pool, "ceph_conf": str(ceph.conf), "user": "admin"}},
        **sections,
    )


@pytest.fixture
def daemon(tmp_path: Path, ceph: CephCluster,
           daemon_factory: Callable[..., Daemon]) -> Callable[..., Daemon]:
    def make(**sections: dict[str, Any]) -> Daemon:
        return daemon_factory(config(tmp_path, ceph, **sections))
    return make


@pytest.mark.slow
def test_every_format_lands_in_the_pool_identical_and_thin(tmp_path: Path, ceph: CephCluster, spool: Spool,
                                                            daemon: Callable[..., Daemon]) -> None:
    fmts = {"qcow2": None, "vmdk": None, "vdi": None, "vpc": "subformat=fixed", "vhdx": None, "raw": None}
    srcs = {f: make_image(tmp_path / f"src-{f}.{f}", f, 32 * MiB, opts=o, seed=i)
            for i, (f, o) in enumerate(fmts.items())}
    fsid = ceph.ceph("fsid").strip()
    d = daemon()
    for f, src in srcs.items():
        spool.drop(src, f"img-{f}")
    for f, src in srcs.items():
        name = f"img-{f}"
        rec = spool.wait_record(name, timeout=120)
        assert rec["status"] == "converted", json.dumps(rec)
        assert rec["target"]["location"] == f"rbd://{fsid}/{POOL}/{name}/snap"
        # (A VHD keeps its CHS-rounded size: qemu-img made the source that way.)
        vsize = rec["source"]["virtual_size"]
        assert rec["target"]["virtual_size"] == rec["target"]["size"] == vsize
        # The checksum was read back from RBD: the image's bytes, as a consumer reads them.
        exported = run("sh", "-c", f"rbd --conf {ceph.conf} --id admin export --no-progress {POOL}/{name} - "
                                   "| sha256sum").stdout.split()[0]
        assert rec["target"]["checksums"]["sha256"] == exported
        assert run("qemu-img", "compare", "-f", f, "-F", "raw", src, qemu_spec(ceph, name),
                   check=False).returncode == 0, f
        provisioned, used = used_bytes(ceph, name)
        assert provisioned == vsize
        # About the data (a third of the disk, in 4 MiB objects), not the virtual size.
        assert used <= 24 * MiB, (f, used)
        snaps = json.loads(rbd(ceph, "snap", "ls", "--format", "json", f"{POOL}/{name}").stdout)
        assert [(s["name"], s["protected"]) for s in snaps] == [("snap", "true")]
        assert not (spool.outgoing / name).exists()  # no image bytes in outgoing/
    assert not [n for n in images(ceph) if n.startswith(".convd-tmp.")]
    assert d.stop() == 0
    assert spool.work_files() == []


@pytest.mark.slow
@pytest.mark.parametrize("algorithms", [["md5", "sha512", "sha256"], []])
def test_checksums_are_each_configured_algorithm_of_the_whole_image_and_a_hidden_qcow2_never_lands(
        tmp_path: Path, ceph: CephCluster, spool: Spool, daemon: Callable[..., Daemon],
        algorithms: list[str]) -> None:
    # 96 MiB with data, written zeros and holes after the first 16 MiB and a
    # random tail: only the data crosses the network, the holes are hashed as zeros.
    src = make_image(tmp_path / "sums.qcow2", "qcow2", 96 * MiB, seed=7)
    inner = make_image(tmp_path / "inner.qcow2", "qcow2", 4 * MiB)
    nested = tmp_path / "nested.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", inner, nested)  # guest content: a qcow2
    name, bad = f"sums{len(algorithms)}", f"nested{len(algorithms)}"  # one pool for the module
    d = daemon(checksum={"algorithms": algorithms})
    spool.drop(src, name)
    spool.drop(nested, bad)
    rec = spool.wait_record(name, timeout=120)
    assert rec["status"] == "converted", rec
    assert rec["target"]["size"] == rec["target"]["virtual_size"] == 96 * MiB
    assert sorted(rec["target"]["checksums"]) == sorted(algorithms)
    for algo, digest in rec["target"]["checksums"].items():
        exported = run("sh", "-c", f"rbd --conf {ceph.conf} --id admin export --no-progress {POOL}/{name} - "
                                   f"| openssl dgst -{algo} -r").stdout.split()[0]
        assert digest == exported, algo
    # With or without a checksum, a disk whose content is a qcow2 is refused
    # (here by the source's own checks, before any write into the pool).
    rec = spool.wait_record(bad, timeout=120)
    assert rec["error"]["code"] == "unsafe_image" and "qcow2" in rec["error"]["message"], rec
    assert bad not in images(ceph)
    assert not [n for n in images(ceph) if n.startswith(".convd-tmp.")]
    assert d.stop() == 0


@pytest.mark.slow
def test_kill_mid_write_never_publishes_the_temporary_image_and_restart_finishes_once(
        tmp_path: Path, ceph: CephCluster, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    src = make_image(tmp_path / "big.qcow2", "qcow2", 64 * MiB)
    # qemu-img's own rate limit keeps the write going long enough to be cut.
    slow = config(tmp_path, ceph, convert={"retry_backoff": 0.2}, **{"convert.qemu_args": {"qcow2": ["-r", "4M"]}})
    d = daemon_factory(slow)
    spool.drop(src, "killed")

    def temporary() -> list[str]:
        return [n for n in images(ceph) if n.startswith(".convd-tmp.test+")]
    tmp = wait_for(temporary, timeout=60, what="the temporary image")[0]
    assert tmp.endswith("+killed")
    wait_for(lambda: used_bytes(ceph, tmp)[1] > 0, timeout=60, what="bytes in the temporary image")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert "killed" not in images(ceph)
    assert spool.record("killed") is None

    fast = config(tmp_path, ceph)
    d2 = daemon_factory(fast)
    rec = spool.wait_record("killed", timeout=120)
    assert rec["status"] == "converted"
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, qemu_spec(ceph, "killed"),
               check=False).returncode == 0
    # Removed once the OSD has dropped the killed writer's watch.
    wait_for(lambda: not temporary(), timeout=60, what="the temporary image's removal")
    assert d2.stop() == 0
    assert sorted(p.name for p in spool.outgoing.iterdir()) == ["killed.json"]
    assert images(ceph).count("killed") == 1
    swept = [e for e in d2.events() if e.get("event") == "removed temporary images of unfinished attempts"]
    assert swept and swept[0]["images"] == [tmp]


@pytest.mark.slow
def test_a_name_the_pool_holds_is_a_conflict_and_the_image_is_untouched(
        tmp_path: Path, ceph: CephCluster, spool: Spool, daemon: Callable[..., Daemon]) -> None:
    rbd(ceph, "create", "--size", "4M", f"{POOL}/taken")
    before = json.loads(rbd(ceph, "info", "--format", "json", f"{POOL}/taken").stdout)
    src = make_image(tmp_path / "t.qcow2", "qcow2", 8 * MiB)
    original = src.read_bytes()
    d = daemon()
    spool.drop(src, "taken")
    spool.drop(src, "a@b")  # '@' names a snapshot to every RBD tool
    rec = spool.wait_record("taken", timeout=60)
    assert rec["status"] == "failed" and rec["error"]["code"] == "name_conflict", rec
    assert f"{POOL}/taken already exists in the Ceph pool" in rec["error"]["message"]
    assert (spool.failed / "taken").read_bytes() == original
    after = json.loads(rbd(ceph, "info", "--format", "json", f"{POOL}/taken").stdout)
    assert (after["id"], after["size"]) == (before["id"], before["size"])
    rec = spool.wait_record("a@b", timeout=60)
    assert rec["error"]["code"] == "name_conflict" and "RBD cannot hold" in rec["error"]["message"], rec
    assert not [n for n in images(ceph) if n.startswith(".convd-tmp.")]
    assert d.stop() == 0


@pytest.mark.slow
def test_a_pool_quota_that_could_never_hold_the_image_fails_clearly(
        tmp_path: Path, ceph: CephCluster, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    ceph.rbd_pool("small")
    ceph.ceph("osd", "pool", "set-quota", "small", "max_bytes", str(8 * MiB))
    src = make_image(tmp_path / "q.qcow2", "qcow2", 64 * MiB)  # about 21 MiB of data
    d = daemon_factory(config(tmp_path, ceph, pool="small"))
    spool.drop(src, "toobig")
    rec = spool.wait_record("toobig", timeout=60)
    assert rec["error"]["code"] == "too_large", rec
    assert "Ceph pool 'small'" in rec["error"]["message"] and "quota" in rec["error"]["message"]
    assert (spool.failed / "toobig").exists()
    assert images(ceph, "small") == []
    assert d.stop() == 0


@pytest.mark.slow
def test_a_missing_pool_is_a_clear_record_in_cephs_words(
        tmp_path: Path, ceph: CephCluster, spool: Spool, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(config(tmp_path, ceph, pool="nopool"))
    spool.drop(make_image(tmp_path / "m.raw", "raw", 4 * MiB), "nopool-item")
    rec = spool.wait_record("nopool-item", timeout=60)
    assert rec["error"]["code"] == "convert_failed", rec
    assert "nopool" in rec["error"]["message"] and "ENOENT" in rec["error"]["message"]
    assert rec["attempts"] == 1  # not a thing a retry fixes
    assert (spool.failed / "nopool-item").exists()
    assert d.stop() == 0


@pytest.mark.parametrize(("sections", "message"), [
    ({"publish": {"to": "rbd"}, "convert": {"target_format": "qcow2"}},
     "[publish] to: 'rbd' publishes raw images"),
    ({"publish": {"to": "ceph"}}, "[publish] to: 'ceph' is not one of directory, rbd"),
    ({"publish.rbd": {"pool": "a/b"}}, "[publish.rbd] pool: 'a/b' must be"),
    ({"publish.rbd": {"user": "client.convd"}}, "[publish.rbd] user: 'client.convd' must be"),
    ({"publish.rbd": {"snapshot": "s@1"}}, "[publish.rbd] snapshot: 's@1' must be"),
    ({"publish.rbd": {"size": 1}}, "unknown key [publish.rbd] size"),
])
def test_check_config_refuses_an_impossible_rbd_publish_naming_the_key(
        tmp_path: Path, sections: dict[str, dict[str, Any]], message: str) -> None:
    cfg = write_config(tmp_path, **sections)
    res = run(convd_bin(), "check-config", "-c", cfg, check=False)
    assert res.returncode == 1
    assert message in res.stderr + res.stdout
