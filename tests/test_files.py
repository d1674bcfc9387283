"""Outputs are all-or-nothing: failures, full disks, SIGTERM and concurrent writers."""

import errno
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest

from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.files import atomic_path

MVD = [sys.executable, "-m", "mobilevit_deploy"]


def test_disk_full_is_reported_and_leaves_nothing(tmp_path):
    with pytest.raises(BadInput, match="no space left"), atomic_path(tmp_path / "a.onnx") as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_an_exception_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.onnx") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_during_export_leaves_no_partial_file(tmp_path):
    proc = subprocess.Popen(
        [*MVD, "export", "fastvit_ma36", "-o", str(tmp_path / "big.onnx")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(tmp_path.iterdir()), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_concurrent_exports_to_one_directory_do_not_clobber(tmp_path):
    names = ["a.onnx", "b.onnx", "a.onnx"]  # two writers race for the same name too
    procs = [
        subprocess.Popen(
            [*MVD, "export", "fastvit_t8", "--image-size", "64", "-o", str(tmp_path / name)],
            stdout=subprocess.DEVNULL,
        )
        for name in names
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "a.onnx.json", "b.onnx", "b.onnx.json"]
    for name in ("a.onnx", "b.onnx"):
        onnx.checker.check_model(onnx.load(str(tmp_path / name)), full_check=True)
