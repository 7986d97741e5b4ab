"""Power cuts: convd on ext4 and on XFS, each on a User-Mode Linux block device, and
the power cut (the UML process group SIGKILLed) at seeded moments aimed at each
stage.

Every other durability test kills a process, and the kernel's page cache
survives it: a missing fsync, or a rename made durable before the data it
names, cannot show there.  Here the guest kernel dies too, so each filesystem
keeps exactly what had reached its block device (``ubd``, backed by a file on
the host; hostfs is not used for the spool, since its pages are the host's).
ext4 is mounted ``noauto_da_alloc`` so that it flushes nothing POSIX does not
require.  Each boot replays the journals, checks both filesystems read-only
(``e2fsck -fn``, ``xfs_repair -n``), starts a convd per spool and lets a
producer drop images as the README says producers must; the next cut comes
at a seeded delay after a seeded target stage shows in convd's JSON log (on
hostfs, so it survives the cut and says where each cut landed).  A last boot
lets both daemons finish; then every input must have exactly one outcome,
intact.  tests/powercut_job.py is the job in the guest; the asserts are here.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import CORPUS, REPO, MiB, make_image, sha256_file
from sharedfs import UmlDisks, uml_disks_missing, uml_has_filesystem

pytestmark = pytest.mark.slow

FILESYSTEMS = ("ext4", "xfs")
STAGES = ("start-up", "claim", "unpack", "convert", "publish", "cleanup")
# Seconds after its target shows in the log within which a cut comes: about
# the stage's length in the guest, so the cut lands inside it or just after.
WINDOW = {"start-up": 0.4, "claim": 0.1, "unpack": 0.3, "convert": 0.6, "publish": 0.3, "cleanup": 0.0}
# A boot whose target never shows (nothing left in that stage) is cut this long after convd
# watches: long enough for an item to get through detect, convert and publish in the guest, so
# that the backlog moves on between cuts.
FALLBACK = 8.0
CONTAINERS = ("disk-gz-1", "disk-gz-2", "appliance-ova")


def build_batch(d: Path) -> tuple[dict[str, Path], dict[str, tuple[str, Any]]]:
    """The inputs, by name (no extensions: convd goes by bytes), and what each must become:
    ``("converted" | "passthrough", (the disk that went in, its format))`` or ``("failed", code)``."""
    from test_containers import vbox_ova

    src = d / "src"
    src.mkdir()
    rng = random.Random(7)
    made: dict[str, tuple[Path, str]] = {}
    for i, fmt in enumerate(("qcow2", "qcow2", "qcow2", "qcow2", "qcow2", "vmdk", "vmdk", "raw")):
        name = f"disk-{fmt}-{i}"
        made[name] = (make_image(src / name, fmt, rng.choice((32, 48, 64)) * MiB, seed=i + 1), fmt)
    made["disk-stream-vmdk"] = (make_image(src / "disk-stream-vmdk", "vmdk", 48 * MiB,
                                           opts="subformat=streamOptimized", seed=21), "vmdk")
    inputs = d / "inputs"
    inputs.mkdir()
    expect: dict[str, tuple[str, Any]] = {}
    for name, (path, fmt) in made.items():
        os.link(path, inputs / name)
        expect[name] = ("passthrough" if fmt == "raw" else "converted", (str(path), fmt))
    for n in (1, 2):
        disk = make_image(src / f"gz-{n}.qcow2", "qcow2", 48 * MiB, seed=30 + n)
        (inputs / f"disk-gz-{n}").write_bytes(gzip.compress(disk.read_bytes(), compresslevel=1, mtime=0))
        expect[f"disk-gz-{n}"] = ("converted", (str(disk), "qcow2"))
    vmdk = make_image(src / "appliance-disk001.vmdk", "vmdk", 48 * MiB, opts="subformat=streamOptimized", seed=41)
    (inputs / "appliance-ova").write_bytes(vbox_ova("appliance", [vmdk]))
    expect["appliance-ova"] = ("converted", (str(vmdk), "vmdk"))
    os.link(CORPUS / "qcow-with-backing.qcow2", inputs / "bad-backing")
    expect["bad-backing"] = ("failed", "unsafe_image")
    return {n: inputs / n for n in expect}, expect


class Tail:
    """The JSON lines a file has gained since the last look (it is on hostfs: written as they happen)."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.buf = path, 0, b""

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


