"""Fencing on one spool: a daemon whose instance lock was dropped under it (its node cut off
the shared filesystem longer than the lease) abandons what a survivor adopted, and rejoins.

The real partitions, on kernel NFSv4.2 and on CephFS, are tests/test_partition.py (slow).
Here the lock is dropped with ``flock(LOCK_UN)`` on the holder's own descriptor: on a local
filesystem nothing else can take a live process's lock away, and that is exactly what the NFS
server (lease expired) or the Ceph MDS (session evicted) does to a client that went quiet.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from convd.cluster import instance_lock_state
from convd.config import SpoolConfig
from convd.pipeline.layout import Claim
from convd.pipeline.spool import ClaimLost
from convd.pipeline.spool import Spool as SpoolOf
from convd.pipeline.takeover import TakeOver


def spool_of(root: Path, instance: str) -> SpoolOf:
    sp = SpoolOf(SpoolConfig(root=root, incoming=root / "incoming", work=root / "work",
                             outgoing=root / "outgoing", failed=root / "failed", instance=instance))
    sp.prepare()
    return sp


@contextlib.contextmanager
def two_nodes(root: Path) -> Iterator[tuple[SpoolOf, SpoolOf]]:
    """Two daemons' spools on one root, each holding its instance lock until the end."""
    node1, node2 = spool_of(root, "node1"), spool_of(root, "node2")
    try:
        yield node1, node2
    finally:
        node1.close()
        node2.close()


def claim_disk(sp: SpoolOf) -> Claim:
    """``incoming/disk`` (4 KiB) dropped and claimed by ``sp``."""
    (sp.incoming / "disk").write_bytes(b"x" * 4096)
    claim = sp.claim("disk")
    assert claim is not None
    return claim


def drop_lock(sp: SpoolOf) -> None:
    """What the filesystem does to a client cut off past its lease: its lock is gone, its fd stays."""
    assert sp._lock_fd is not None
    fcntl.flock(sp._lock_fd, fcntl.LOCK_UN)


def test_a_node_whose_lock_lapsed_abandons_what_a_survivor_adopted_and_rejoins(tmp_path):
    root = tmp_path / "spool"
    with two_nodes(root) as (node1, node2):
        claim = claim_disk(node1)
        node1.note_attempt(claim)
        claim.output.write_bytes(b"half-written")
        drop_lock(node1)

        adopted, stopped = TakeOver(node2).run()
        assert [c.name for c in adopted] == ["disk"] and stopped == ["node1"]
        theirs = node2.claims / "disk"
        assert json.loads((theirs / "item.json").read_bytes())["owner"] == "node2"

        # Back on the network: node1 finds out before any handoff, and touches nothing.
        with pytest.raises(ClaimLost):
            node1.fence(claim)
        assert node1.epoch == 1
        node1.discard_output(claim)
        node1.note_attempt(claim)
        assert (theirs / "source").read_bytes() == b"x" * 4096
        assert json.loads((theirs / "item.json").read_bytes())["owner"] == "node2"
        # A path that still leads node1 to the adopted item (an NFS client's cached
        # lookup of work/node1/disk) finds the adopter's name in it.
        assert not node1.owns(Claim(name="disk", dir=theirs, epoch=node1.epoch))

        # Rejoined without a restart: it holds its lock again, its new claims are its own,
        # and the survivor adopts nothing of it.
        assert instance_lock_state(node1.claims) == "held"
        (root / "incoming" / "disk2").write_bytes(b"y" * 4096)
        again = node1.claim("disk2")
        assert again is not None and again.epoch == 1
        node1.fence(again)
        assert TakeOver(node2).run() == ([], [])


def test_a_node_whose_lock_held_through_the_cut_keeps_its_claims(tmp_path):
    # Cut off for less than the lease: the server kept the lock, nothing is adopted.
    root = tmp_path / "spool"
    with two_nodes(root) as (node1, node2):
        claim = claim_disk(node1)
        assert TakeOver(node2).run() == ([], [])
        assert node1.keep_lock() is True and node1.epoch == 0
        node1.fence(claim)
        assert node1.owns(claim)


def test_a_staged_rbd_handoff_adopted_while_cut_off_is_left_to_the_adopter(tmp_path):
    # Recovery of an RBD publish renames an image in the Ceph pool, which the spool's
    # filesystem does not fence: the node that lost its lock must stop at its own fence
    # before any Ceph call.  No cluster is needed (nothing may reach one): the pool
    # settings name a ceph.conf that does not exist, so a call that got through would fail.
    import anyio

    from convd.config import Config
    from convd.pipeline.item import Item
    from convd.pipeline.layout import RECORD
    from convd.stages import rbd as rbd_stages

    root = tmp_path / "spool"
    with two_nodes(root) as (node1, node2):
        claim = claim_disk(node1)
        pending = {"dest": "outgoing", "final_name": "disk", "record": {"name": "disk"},
                   "rbd": {"pool": "images", "ceph_conf": str(tmp_path / "no-ceph.conf"), "user": "convd",
                           "keyring": "", "snapshot": "", "tmp": "convd-tmp.node1.disk", "name": "disk",
                           "id": "abc123"}}
        claim.pending = pending
        (claim.dir / RECORD).write_text(json.dumps(pending))
        drop_lock(node1)
        adopted, _ = TakeOver(node2).run()
        assert [c.name for c in adopted] == ["disk"]
        theirs = node2.claims / "disk"
        staged = (theirs / RECORD).read_bytes()

        # node1 back, led into the adopted directory by a cached lookup (NFS), runs its recovery.
        stale = Claim(name="disk", dir=theirs, epoch=claim.epoch, pending=pending)
        ctx = SimpleNamespace(spool=node1)  # finish_handoff reaches only the spool before its fence
        assert anyio.run(rbd_stages.finish_handoff, Item(claim=stale, cfg=Config()), ctx) is True

        assert (theirs / RECORD).read_bytes() == staged
        assert (theirs / "source").read_bytes() == b"x" * 4096
        assert not (root / "outgoing" / "disk.json").exists()


def test_a_lost_lock_begins_a_new_epoch_even_when_taking_it_again_fails(tmp_path, monkeypatch):
    # An evicted ceph-fuse: I/O through the held descriptor fails, and so does the
    # re-take (ESHUTDOWN until it is mounted again).  The epoch must move at once:
    # once the mount is back the re-take finds no old hold to compare with, and
    # a loss noticed only then was never noticed at all (a CI run saw node1
    # publish after its eviction without ever logging the loss).
    import errno
    import os

    import convd.pipeline.spool as spool_module

    sp = spool_of(tmp_path / "spool", "node1")
    try:
        claim = claim_disk(sp)
        held = sp._lock_fd
        assert held is not None
        sp._lock_fd = os.open(os.devnull, os.O_RDONLY)  # a write through it fails (EBADF), as on a dead mount
        os.close(held)
        real = spool_module.try_flock

        def dead_mount(path: Path) -> int | None:
            if path.name == ".lock":
                raise OSError(errno.ESHUTDOWN, "Cannot send after transport endpoint shutdown")
            return real(path)

        monkeypatch.setattr(spool_module, "try_flock", dead_mount)
        with pytest.raises(OSError):
            sp.keep_lock()
        assert sp.epoch == 1
        monkeypatch.setattr(spool_module, "try_flock", real)  # mounted again
        assert sp.keep_lock() is True
        assert sp.epoch == 1
        with pytest.raises(ClaimLost):
            sp.fence(claim)
    finally:
        sp.close()
