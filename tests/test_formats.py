"""Every input format, to raw and to qcow2, through a real daemon; content checked by qemu-img compare."""

from __future__ import annotations

import os

import pytest

from conftest import MiB, images_equal, make_image, sha256_file, write_config

# (name, qemu format for compare, qemu-img create format, -o options, compressed)
INPUTS = [
    ("disk.raw", "raw", "raw", None, False),
    ("disk.qcow2", "qcow2", "qcow2", None, False),
    ("compressed.qcow2", "qcow2", "qcow2", None, True),
    ("sparse.vmdk", "vmdk", "vmdk", "subformat=monolithicSparse", False),
    ("stream.vmdk", "vmdk", "vmdk", "subformat=streamOptimized", False),
    ("disk.vdi", "vdi", "vdi", None, False),
    ("dynamic.vhd", "vpc", "vpc", "subformat=dynamic", False),
    ("fixed.vhd", "vpc", "vpc", "subformat=fixed", False),
    ("disk.vhdx", "vhdx", "vhdx", None, False),
]



@pytest.mark.parametrize("target", ["raw", "qcow2"])
def test_every_input_format_converts_and_compares_identical(tmp_path, spool, daemon_factory, target):
    cfg = write_config(tmp_path, convert={"target_format": target})
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    made = {}
    for i, (name, fmt, create_fmt, opts, compress) in enumerate(INPUTS):
        made[name] = (make_image(pristine / name, create_fmt, 16 * MiB, opts=opts, seed=i, compress=compress), fmt)
    d = daemon_factory(cfg)
    for path, _fmt in made.values():
        spool.drop(path)
    for name, (path, fmt) in made.items():
        rec = spool.wait_record(name)
        out = spool.outgoing / name
        assert rec["status"] in ("converted", "passthrough"), rec
        passthrough = fmt == target
        assert rec["status"] == ("passthrough" if passthrough else "converted"), rec
        assert rec["schema"] == 1 and rec["name"] == name
        assert rec["source"]["format"] == fmt
        assert rec["source"]["size"] == path.stat().st_size
        assert rec["source"]["virtual_size"] >= 16 * MiB
        t = rec["target"]
        assert t["format"] == target
        assert t["size"] == out.stat().st_size
        assert t["virtual_size"] == rec["source"]["virtual_size"]
        assert t["checksums"] == {"sha256": sha256_file(out)}
        assert {"detect", "wait_space", "convert", "publish", "total"} <= set(rec["timings"])  # + breakdown keys
        assert rec["attempts"] == 1
        assert rec["finished_at"].endswith("Z") and rec["convd_version"]
        assert images_equal(path, fmt, out, target), f"{name} → {target} differs"
        if target == "raw" and not passthrough:
            # sparse: holes in the source stay holes in the output
            assert out.stat().st_blocks * 512 < out.stat().st_size
    assert d.stop() == 0
    assert os.listdir(spool.incoming) == []
    assert spool.work_files() == []
    assert sorted(os.listdir(spool.failed)) == []