class Stages:
    """Where each item of one spool is, as convd's log (and the producer's) tell it."""

    def __init__(self, label: str, carried: dict[str, str]) -> None:
        self.label = label
        # Items in flight at the last cut: recovered (or still in incoming/) at this start.
        self.items = dict.fromkeys(carried, "recovery")
        self.watching = self.started = False
        self.recovered_handoffs: list[str] = []
        self.starting: dict[str, Any] = {}
        self.errors: list[dict[str, Any]] = []

    def feed(self, e: dict[str, Any]) -> None:
        ev, item = e.get("event"), str(e.get("item", ""))
        if e.get("level") in ("error", "critical"):
            self.errors.append(e)
        if ev == "starting":
            self.started, self.starting = True, e
        elif ev == "watching" and "level" in e:
            self.watching = True
        elif ev == "dropped" and e.get("spool") == self.label:
            # Two files: convd may have told of the claim before the producer's line was read.
            if self.items.get(e["name"], "recovery") == "recovery":
                self.items[e["name"]] = "claim"
        elif ev == "claimed":
            self.items[item] = "unpack"
        elif ev == "stage done":
            if e["next"] == "done":
                self.items.pop(item, None)
            else:
                self.items[item] = e["next"]
        elif ev in ("converted", "passed through"):
            self.items[item] = "cleanup"
        elif ev in ("rejected", "recovered handoff"):
            self.items.pop(item, None)
            if ev == "recovered handoff":
                self.recovered_handoffs.append(item)

    def landed(self) -> set[str]:
        """The stages the cut found this spool's items in."""
        # A carried item that showed nothing since the start was finished before
        # the last cut (its last lines cut off), or still waits in incoming/.
        hit = {s for s in self.items.values() if s != "recovery"}
        if not self.watching:
            hit.add("start-up")
        return hit or {"idle"}


def aimed(target: str, st: Stages) -> bool:
    """Whether the target stage shows in the primary spool's log."""
    if target == "start-up":
        return st.started
    if target == "unpack":
        return any(s in ("unpack", "recovery") and n in CONTAINERS for n, s in st.items.items()) and st.started
    return target in st.items.values()


def cutter(boot: Path, labels: tuple[str, ...], stages: dict[str, Stages], target: str, delay: float,
           limit: float) -> Callable[[Any], None]:
    """``until`` for UmlDisks.boot: returns when the power is to be cut."""
    tails = {label: Tail(boot / f"{label}.log") for label in labels}
    producer = Tail(boot / "producer.jsonl")

    def until(p: Any) -> None:
        t0 = time.monotonic()
        watching_at = armed = None
        while p.poll() is None:
            for e in producer.new():
                for st in stages.values():
                    st.feed(e)
            for label, tail in tails.items():
                for e in tail.new():
                    stages[label].feed(e)
            now = time.monotonic()
            primary = stages[labels[0]]
            if primary.watching and watching_at is None:
                watching_at = now
            if armed is None:
                if aimed(target, primary):
                    armed = now + delay
                elif (watching_at is not None and now - watching_at > FALLBACK) or now - t0 > limit:
                    armed = now
            if armed is not None and now >= armed:
                return
            time.sleep(0.003)

    return until


def job(lab: UmlDisks, images: Path, boot: Path, *, drop: list[str], maybe: list[str],
        final: list[str] | None = None, refs: Path | None = None) -> str:
    spools = " ".join(f"{fs}={m}" for (fs, _), m in zip(lab.disks, lab.mounts))
    argv = [sys.executable, str(REPO / "tests" / "powercut_job.py"), "--spools", *spools.split(),
            "--images", str(images), "--log", str(boot)]
    if drop:
        argv += ["--drop", *drop]
    if maybe:
        argv += ["--maybe", *maybe]
    if final is not None:
        argv += ["--final", *final]
    if refs is not None:
        argv += ["--refs", str(refs)]
    return f"cd {shlex.quote(str(REPO))} && " + " ".join(shlex.quote(a) for a in argv) + "\n"


