"""A handoff cut short by a crash at any step, then finished by ANOTHER instance that adopts it.

On CephFS, NFS and GlusterFS ``renameat2(RENAME_NOREPLACE)`` is EINVAL, so
every move to ``outgoing/`` or ``failed/`` is ``link()`` + ``unlink()``: a
crash can leave the image under both names.  The adopter's own move then
meets an existing target, and for that the kernel's VFS answers ``EEXIST``
before the filesystem is asked, on ext4 as on CephFS.  So these tests run
the dying instance with the fallback forced (``durable._renameat2 = None``,
the path convd takes whenever renameat2 says EINVAL) and the adopter with
the real renameat2, as on a shared filesystem, and stop the dying instance
before each link, unlink, rename and rmdir of publish, quarantine and clean-up (a
``Killed`` raised in place of the call: nothing after it runs, as with
``kill -9``).  A second instance then adopts the item through its real
take-over and finishes it as the daemon does; each item must end exactly
once: in ``outgoing/`` with its record, or back to be converted with
``outgoing/NAME`` still free, never also rejected as a name conflict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from convd import durable
from convd.config import SpoolConfig
from convd.pipeline.layout import SOURCE, Claim
from convd.pipeline.spool import Spool
from convd.pipeline.takeover import TakeOver

NAME = "img"
IMAGE = b"converted image bytes\n" * 1000
ORIGINAL = b"original upload\n" * 1000
RECORD = {"schema": 1, "name": NAME, "status": "converted"}
REJECT = {"schema": 1, "name": NAME, "status": "failed", "error": {"code": "corrupt_image"}}


class Killed(BaseException):
    """The dying instance stops here; a BaseException so no ``except Exception`` tidies up."""


def spool(root: Path, instance: str) -> Spool:
    sp = Spool(SpoolConfig(root=root, incoming=root / "incoming", work=root / "work",
                           outgoing=root / "outgoing", failed=root / "failed", instance=instance))
    sp.prepare()
    return sp


@contextmanager
def die_at(step: int | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Count link/unlink/rename/rmdir calls; raise ``Killed`` instead of call number ``step``."""
    calls: list[str] = []
    with monkeypatch.context() as m:
        # Its moves take the shared-filesystem path: renameat2 said EINVAL
        # (the target did not exist), so hard link, then unlink.
        m.setattr(durable, "_renameat2", None)
        for fn in ("link", "unlink", "rename", "rmdir"):
            real: Callable[..., Any] = getattr(os, fn)

            def wrapped(*a: Any, _real: Callable[..., Any] = real, _fn: str = fn, **kw: Any) -> Any:
                if step is not None and len(calls) == step:
                    raise Killed(f"{_fn}{a}")
                calls.append(f"{_fn} {os.path.basename(a[0])} -> {os.path.basename(a[1]) if len(a) > 1 else ''}")
                return _real(*a, **kw)

            m.setattr(os, fn, wrapped)
        yield calls


def publish(sp: Spool, claim: Claim) -> None:
    """What publish + clean-up do for a converted item (convd/stages/publish.py, cleanup.py)."""
    claim.output.write_bytes(IMAGE)
    sp.stage_handoff(claim, "outgoing", NAME, "output", RECORD)
    sp.complete_handoff(claim)
    sp.remove_claim(claim)


def quarantine(sp: Spool, claim: Claim) -> None:
    """What quarantine does for a rejected item (convd/stages/cleanup.py)."""
    claim.output.write_bytes(b"partial output")
    sp.discard_output(claim)
    sp.stage_handoff(claim, "failed", sp.free_failed_name(NAME), SOURCE, REJECT)
    sp.complete_handoff(claim)
    sp.remove_claim(claim)


def finish_as_survivor(sp: Spool) -> list[Claim]:
    """The survivor's take-over, then what its runner does with each adopted item:
    finish a staged handoff (runner.finish_handoff), or return it to be converted again."""
    adopted, _stopped = TakeOver(sp).run()
    rerun = []
    for claim in adopted:
        if claim.pending is not None:
            sp.complete_handoff(claim)  # a FileExistsError here becomes a name_conflict reject
            sp.remove_claim(claim)
        else:
            rerun.append(claim)
    return rerun


