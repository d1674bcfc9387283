"""Checkpoints as users have them: official layouts, wrappers, prefixes, formats, and
every way a file can be wrong, through the API and the CLI.

Each loaded model is compared with the model the file was made from (outputs, not
just keys), under stress weights so a misplaced tensor cannot go unnoticed.
"""

import argparse
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_layouts import apple_checkpoint, to_apple
from conftest import CountingHandler, stressed, test_inputs
from safetensors.torch import save_file
from typer.testing import CliRunner

from mobilevit_deploy import registry, zoo
from mobilevit_deploy.api import load_model
from mobilevit_deploy.cli import app
from mobilevit_deploy.errors import BadInput, CheckpointMismatch
from mobilevit_deploy.reparam import reparameterize
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.weights import read_checkpoint

NAME = "fastvit_t8"
SIZE = 64


@pytest.fixture(scope="module")
def source():
    """A stressed model, its inputs and its outputs: what every loaded copy must give."""
    model = stressed(NAME, SIZE)
    x = test_inputs(NAME, SIZE, count=2)
    return model, x, TorchRunner(model)(x)


def same_outputs(model, x, expected) -> float:
    out = TorchRunner(model)(x)
    return float(np.abs(out - expected).max() / np.abs(expected).max())


def test_apple_unfused_checkpoint_loads_into_the_train_form(source, tmp_path):
    model, x, expected = source
    path = tmp_path / "fastvit_t8.pth.tar"
    torch.save(apple_checkpoint(model.state_dict()), path)
    assert any(k.startswith("network.") for k in torch.load(path)["state_dict"])
    loaded = load_model(NAME, weights=path)
    assert loaded.mvd_provenance.form == "train"
    assert loaded.mvd_provenance.wrapper_key == "state_dict"
    assert same_outputs(loaded, x, expected) < 1e-6


def test_apple_reparam_checkpoint_loads_into_the_deploy_form(source, tmp_path):
    model, x, expected = source
    deploy = reparameterize(model, fold_affine=False)
    apple = to_apple(deploy.state_dict())
    assert any(".lkb_reparam." in k for k in apple) and any(".reparam_conv." in k for k in apple)
    path = tmp_path / "fastvit_t8_reparam.pth.tar"
    torch.save({"state_dict": apple}, path)
    loaded = load_model(NAME, weights=path)
    assert loaded.mvd_provenance.form == "deploy"
    assert same_outputs(loaded, x, expected) < 1e-5


def test_every_apple_key_maps_back(source):
    """remap_apple must undo the official layout key for key, in both forms."""
    model = source[0]
    spec = zoo.get_spec(NAME)
    for form in (model, reparameterize(model, fold_affine=False)):
        ours = form.state_dict()
        assert set(spec.remap_state_dict(to_apple(ours))) == set(ours)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="timm-plain"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="module-prefix"),
        pytest.param(lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, id="compiled"),
        pytest.param(lambda sd: {"model": sd}, id="model"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict"),
        pytest.param(lambda sd: {"model_ema": sd}, id="model_ema"),
    ],
)
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_files_in_every_wrapper(source, tmp_path, wrap, suffix):
    model, x, expected = source
    path = tmp_path / f"w{suffix}"
    torch.save(wrap(model.state_dict()), path)
    assert same_outputs(load_model(NAME, weights=path), x, expected) < 1e-6


def test_ema_weights_are_preferred(source, tmp_path):
    """Training scripts save both; the EMA weights are the ones that evaluate best."""
    model, x, expected = source
    other = stressed(NAME, SIZE, seed=1).state_dict()
    path = tmp_path / "both.pth.tar"
    torch.save({"state_dict": other, "state_dict_ema": model.state_dict()}, path)
    loaded = load_model(NAME, weights=path)
    assert loaded.mvd_provenance.wrapper_key == "state_dict_ema"
    assert same_outputs(loaded, x, expected) < 1e-6


def test_safetensors_and_the_fused_file_of_mvd_reparam(source, tmp_path):
    model, x, expected = source
    plain = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    assert same_outputs(load_model(NAME, weights=plain), x, expected) < 1e-6
    fused = tmp_path / "fused.safetensors"
    state = {k: v.contiguous() for k, v in reparameterize(model).state_dict().items()}
    save_file(state, str(fused))
    loaded = load_model(NAME, weights=fused)
    assert loaded.mvd_provenance.form == "fused"
    assert same_outputs(loaded, x, expected) < 1e-5


def test_trainer_arguments_beside_the_weights_load(source, tmp_path):
    """SeaFormer's official files carry the trainer's argparse.Namespace under `args`."""
    model, x, expected = source
    path = tmp_path / "with_args.pth.tar"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": model.state_dict()}, path)
    assert same_outputs(load_model(NAME, weights=path), x, expected) < 1e-6


