"""The field cases (tests/data/field/): inputs reduced from public reports, each with its right outcome.

Each goes through ``convd convert`` as a user would run it.  appliance.ova
and cloudimg.qcow2.xz (containers and compressed streams) belong to the
unpacking work and are tested in tests/test_containers.py, from the same
generator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import convd_bin, images_equal, run

MAKE_CASES = Path(__file__).resolve().parent / "data" / "field" / "make_cases.py"

# case -> (expected code or None for converted, extra convert args, words the message must hold)
CASES: dict[str, tuple[str | None, list[str], list[str]]] = {
    "vhd-virtualpc-chs.vhd": (None, [], []),
    "vdi-convertfromraw-odd.vdi": (None, [], []),
    "vhd-differencing.vhd": ("unsafe_image", [], ["parent.vhd", "differencing"]),
    "qcow2-truncated.qcow2": ("corrupt_image", [], ["past the end of the file", "384.0 KiB"]),
    "qcow2-corrupt-bit.qcow2": ("corrupt_image", [], ["marked corrupt"]),
    "raw-for-azure.raw": (None, ["--to", "vpc"], []),
    "vhdx-log-replay.vhdx": ("corrupt_image", [], ["log that needs to be replayed"]),
    "vmdk-stream-corrupt-grain.vmdk": ("corrupt_image", [], ["cannot read the source"]),
    "qcow2-extended-l2.qcow2": (None, [], []),
    "qcow2-zstd.qcow2": (None, [], []),
    "vmdk-stream-v3.vmdk": (None, [], []),
    "vmdk-split-2gb.vmdk": ("unsafe_image", [], ["twoGbMaxExtentSparse", "other files", "Virtual Disk-s001.vmdk"]),
    "vmdk-esxi-vmfs.vmdk": ("unsafe_image", [], ["vm01-flat.vmdk"]),
}
QEMU_FORMAT = {".vhd": "vpc", ".vdi": "vdi", ".qcow2": "qcow2", ".vmdk": "vmdk", ".vhdx": "vhdx", ".raw": "raw"}
# Virtual sizes as qemu-img reads them (README of the field cases).
VIRTUAL_SIZE = {"vhd-virtualpc-chs.vhd": 41909760, "vdi-convertfromraw-odd.vdi": 16776704,
                "raw-for-azure.raw": 31457280}


@pytest.fixture(scope="session")
def field_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("field")
    subprocess.run([sys.executable, str(MAKE_CASES), str(out), *CASES], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_field_case_gets_its_right_outcome(case: str, field_cases: Path, tmp_path: Path) -> None:
    code, args, words = CASES[case]
    src, dst = field_cases / case, tmp_path / f"{case}.out"
    before = src.read_bytes()
    p = run(convd_bin(), "convert", src, dst, *args, check=False)
    assert src.read_bytes() == before, "convd convert must never touch its source"
    if code is None:
        assert p.returncode == 0, p.stderr
        rec = json.loads(p.stdout)
        fmt = QEMU_FORMAT[os.path.splitext(case)[1]]
        if "--to" in args:
            info = json.loads(run("qemu-img", "info", "-f", "vpc", "--output=json", dst).stdout)
            assert info["virtual-size"] == src.stat().st_size == rec["target"]["virtual_size"]
            assert images_equal(src, "raw", dst, "vpc")
        else:
            assert images_equal(src, fmt, dst, "raw")
            assert rec["target"]["virtual_size"] == dst.stat().st_size
        if case in VIRTUAL_SIZE:
            assert rec["source"]["virtual_size"] == VIRTUAL_SIZE[case]
            assert rec["target"]["virtual_size"] == VIRTUAL_SIZE[case]
    else:
        assert p.returncode == 1
        lines = p.stderr.splitlines()
        assert len(lines) == 1, f"one line on failure, got: {p.stderr}"
        assert lines[0].startswith(f"convd: {code}: "), lines[0]
        for word in words:
            assert word in lines[0], lines[0]
        assert "qemu-img check -r" not in lines[0]  # qemu's hint is not the reason
        assert "attempts" not in lines[0]  # nothing here is worth a retry
        assert not dst.exists()