def run_cuts(tmp_path: Path, seed: int, cuts: int) -> dict[str, Any]:
    """``cuts`` power cuts then a last boot that finishes; returns what the asserts need."""
    labels = filesystems()
    inputs, expect = build_batch(tmp_path)
    images = next(iter(inputs.values())).parent
    rng = random.Random(seed)
    lab = UmlDisks(tmp_path, [(fs, 1 << 30) for fs in labels])
    lab.make()
    names = sorted(inputs)
    rng.shuffle(names)
    # Each stage targeted in turn, in a seeded order; the drops spread over the first boots.
    targets = [STAGES[i % len(STAGES)] for i in range(cuts)]
    rng.shuffle(targets)
    confirmed: dict[str, set[str]] = {label: set() for label in labels}
    carried: dict[str, dict[str, str]] = {label: {} for label in labels}
    pending: list[str] = []  # dropped by a cut boot, durability unknown
    cut_log: list[dict[str, Any]] = []
    fsck: list[dict[str, Any]] = []
    errors: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    ledgers: list[dict[str, Any]] = []
    t_start, cpu_start = time.monotonic(), os.times()
    for n in range(cuts):
        boot = tmp_path / f"boot-{n:02d}"
        boot.mkdir()
        target = targets[n]
        k = 3 if n == 0 else rng.choice((0, 1, 1, 2)) if names else 0
        if target == "claim" and names:
            k = max(k, 1)
        drop, names = names[:k], names[k:]
        delay = rng.uniform(0.0, WINDOW[target])
        stages = {label: Stages(label, carried[label]) for label in labels}
        log = lab.boot(job(lab, images, boot, drop=drop, maybe=pending),
                       until=cutter(boot, labels, stages, target, delay, limit=120.0))
        (boot / "guest.log").write_text(log)
        fsck.append({"boot": n, **{labels[i]: rc if rc == 0 else (rc, out[-2000:])
                                   for i, (rc, out) in lab.fsck(log).items()}})
        assert "DISKS-UP" in log, f"boot {n}: the guest did not mount its disks:\n{log[-3000:]}"
        for e in Tail(boot / "producer.jsonl").new():
            if e["event"] in ("dropped", "found"):
                confirmed[e["spool"]].add(e["name"])
            elif e["event"] == "ledger":
                ledgers.append({"boot": n, **e})
            elif e["event"] == "daemon exited":
                raise AssertionError(f"boot {n}: a daemon exited: {e}\n{log[-3000:]}")
        pending = sorted({x for x in pending + drop if any(x not in c for c in confirmed.values())})
        landed = {}
        for label, st in stages.items():
            landed[label] = sorted(st.landed())
            errors[label] += [{"boot": n, **e} for e in st.errors]
            carried[label] = dict(st.items)
        cut_log.append({"boot": n, "target": target, "delay": round(delay, 3), "landed": landed,
                        "recovered": {label: st.starting.get("recovered") for label, st in stages.items()},
                        "recovered_handoffs": {label: st.recovered_handoffs for label, st in stages.items()}})
    # The last boot: drop what is left, let both daemons finish, report.
    boot = tmp_path / "boot-final"
    boot.mkdir()
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({n: ref for n, (kind, ref) in expect.items() if kind != "failed"}))
    stages = {label: Stages(label, carried[label]) for label in labels}
    log = lab.boot(job(lab, images, boot, drop=names, maybe=pending, final=sorted(inputs), refs=refs),
                   timeout=1000.0)
    (boot / "guest.log").write_text(log)
    fsck.append({"boot": "final", **{labels[i]: rc if rc == 0 else (rc, out[-2000:])
                                     for i, (rc, out) in lab.fsck(log).items()}})
    tails = {label: Tail(boot / f"{label}.log") for label in labels}
    for label in labels:
        for e in tails[label].new():
            stages[label].feed(e)
        errors[label] += [{"boot": "final", **e} for e in stages[label].errors]
        cut_log[-1]["recovered_handoffs"][label] = cut_log[-1]["recovered_handoffs"].get(label, []) + \
            stages[label].recovered_handoffs
    for e in Tail(boot / "producer.jsonl").new():
        if e["event"] == "ledger":
            ledgers.append({"boot": "final", **e})
    final = json.loads((boot / "final.json").read_text()) if (boot / "final.json").exists() else None
    assert final is not None, f"the last boot did not finish:\n{log[-3000:]}\n" + \
        (boot / "producer.jsonl").read_text()[-3000:]
    return {"labels": labels, "expect": expect, "inputs": inputs, "cuts": cut_log, "fsck": fsck,
            "final": final, "errors": errors, "ledgers": ledgers, "seconds": time.monotonic() - t_start,
            # What the guests used: the wall time on an idle machine, roughly.
            "cpu_seconds": sum(os.times()[i] - cpu_start[i] for i in (2, 3))}