class _Payload:
    """Unpickling this would create `marker`: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_carries_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    with pytest.raises(BadInput, match=r"refused, its pickle would call posix\.system"):
        load_model(NAME, weights=path)
    assert not marker.exists()


def test_a_mismatch_names_missing_unexpected_and_misshaped_keys(source, tmp_path):
    state = dict(source[0].state_dict())
    del state["head.fc.bias"]
    state["head.extra"] = torch.zeros(3)
    state["head.fc.weight"] = torch.zeros(1000, 700)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch) as caught:
        load_model(NAME, weights=path)
    message = str(caught.value)
    assert "missing keys: head.fc.bias" in message
    assert "unexpected keys: head.extra" in message
    assert "head.fc.weight (1000, 700) vs model (1000, 768)" in message


def test_another_variant_does_not_fit(tmp_path):
    path = tmp_path / "sa12.pt"
    torch.save(zoo.get_spec("fastvit_sa12").build().state_dict(), path)
    with pytest.raises(CheckpointMismatch, match="does not fit the model"):
        load_model(NAME, weights=path)


def test_nan_weights_are_named(source, tmp_path):
    state = dict(source[0].state_dict())
    state["head.fc.bias"] = state["head.fc.bias"].clone()
    state["head.fc.bias"][3] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(BadInput, match=r"NaN or Inf values in head\.fc\.bias"):
        load_model(NAME, weights=path)


def _truncated(tmp_path: Path) -> Path:
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.randn(1000)}, whole)
    data = whole.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "half.pt"


CORRUPT = {
    "empty.pt": lambda d: (d / "empty.pt").write_bytes(b""),
    "text.pth": lambda d: (d / "text.pth").write_text("not a checkpoint\n"),
    "random.pt": lambda d: (d / "random.pt").write_bytes(np.random.default_rng(1).bytes(5000)),
    "zip.pt": lambda d: __import__("zipfile").ZipFile(d / "zip.pt", "w").writestr("a", "b"),
    "header.safetensors": lambda d: (d / "header.safetensors").write_bytes(
        (64).to_bytes(8, "little") + b"{not json" + b" " * 60
    ),
}


@pytest.mark.parametrize("name", [*CORRUPT, "half.pt"])
def test_corrupt_files_are_one_line_errors_with_exit_2(tmp_path, name):
    if name == "half.pt":
        path = _truncated(tmp_path)
    else:
        CORRUPT[name](tmp_path)
        path = tmp_path / name
    with pytest.raises(BadInput):
        read_checkpoint(path)
    result = CliRunner().invoke(
        app, ["export", NAME, "--weights", str(path), "-o", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def _publish(monkeypatch, url: str, sha256: str) -> None:
    spec = zoo.get_spec(NAME)
    source = registry.WeightSource("in1k", url, sha256)
    monkeypatch.setitem(registry.SPECS, NAME, dataclasses.replace(spec, weight_sources=(source,)))


def test_pretrained_downloads_once_into_the_cache(source, tmp_path, monkeypatch, weights_server):
    model, x, expected = source
    root, base = weights_server
    torch.save(apple_checkpoint(model.state_dict()), root / "fastvit_t8.pth.tar")
    sha = hashlib.sha256((root / "fastvit_t8.pth.tar").read_bytes()).hexdigest()
    _publish(monkeypatch, f"{base}/fastvit_t8.pth.tar", sha)
    first = load_model(NAME, pretrained="in1k", progress=False)
    second = load_model(NAME, pretrained=True, progress=False)
    assert CountingHandler.hits == ["/fastvit_t8.pth.tar"]
    for loaded in (first, second):
        assert same_outputs(loaded, x, expected) < 1e-6
        assert loaded.mvd_provenance.sha256 == sha
    cached = list(Path(os.environ["MVD_CACHE_DIR"]).rglob("*.pth.tar"))
    assert len(cached) == 1


def test_pretrained_with_a_wrong_checksum_is_refused_and_not_cached(
    source, monkeypatch, weights_server
):
    root, base = weights_server
    torch.save(apple_checkpoint(source[0].state_dict()), root / "fastvit_t8.pth.tar")
    _publish(monkeypatch, f"{base}/fastvit_t8.pth.tar", "0" * 64)
    with pytest.raises(BadInput, match=r"(?i)checksum|sha256"):
        load_model(NAME, pretrained="in1k", progress=False)
    cache = Path(os.environ["MVD_CACHE_DIR"])
    assert [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []
