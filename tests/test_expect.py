"""The producer's expectation (contract section 8): ``incoming/.convd-expect.NAME`` taken
with the item, checked against the dropped bytes before converting, and the record's
``source.checksums`` of the bytes as dropped."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Daemon, MiB, Spool, make_image, write_config

NAME = "img"


@pytest.fixture
def daemon(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> Iterator[Daemon]:
    d = daemon_factory(write_config(tmp_path, checksum={"algorithms": ["sha256"]}))
    yield d
    assert d.stop() == 0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "src.qcow2", "qcow2", 8 * MiB)


def expect(spool: Spool, name: str, body: object) -> Path:
    path = spool.incoming / f".convd-expect.{name}"
    tmp = spool.incoming / f".expect-{name}.tmp"
    tmp.write_text(body if isinstance(body, str) else json.dumps(body))
    os.rename(tmp, path)
    return path


def digests(path: Path, *algos: str) -> dict[str, str]:
    data = path.read_bytes()
    return {a: hashlib.new(a, data).hexdigest() for a in algos}


def test_a_matching_expectation_converts_and_the_record_gives_the_dropped_bytes_digests(
        daemon: Daemon, spool: Spool, image: Path) -> None:
    sums = digests(image, "sha1", "sha256", "sha512")
    sidecar = expect(spool, NAME, {"size": image.stat().st_size, **sums})
    spool.drop(image, NAME)
    rec = spool.wait_record(NAME)
    assert rec["status"] == "converted", rec
    # The configured algorithm and every one the expectation named, of the bytes as dropped.
    assert rec["source"]["checksums"] == sums
    assert not os.path.lexists(sidecar)  # taken with the item, removed with it


def test_without_an_expectation_the_record_holds_the_configured_digests(
        daemon: Daemon, spool: Spool, image: Path) -> None:
    spool.drop(image, NAME)
    rec = spool.wait_record(NAME)
    assert rec["source"]["checksums"] == digests(image, "sha256")


def test_digests_taken_beside_the_conversion_reach_every_kind_of_record(
        daemon: Daemon, spool: Spool, image: Path, tmp_path: Path) -> None:
    # Without a stated digest they are read beside qemu-img, not before it:
    # a record of an item that fails first (a backing file: refused at
    # detect) and a passthrough's (nothing converted) have them all the same.
    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(backed)],
                   check=True)
    raw = make_image(tmp_path / "disk.raw", "raw", 4 * MiB)
    spool.drop(backed, "backed.qcow2")
    spool.drop(raw, "disk.raw")
    rejected, passed = spool.wait_record("backed.qcow2"), spool.wait_record("disk.raw")
    assert rejected["status"] == "failed" and rejected["error"]["code"] == "unsafe_image", rejected
    assert rejected["source"]["checksums"] == digests(backed, "sha256")
    assert passed["status"] == "passthrough", passed
    assert passed["source"]["checksums"] == digests(raw, "sha256") == passed["target"]["checksums"]


def test_a_containers_checksums_are_of_the_container_file(
        daemon: Daemon, spool: Spool, image: Path, tmp_path: Path) -> None:
    gz = tmp_path / "src.qcow2.gz"
    gz.write_bytes(gzip.compress(image.read_bytes(), compresslevel=1))
    expect(spool, "c.gz", {"size": gz.stat().st_size, **digests(gz, "sha512")})
    spool.drop(gz, "c.gz")
    rec = spool.wait_record("c.gz")
    assert rec["status"] == "converted", rec
    assert rec["source"]["checksums"] == digests(gz, "sha256", "sha512")


def test_a_wrong_size_is_corrupt_image_giving_stated_and_received_and_the_bytes_are_kept(
        daemon: Daemon, spool: Spool, image: Path) -> None:
    size = image.stat().st_size
    expect(spool, NAME, {"size": size + 512})
    spool.drop(image, NAME)
    rec = spool.wait_record(NAME)
    assert rec["error"]["code"] == "corrupt_image"
    assert f"stated size {size + 512} bytes; {size} bytes were received" in rec["error"]["message"]
    assert (spool.failed / NAME).read_bytes() == image.read_bytes()
    assert rec["source"]["checksums"] == digests(image, "sha256")
    assert not os.path.lexists(spool.incoming / f".convd-expect.{NAME}")
    assert list(spool.outgoing.iterdir()) == []


@pytest.mark.parametrize("algo", ["sha1", "sha256", "sha512"])
def test_a_wrong_digest_is_corrupt_image_giving_stated_and_received(
        daemon: Daemon, spool: Spool, image: Path, algo: str) -> None:
    wrong = hashlib.new(algo, b"something else").hexdigest()
    expect(spool, NAME, {"size": image.stat().st_size, algo: wrong.upper()})
    spool.drop(image, NAME)
    rec = spool.wait_record(NAME)
    got = digests(image, algo)[algo]
    assert rec["error"]["code"] == "corrupt_image"
    assert f"stated {algo} {wrong}; the bytes received have {algo} {got}" in rec["error"]["message"]
    assert (spool.failed / NAME).read_bytes() == image.read_bytes()


UNREADABLE = {
    "not_json": ("{size: 1", "not valid JSON"),
    "unknown_field": ({"sha265": "00"}, "neither \"size\" nor a hashlib digest"),
    "short_digest": ({"sha256": "abc"}, "not a hex digest of 64 characters"),
    "negative_size": ({"size": -1}, "not a non-negative integer"),
    "empty": ({}, "states nothing"),
    "deep": ('{"size": ' + "[" * 100 + "]" * 100 + "}", "nested more than"),
    "too_big": (json.dumps({"size": 1, "pad": "x" * 8192}), "a sidecar has at most"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_expectation_is_refused_with_a_record_saying_so_and_the_bytes_kept(
        daemon: Daemon, spool: Spool, image: Path, case: str) -> None:
    body, words = UNREADABLE[case]
    expect(spool, NAME, body)
    spool.drop(image, NAME)
    rec = spool.wait_record(NAME)
    assert rec["error"]["code"] == "corrupt_image", rec
    assert rec["error"]["message"].startswith(f"the expectation .convd-expect.{NAME} cannot be used: ")
    assert words in rec["error"]["message"]
    assert (spool.failed / NAME).read_bytes() == image.read_bytes()
    assert daemon.proc.poll() is None


def test_an_expectation_that_is_a_symlink_or_a_fifo_or_a_directory_is_refused_never_followed(
        daemon: Daemon, spool: Spool, image: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"size": image.stat().st_size}))
    os.symlink(outside, spool.incoming / ".convd-expect.link")
    os.mkfifo(spool.incoming / ".convd-expect.fifo")
    (spool.incoming / ".convd-expect.dir").mkdir()
    (spool.incoming / ".convd-expect.dir" / "x").write_text("{}")
    for name, words in (("link", "symbolic link"), ("fifo", "not a regular file"), ("dir", "not a regular file")):
        spool.drop(image, name)
        rec = spool.wait_record(name)
        assert rec["error"]["code"] == "corrupt_image", rec
        assert words in rec["error"]["message"]
        assert (spool.failed / name).read_bytes() == image.read_bytes()
        assert not os.path.lexists(spool.incoming / f".convd-expect.{name}")
    assert outside.exists()
    assert daemon.proc.poll() is None
    # The daemon still converts.
    shutil.copyfile(image, spool.incoming / ".after.part")
    os.rename(spool.incoming / ".after.part", spool.incoming / "after")
    assert spool.wait_record("after")["status"] == "converted"


@pytest.mark.skipif(os.geteuid() != 0, reason="a producer's file of another user needs chown (root)")
@pytest.mark.parametrize("stated", [{"size": 1}, {"sha265": "00"}], ids=["wrong_size", "unusable"])
def test_a_file_refused_for_its_expectation_is_taken_into_custody_first_and_its_size_recorded(
        daemon: Daemon, spool: Spool, image: Path, stated: dict[str, object]) -> None:
    # The expectation's checks read bytes no producer can change, as every
    # later check does: the dropped inode itself is convd's (taken, not copied)
    # by the time it lands in failed/.
    expect(spool, NAME, stated)
    part = spool.incoming / f".{NAME}.part"
    shutil.copyfile(image, part)
    nobody = 65534
    os.chown(part, nobody, nobody)
    part.chmod(0o644)
    dropped = part.stat().st_ino
    os.rename(part, spool.incoming / NAME)
    rec = spool.wait_record(NAME)
    assert rec["error"]["code"] == "corrupt_image", rec
    assert rec["source"]["size"] == image.stat().st_size, rec
    st = (spool.failed / NAME).stat()
    assert (st.st_ino, st.st_uid, st.st_mode & 0o777) == (dropped, os.geteuid(), 0o640)
    assert '"source in custody"' in daemon.log()
