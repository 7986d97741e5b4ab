"""The daemon over OpenStack's safety corpus (tests/data/os-test-images, manifest.yaml)."""

from __future__ import annotations

import os
import shutil

import yaml

from conftest import CORPUS, images_equal, sha256_file, wait_for, write_config

# What each rejected image must be rejected as.
EXPECTED_CODES = {
    "qcow-with-backing.qcow2": "unsafe_image",
    "qcow-with-datafile.qcow2": "unsafe_image",
    "standard.qed": "unsupported_format",
    "iso-with-qcow2-in-system.iso": "unsafe_image",
    "vmdk-monolithicFlat.vmdk": "unsafe_image",
    "vmdk-monolithicFlat-leak.vmdk": "unsafe_image",
    "vmdk-sparse-with-url-backing.vmdk": "unsafe_image",
}


def _manifest() -> list[dict]:
    images = yaml.safe_load((CORPUS / "manifest.yaml").read_text())["images"]
    out = []
    for img in images:
        name = f"{img['name']}.{img['format']}"
        if (CORPUS / name).exists():  # standard-udf is absent (see the corpus README)
            out.append({**img, "file": name})
    return out



def test_corpus_usable_images_publish_and_unusable_ones_fail_intact(tmp_path, spool, daemon_factory):
    images = _manifest()
    assert len(images) == 14  # all but standard-udf
    d = daemon_factory(write_config(tmp_path))
    for img in images:
        spool.drop(CORPUS / img["file"])
    for img in images:
        name = img["file"]
        rec = spool.wait_record(name)
        if img["usable"]:
            assert rec["status"] in ("converted", "passthrough"), rec
            qfmt = {"gpt": "raw", "iso": "raw"}.get(img["format"], img["format"])
            assert rec["source"]["format"] == img["format"]
            assert images_equal(CORPUS / name, qfmt, spool.outgoing / name, "raw")
            assert not (spool.failed / name).exists()
        else:
            assert rec["status"] == "failed", rec
            expected = EXPECTED_CODES[name]
            if img["insecure"]:
                assert expected == "unsafe_image"
            assert rec["error"]["code"] == expected, rec
            assert rec["error"]["message"]
            assert "target" not in rec
            assert sha256_file(spool.failed / name) == sha256_file(CORPUS / name), \
                "failed/ must keep the original bytes"
            assert not (spool.outgoing / name).exists()
    assert d.stop() == 0
    assert spool.work_files() == []


def test_backing_file_message_names_the_file(tmp_path, spool, daemon_factory):
    daemon_factory(write_config(tmp_path))
    spool.drop(CORPUS / "qcow-with-backing.qcow2")
    rec = spool.wait_record("qcow-with-backing.qcow2")
    assert rec["error"]["code"] == "unsafe_image"
    assert "/etc/hosts" in rec["error"]["message"]
    assert rec["source"]["format"] == "qcow2"


def test_failed_never_overwrites_an_earlier_reject(tmp_path, spool, daemon_factory):
    daemon_factory(write_config(tmp_path))
    bad = tmp_path / "bad.qcow2"
    shutil.copyfile(CORPUS / "qcow-with-backing.qcow2", bad)
    spool.drop(bad)
    spool.wait_record("bad.qcow2")
    first = (spool.failed / "bad.qcow2.json").read_text()
    spool.drop(bad)
    rec2 = wait = None
    wait = wait_for(lambda: (spool.failed / "bad.qcow2.1.json").exists(), 60, what="second reject")
    assert wait
    assert (spool.failed / "bad.qcow2.json").read_text() == first
    rec2 = (spool.failed / "bad.qcow2.1.json").read_text()
    assert '"name": "bad.qcow2"' in rec2
    assert sorted(os.listdir(spool.failed)) == ["bad.qcow2", "bad.qcow2.1", "bad.qcow2.1.json", "bad.qcow2.json"]
