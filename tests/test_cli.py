"""The command line: each command's output and exit codes (contract section 4)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import CORPUS, MiB, convd_bin, images_equal, make_image, run, write_config


def convd(*args, **kw):
    return run(convd_bin(), *args, check=False, **kw)


def test_version_prints_and_exits_zero():
    r = convd("--version")
    assert r.returncode == 0 and r.stdout.startswith("convd 0.1.0")


def test_usage_error_exits_two():
    assert convd().returncode == 2
    assert convd("frobnicate").returncode == 2
    assert convd("convert", "only-src").returncode == 2


def test_inspect_json_reports_a_safe_image(tmp_path):
    img = make_image(tmp_path / "a.qcow2", "qcow2", 8 * MiB)
    r = convd("inspect", img, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["safe"] is True and out["format"] == "qcow2"
    assert out["virtual_size"] == 8 * MiB and out["reasons"] == []


def test_inspect_rejects_unsafe_and_unreadable(tmp_path):
    r = convd("inspect", CORPUS / "qcow-with-backing.qcow2", "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["safe"] is False and out["code"] == "unsafe_image"
    assert any("/etc/hosts" in reason for reason in out["reasons"])
    assert convd("inspect", tmp_path / "missing").returncode == 1
    os.mkfifo(tmp_path / "fifo")
    r = convd("inspect", tmp_path / "fifo", "--json")  # must not hang on a FIFO
    assert r.returncode == 1 and json.loads(r.stdout)["code"] == "not_regular_file"


def test_inspect_never_runs_qemu_img(tmp_path):
    # An empty PATH: inspect must still work, since it is pure Python.
    img = make_image(tmp_path / "a.vmdk", "vmdk", 4 * MiB)
    r = convd("inspect", img, env={**os.environ, "PATH": "/nonexistent"})
    assert r.returncode == 0 and "vmdk" in r.stdout


def test_convert_runs_one_image_and_leaves_the_source(tmp_path):
    src = make_image(tmp_path / "a.vdi", "vdi", 8 * MiB)
    before = src.read_bytes()
    dst = tmp_path / "out" / "a.qcow2"
    dst.parent.mkdir()
    r = convd("convert", src, dst, "--to", "qcow2")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["status"] == "converted" and rec["target"]["format"] == "qcow2"
    assert images_equal(src, "vdi", dst, "qcow2")
    assert src.read_bytes() == before
    assert os.listdir(dst.parent) == ["a.qcow2"]  # no work files left beside it


def test_convert_failure_prints_code_and_exits_one(tmp_path):
    dst = tmp_path / "x.raw"
    r = convd("convert", CORPUS / "qcow-with-backing.qcow2", dst)
    assert r.returncode == 1
    assert "unsafe_image" in r.stderr and "/etc/hosts" in r.stderr
    assert not dst.exists()
    assert (CORPUS / "qcow-with-backing.qcow2").exists()


def test_convert_refuses_to_overwrite(tmp_path):
    src = make_image(tmp_path / "a.qcow2", "qcow2", 4 * MiB)
    dst = tmp_path / "taken.raw"
    dst.write_bytes(b"keep me")
    r = convd("convert", src, dst)
    assert r.returncode == 1 and "name_conflict" in r.stderr
    assert dst.read_bytes() == b"keep me"


def test_check_config_prints_the_effective_configuration(tmp_path):
    cfg = write_config(tmp_path, limits={"workspace": "10GiB"})
    r = convd("check-config", "-c", cfg)
    assert r.returncode == 0, r.stderr
    assert "workspace = 10737418240" in r.stdout
    assert f'root = "{tmp_path / "spool"}"' in r.stdout


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("[convert]\nmax_worker = 2\n", "[convert] max_worker"),
        ("[convert]\nmax_workers = 0\n", "[convert] max_workers"),
        ("[convert]\ntarget_format = \"qed\"\n", "[convert] target_format"),
        ("[limits]\nworkspace = \"lots\"\n", "[limits] workspace"),
        ("[watch]\nforce_polling = \"yes\"\n", "[watch] force_polling"),
        ("[checksum]\nalgorithms = [\"md6\"]\n", "[checksum] algorithms"),
        ("[spoool]\nroot = \"/x\"\n", "[spoool]"),
    ],
)
def test_check_config_names_the_bad_key(tmp_path, body, named):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    r = convd("check-config", "-c", cfg)
    assert r.returncode == 1
    assert named in r.stderr


def test_config_path_defaults_to_env(tmp_path):
    cfg = write_config(tmp_path)
    r = convd("check-config", env={**os.environ, "CONVD_CONFIG": str(cfg)})
    assert r.returncode == 0 and str(cfg) in r.stdout


def test_run_with_a_bad_config_exits_one(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[convert]\nmax_workers = -1\n")
    r = convd("run", "-c", cfg, timeout=30)
    assert r.returncode == 1 and "max_workers" in r.stderr


def test_run_refuses_spool_dirs_on_different_filesystems(tmp_path):
    cfg = write_config(tmp_path, spool={"outgoing": "/dev/shm/convd-test-outgoing"})
    try:
        r = convd("run", "-c", cfg, timeout=30)
    finally:
        os.rmdir("/dev/shm/convd-test-outgoing") if os.path.isdir("/dev/shm/convd-test-outgoing") else None
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test directory here")
    assert r.returncode == 1 and "one filesystem" in r.stderr


def test_status_without_a_daemon_says_not_running(tmp_path):
    cfg = write_config(tmp_path)
    r = convd("status", "-c", cfg, "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["running"] is False


def test_convert_passthrough_copies_and_leaves_the_source(tmp_path):
    src = make_image(tmp_path / "a.qcow2", "qcow2", 4 * MiB)
    dst = tmp_path / "copy.qcow2"
    r = convd("convert", src, dst, "--to", "qcow2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "passthrough"
    assert dst.read_bytes() == src.read_bytes() and src.exists()
