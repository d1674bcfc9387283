"""Outputs are all-or-nothing: failures, full disks, SIGTERM and concurrent writers."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest

from mobilevit_deploy import api
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.files import atomic_artifact, atomic_path

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


def _interrupt_on_replace_to(suffix: str, real=os.replace):
    """os.replace that delivers SIGINT to this process when it renames onto `suffix`."""

    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(suffix):
            os.kill(os.getpid(), signal.SIGINT)

    return replace


def _export_pair(tmp_path, image_size: int):
    art = api.export("fastvit_t8", output=tmp_path / "m.onnx", image_size=image_size)
    return art.path.read_bytes(), json.loads(art.sidecar.read_text())


def test_an_interrupt_between_artifact_and_sidecar_leaves_a_matching_pair(tmp_path, monkeypatch):
    """The runtimes read the sidecar first: a new file beside the previous export's
    sidecar is fed the wrong input shape. A SIGINT right after the artifact's rename
    used to leave exactly that; it is held until the sidecar is in place too."""
    _export_pair(tmp_path, 64)
    monkeypatch.setattr(os, "replace", _interrupt_on_replace_to("m.onnx"))
    with pytest.raises(KeyboardInterrupt):
        api.export("fastvit_t8", output=tmp_path / "m.onnx", image_size=96)
    monkeypatch.undo()
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    graph = onnx.load(str(tmp_path / "m.onnx"))
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert sidecar["input_shape"] == dims == [1, 3, 96, 96]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_a_failed_sidecar_write_never_leaves_the_old_sidecar_beside_a_new_file(
    tmp_path, monkeypatch
):
    old_bytes, _ = _export_pair(tmp_path, 64)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        api.export("fastvit_t8", output=tmp_path / "m.onnx", image_size=96)
    monkeypatch.undo()
    new_file = (tmp_path / "m.onnx").read_bytes() != old_bytes
    assert new_file and not (tmp_path / "m.onnx.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_an_artifact_without_its_record_is_not_published(tmp_path):
    with pytest.raises(ValueError, match="no record"), atomic_artifact(tmp_path / "a.pte") as st:
        st.path.write_bytes(b"program")
    assert list(tmp_path.iterdir()) == []