def steps_of(handoff: Callable[[Spool, Claim], None], root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sp = spool(root, "node1")
    (root / "incoming" / NAME).write_bytes(ORIGINAL)
    claim = sp.claim(NAME)
    assert claim is not None
    with die_at(None, monkeypatch) as calls:
        handoff(sp, claim)
    sp.close()
    return calls


def run_crash_at(step: int, handoff: Callable[[Spool, Claim], None], root: Path,
                 monkeypatch: pytest.MonkeyPatch) -> list[Claim]:
    dying = spool(root, "node1")
    (root / "incoming" / NAME).write_bytes(ORIGINAL)
    claim = dying.claim(NAME)
    assert claim is not None
    with pytest.raises(Killed), die_at(step, monkeypatch):
        handoff(dying, claim)
    dying.close()  # its lock goes with the process
    survivor = spool(root, "node2")
    try:
        return finish_as_survivor(survivor)
    finally:
        survivor.close()


def listing(root: Path, d: str) -> list[str]:
    return sorted(n for n in os.listdir(root / d) if not n.startswith("."))


def work_items(root: Path) -> list[str]:
    return sorted(f"{i}/{n}" for i in os.listdir(root / "work") if (root / "work" / i).is_dir()
                  for n in os.listdir(root / "work" / i) if not n.startswith("."))


@pytest.mark.parametrize(("handoff", "dest", "delivered", "record"), [
    (publish, "outgoing", IMAGE, RECORD),
    (quarantine, "failed", ORIGINAL, REJECT),
], ids=["publish", "quarantine"])
def test_a_handoff_killed_at_any_step_is_finished_by_another_instance_exactly_once(
        tmp_path, monkeypatch, handoff, dest, delivered, record):
    steps = steps_of(handoff, tmp_path / "dry", monkeypatch)
    assert any(s.startswith("link ") for s in steps), steps  # the link+unlink fallback really runs
    for step in range(len(steps)):
        root = tmp_path / f"kill-at-{step}"
        rerun = run_crash_at(step, handoff, root, monkeypatch)
        where = f"killed before {steps[step]!r}"
        assert listing(root, "failed" if dest == "outgoing" else "outgoing") == [], where
        if rerun:
            # Killed before the record was staged: back to be run again from
            # the source, with the destination's name still free for that.
            assert [c.name for c in rerun] == [NAME] and rerun[0].dropped.read_bytes() == ORIGINAL, where
            assert listing(root, dest) == [], where
            assert not rerun[0].output.exists(), where
        else:
            assert listing(root, dest) == [NAME, f"{NAME}.json"], where
            assert (root / dest / NAME).read_bytes() == delivered, where
            assert json.loads((root / dest / f"{NAME}.json").read_bytes()) == record, where
            assert work_items(root) == [], where


def killed_between_link_and_unlink(root: Path) -> None:
    """node1 staged its record, linked the image into outgoing/, and died."""
    dying = spool(root, "node1")
    (root / "incoming" / NAME).write_bytes(ORIGINAL)
    claim = dying.claim(NAME)
    assert claim is not None
    claim.output.write_bytes(IMAGE)
    dying.stage_handoff(claim, "outgoing", NAME, "output", RECORD)
    os.link(claim.output, root / "outgoing" / NAME)
    dying.close()


def assert_published_once(root: Path) -> None:
    assert listing(root, "failed") == []
    assert (root / "outgoing" / NAME).read_bytes() == IMAGE
    assert json.loads((root / "outgoing" / f"{NAME}.json").read_bytes()) == RECORD
    assert work_items(root) == []


def test_a_cut_short_move_finished_while_the_adopter_looks_is_published_not_rejected(tmp_path, monkeypatch):
    """The killed instance linked the image into outgoing/; the work/ name goes
    between the adopter's look at it and its move.  A source that is gone and
    a destination that is our own image are a finished move, not a name taken
    by someone else (the old link fallback read the missing source as "not a
    regular file" and answered FileExistsError)."""
    killed_between_link_and_unlink(tmp_path)

    real_move = durable.move

    def late_unlink_then_move(src: Any, dst: Any, **kw: Any) -> None:
        if os.path.basename(src) == "output":
            os.unlink(src)  # gone just before the move
        real_move(src, dst, **kw)

    survivor = spool(tmp_path, "node2")
    try:
        monkeypatch.setattr(durable, "move", late_unlink_then_move)
        assert finish_as_survivor(survivor) == []
    finally:
        survivor.close()
    assert_published_once(tmp_path)


def test_a_move_whose_source_is_gone_says_so_rather_than_destination_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "_renameat2", None)
    (tmp_path / "dst").write_bytes(b"published")
    with pytest.raises(FileNotFoundError):
        durable.move(tmp_path / "gone", tmp_path / "dst")


def test_a_cut_short_move_is_finished_even_when_the_first_same_file_check_says_no(tmp_path, monkeypatch):
    """Defence in depth behind durable.move: should the move still report the
    target taken (a same-file check of two names that does not match at
    first), complete_handoff asks whether outgoing/NAME is the inode
    record.json names, and finishes the move instead of rejecting the item."""
    killed_between_link_and_unlink(tmp_path)

    answers = [False]  # the first check only

    def first_check_says_no(a: os.stat_result, b: os.stat_result) -> bool:
        return answers.pop() if answers else a.st_ino == b.st_ino and a.st_dev == b.st_dev

    monkeypatch.setattr(os.path, "samestat", first_check_says_no)
    survivor = spool(tmp_path, "node2")
    try:
        assert finish_as_survivor(survivor) == []
    finally:
        survivor.close()
    assert answers == []  # the fallback's check was made, and said no
    assert_published_once(tmp_path)


def test_a_move_cut_short_between_link_and_unlink_is_finished_by_the_next_move(tmp_path):
    """renameat2 itself, target present: the VFS's EEXIST must not end a move of the same file."""
    src, dst = tmp_path / "output", tmp_path / "published"
    src.write_bytes(IMAGE)
    os.link(src, dst)
    durable.move(src, dst)
    assert not src.exists() and dst.read_bytes() == IMAGE
    (tmp_path / "other").write_bytes(b"another file")
    with pytest.raises(FileExistsError):
        durable.move(tmp_path / "other", dst)