def assert_nothing_lost(res: dict[str, Any]) -> None:
    expect, inputs = res["expect"], res["inputs"]
    bad_fsck = [f for f in res["fsck"] if any(f[label] != 0 for label in res["labels"])]
    assert bad_fsck == [], f"a filesystem check failed after a cut: {bad_fsck}"
    for label in res["labels"]:
        fin = res["final"][label]
        assert fin["exit_code"] == 0, label
        assert res["errors"][label] == [], f"{label}: errors logged: {res['errors'][label]}"
        # Exactly one outcome per input, where it belongs, and nothing else in the spool.
        want_out = {n for n, (kind, _) in expect.items() if kind != "failed"}
        want_failed = {n for n, (kind, _) in expect.items() if kind == "failed"}
        assert (set(fin["outgoing"]), set(fin["failed"])) == (want_out, want_failed), label
        allowed = ({"incoming/", "work/", "outgoing/", "failed/", f"work/{label}/", "work/.ledger",
                    "work/.ledger.lock", f"work/{label}/.lock", f"work/{label}/.adopt",
                    f"work/{label}/.status.json"}
                   | {f"{d}/{n}{j}" for d, ns in (("outgoing", want_out), ("failed", want_failed))
                      for n in ns for j in ("", ".json")})
        assert sorted(set(fin["tree"]) - allowed) == [] and set(fin["tree"]) >= allowed - {
            f"work/{label}/.status.json"}, f"{label}: {fin['tree']}"
        for name, e in fin["outgoing"].items():
            kind, (_ref, _fmt) = expect[name]
            rec = e["record"]
            assert (rec.get("name"), rec.get("status")) == (name, kind), (label, name, rec)
            # Nothing half-written published: the bytes are the record's, and the disk that went in.
            assert rec["target"]["checksums"]["sha256"] == e["sha256"], (label, name)
            assert e["compare"] == 0, f"{label}: outgoing/{name} differs from the disk that went in"
        for name, e in fin["failed"].items():
            rec = e["record"]
            assert (rec.get("status"), rec["error"]["code"]) == ("failed", expect[name][1]), (label, name, rec)
            assert e["sha256"] == sha256_file(inputs[name]), f"{label}: failed/{name} is not the original bytes"
        # The ledger holds nothing once nothing is in flight, and never held
        # less than the items in flight had reserved.
        daemon = fin["status"]["daemon"]
        assert (daemon["in_flight"], daemon["workspace"]["reserved"], daemon["workspace"]["waiting"]) == ([], 0, 0)
        assert {k: v["outstanding"] for k, v in fin["ledger"]["instances"].items()} == {label: 0}
        for snap in (x for x in res["ledgers"] if x["spool"] == label):
            assert snap["reserved"] >= sum(snap["in_flight"].values()), snap


def summary(res: dict[str, Any]) -> str:
    lines = [f"{len(res['cuts'])} power cuts in {res['seconds']:.0f} s "
             f"({res['cpu_seconds']:.0f} s of CPU in the guests)"]
    for label in res["labels"]:
        hits = Counter(s for c in res["cuts"] for s in c["landed"][label])
        handoffs = sum(len(c["recovered_handoffs"][label]) for c in res["cuts"])
        recovered = sum(c["recovered"][label] or 0 for c in res["cuts"])
        landed = ", ".join(f"{s} {hits[s]}" for s in (*STAGES, "detect", "reserve", "idle"))
        lines.append(f"{label}: cuts landed in {landed}"
                     + f"; {recovered} items recovered at start-up, {handoffs} staged handoffs finished; "
                     f"fsck clean {sum(1 for f in res['fsck'] if f[label] == 0)}/{len(res['fsck'])}")
    return "\n".join(lines)


def filesystems() -> tuple[str, ...]:
    """ext4, and XFS where the UML kernel has it (Debian's builds it in)."""
    return tuple(fs for fs in FILESYSTEMS if fs == "ext4" or uml_has_filesystem(fs))


@pytest.fixture
def lab_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("power cuts need root (User-Mode Linux, mkfs)")
    why = uml_disks_missing(filesystems())
    if why:
        pytest.fail(f"cannot run the power-cut test: {why}")


# A safety net only: the 30 cuts took 431 s (237 s of CPU in the guests) on a
# 2-core machine shared with other test runs; the regression case, 87 s.
@pytest.mark.timeout(2400)
@pytest.mark.parametrize(("seed", "cuts"), [
    pytest.param(20261207, 30, id="30-cuts"),
    # The seed that found the torn shared ledger: durable writes that may be
    # lost (sync=False) renamed unflushed data, and after the cut at boot 2
    # work/.ledger was empty ("unreadable shared ledger" at the next start).
    pytest.param(1, 3, id="regression-torn-ledger"),
])
def test_power_cuts_at_seeded_moments_lose_nothing_and_publish_nothing_half_written(
        tmp_path: Path, lab_ready: None, seed: int, cuts: int) -> None:
    res = run_cuts(tmp_path, seed=seed, cuts=cuts)
    (tmp_path / "cuts.json").write_text(json.dumps({k: v for k, v in res.items() if k not in ("inputs", "final")},
                                                   indent=1, default=str))
    print(summary(res))
    assert_nothing_lost(res)
