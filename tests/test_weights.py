"""The weights loader beyond the happy path of tests/test_checkpoints.py.

That file loads each official layout once; this one pins what it leaves open: the
Apple layout against names read from apple/ml-fastvit (not only our own inverse), the
full wrapper preference order, prefixes on every format, files written by `mvd
reparam`, mismatches and refused pickles through the CLI, legacy (pre-zip) torch
files, odd tensors (sparse, meta, float8) and keys that are not strings, and every
way `--pretrained` / a weights URL can go. Equivalence runs under stress weights.
"""

import argparse
import dataclasses
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_layouts import apple_checkpoint, to_apple
from conftest import CountingHandler, stressed, test_inputs
from safetensors.torch import save_file
from typer.testing import CliRunner

from mobilevit_deploy import registry, zoo
from mobilevit_deploy.api import load_model, resolve_pretrained
from mobilevit_deploy.cli import app
from mobilevit_deploy.errors import BadInput, CheckpointMismatch, MvdError
from mobilevit_deploy.reparam import reparameterize
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.weights import WRAPPER_KEYS, load_into_spec, read_checkpoint

NAME = "fastvit_t8"
SIZE = 64


@pytest.fixture(scope="module")
def source():
    """A stressed model, its inputs and float64 outputs: what every loaded copy must give.

    Float64, so a deploy or fused copy differs only by its weights' float32 rounding
    (~1e-7), not by float32 arithmetic in another order.
    """
    model = stressed(NAME, SIZE)
    x = test_inputs(NAME, SIZE, count=2)
    return model, x, TorchRunner(model, torch.float64)(x)


@pytest.fixture(scope="module")
def other_state(source):
    """The source weights with a shifted head: a different but fitting checkpoint."""
    state = dict(source[0].state_dict())
    state["head.fc.bias"] = state["head.fc.bias"] + 1.0
    return state


def rel_error(model, x, expected) -> float:
    out = TorchRunner(model, torch.float64)(x)
    return float(np.abs(out - expected).max() / np.abs(expected).max())


def contiguous(state: dict) -> dict:
    return {k: v.contiguous() for k, v in state.items()}


def user_error(result, *fragments: str) -> str:
    """Exit 2, one `error:` line on stderr (last, after any progress bar) naming
    `fragments`, no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}"
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    message = errors[0]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    return message


def reparam_cli(weights: Path, output: Path):
    """`mvd reparam` fails at the load, before any fusing: the cheapest CLI loader."""
    return CliRunner().invoke(app, ["reparam", NAME, "--weights", str(weights), "-o", str(output)])


# --- Apple's layout, checked against names read from apple/ml-fastvit --------------

# models/fastvit.py: `patch_embed` = convolutional_stem (3 MobileOneBlocks), `network` =
# [stage blocks, PatchEmbed, ...], RepMixerBlock.{token_mixer.{norm,mixer,layer_scale},
# convffn.{conv.{conv,bn},fc1,fc2}, layer_scale}, PatchEmbed.proj = [ReparamLargeKernelConv
# (lkb_origin, small_conv), MobileOneBlock], conv_exp (MobileOneBlock with SE), head.
APPLE_T8_TRAIN = {
    "patch_embed.0.rbr_conv.0.conv.weight": (48, 3, 3, 3),
    "patch_embed.0.rbr_scale.bn.running_var": (48,),
    "patch_embed.2.rbr_skip.weight": (48,),
    "network.0.0.token_mixer.mixer.rbr_conv.0.conv.weight": (48, 1, 3, 3),
    "network.0.0.token_mixer.norm.rbr_skip.running_mean": (48,),
    "network.0.0.token_mixer.layer_scale": (48, 1, 1),
    "network.0.0.convffn.conv.conv.weight": (48, 1, 7, 7),
    "network.0.0.convffn.fc1.weight": (144, 48, 1, 1),
    "network.0.1.layer_scale": (48, 1, 1),
    "network.1.proj.0.lkb_origin.conv.weight": (96, 1, 7, 7),
    "network.1.proj.0.small_conv.bn.weight": (96,),
    "network.1.proj.1.rbr_conv.0.conv.weight": (96, 96, 1, 1),
    "network.4.3.convffn.fc2.bias": (192,),
    "network.6.1.token_mixer.mixer.rbr_scale.conv.weight": (384, 1, 1, 1),
    "conv_exp.rbr_conv.0.conv.weight": (768, 1, 3, 3),
    "conv_exp.se.reduce.weight": (48, 768, 1, 1),
    "conv_exp.se.expand.bias": (768,),
    "head.weight": (1000, 768),
}
# The `_reparam` files: RepMixer, MobileOneBlock and RepCPE keep `reparam_conv`, the large
# kernel conv becomes `lkb_reparam`; ConvFFN has no reparameterize() and keeps its BN.
APPLE_T8_DEPLOY = {
    "patch_embed.0.reparam_conv.weight": (48, 3, 3, 3),
    "network.0.0.token_mixer.reparam_conv.bias": (48,),
    "network.0.0.convffn.conv.bn.running_var": (48,),
    "network.1.proj.0.lkb_reparam.weight": (96, 1, 7, 7),
    "network.1.proj.1.reparam_conv.weight": (96, 96, 1, 1),
    "conv_exp.reparam_conv.weight": (768, 1, 3, 3),
    "conv_exp.se.reduce.bias": (48,),
    "head.bias": (1000,),
}


@pytest.mark.parametrize("form", ["train", "deploy"])
def test_the_synthetic_apple_layout_has_the_official_names(source, form):
    model = source[0] if form == "train" else reparameterize(source[0], fold_affine=False)
    apple = to_apple(model.state_dict())
    anchors = APPLE_T8_TRAIN if form == "train" else APPLE_T8_DEPLOY
    for key, shape in anchors.items():
        assert key in apple, key
        assert tuple(apple[key].shape) == shape, key
    # T8: four RepMixer stages and three PatchEmbeds, no RepCPE: network.0 .. network.6.
    assert {k.split(".")[1] for k in apple if k.startswith("network.")} == set("0123456")
    assert not any(k.startswith(("stages.", "stem.", "final_conv.")) for k in apple)


def test_the_hybrid_layout_puts_repcpe_before_its_stage():
    """SA12: stage 4 is [RepCPE, attention blocks] at network.6 and network.7."""
    model = zoo.get_spec("fastvit_sa12").build()
    apple = to_apple(model.state_dict())
    assert tuple(apple["network.6.pe.weight"].shape) == (512, 1, 7, 7)
    for key in ("norm.running_var", "token_mixer.qkv.weight", "layer_scale_1", "layer_scale_2"):
        assert f"network.7.0.{key}" in apple, key
    deploy = to_apple(reparameterize(model, fold_affine=False).state_dict())
    assert "network.6.reparam_conv.weight" in deploy and "network.6.pe.weight" not in deploy


@pytest.mark.parametrize("form", ["train", "deploy"])
def test_apple_files_give_the_source_outputs(source, tmp_path, form):
    model, x, expected = source
    weights = model if form == "train" else reparameterize(model, fold_affine=False)
    path = tmp_path / ("fastvit_t8.pth.tar" if form == "train" else "fastvit_t8_reparam.pth.tar")
    torch.save(apple_checkpoint(weights.state_dict()), path)
    loaded = load_model(NAME, weights=path)
    assert loaded.mvd_provenance.form == form
    assert loaded.mvd_provenance.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rel_error(loaded, x, expected) < 1e-6


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_apple_layout_saved_through_ddp_loads(source, tmp_path, suffix):
    """A fine-tune of Apple's model under DistributedDataParallel: `module.network.*`."""
    model, x, expected = source
    state = {f"module.{k}": v for k, v in to_apple(contiguous(model.state_dict())).items()}
    path = tmp_path / f"ddp{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    assert rel_error(load_model(NAME, weights=path), x, expected) < 1e-6


# --- wrappers and prefixes ---------------------------------------------------------

PAIRS = [(a, b) for i, a in enumerate(WRAPPER_KEYS) for b in WRAPPER_KEYS[i + 1 :]]


def test_the_documented_preference_order():
    assert WRAPPER_KEYS == ("state_dict_ema", "model_ema", "state_dict", "model")


@pytest.mark.parametrize(("preferred", "other"), PAIRS, ids=[f"{a}>{b}" for a, b in PAIRS])
def test_every_wrapper_pair_picks_the_preferred(source, other_state, tmp_path, preferred, other):
    model, x, expected = source
    path = tmp_path / "both.pth.tar"
    # The less preferred key first: the order in the file must not matter.
    torch.save({other: other_state, "epoch": 9, preferred: model.state_dict()}, path)
    loaded = load_model(NAME, weights=path)
    assert loaded.mvd_provenance.wrapper_key == preferred
    assert rel_error(loaded, x, expected) < 1e-6


def test_an_empty_or_missing_ema_falls_through(source, tmp_path):
    """timm saves `state_dict_ema: None` or `{}` when EMA was off; the plain weights win."""
    model, x, expected = source
    path = tmp_path / "no_ema.pth.tar"
    torch.save({"state_dict_ema": {}, "model_ema": None, "state_dict": model.state_dict()}, path)
    loaded = load_model(NAME, weights=path)
    assert loaded.mvd_provenance.wrapper_key == "state_dict"
    assert rel_error(loaded, x, expected) < 1e-6


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixes_in_safetensors(source, tmp_path, prefix):
    model, x, expected = source
    path = tmp_path / "w.safetensors"
    save_file({f"{prefix}{k}": v for k, v in contiguous(model.state_dict()).items()}, str(path))
    loaded = load_model(NAME, weights=path)
    assert loaded.mvd_provenance.wrapper_key is None
    assert rel_error(loaded, x, expected) < 1e-6


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_file_written_by_mvd_reparam_loads_fused(source, tmp_path, suffix):
    model, x, expected = source
    train = tmp_path / "train.pt"
    torch.save(model.state_dict(), train)
    fused = tmp_path / f"fused{suffix}"
    result = CliRunner().invoke(app, ["reparam", NAME, "--weights", str(train), "-o", str(fused)])
    assert result.exit_code == 0, result.output
    loaded = load_model(NAME, weights=fused)
    assert loaded.mvd_provenance.form == "fused"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    assert rel_error(loaded, x, expected) < 1e-5
    if suffix == ".pt":
        assert torch.load(fused, weights_only=True)["mvd"]["form"] == "fused"


def test_trainer_arguments_of_any_plain_shape_load(source, tmp_path):
    """SeaFormer-style `args`: a Namespace holding lists, dicts and None."""
    model, x, expected = source
    args = argparse.Namespace(lr=0.1, sched=[30, 60], aug={"mixup": 0.8}, resume=None)
    path = tmp_path / "args.pth"
    torch.save({"args": args, "state_dict": model.state_dict()}, path)
    assert rel_error(load_model(NAME, weights=path), x, expected) < 1e-6


# --- mismatches, through the API and the CLI --------------------------------------


def _mismatch(case: str, state: dict) -> tuple[dict, tuple[str, ...]]:
    state = dict(state)
    if case == "missing":
        del state["stages.2.blocks.1.mlp.fc1.bias"]
        return state, ("missing keys: stages.2.blocks.1.mlp.fc1.bias",)
    if case == "extra":
        state["stages.2.blocks.9.mlp.fc1.bias"] = torch.zeros(3)
        return state, ("unexpected keys: stages.2.blocks.9.mlp.fc1.bias",)
    state["final_conv.se.fc1.weight"] = state["final_conv.se.fc1.weight"].reshape(48, 768)
    return state, ("final_conv.se.fc1.weight (48, 768) vs model (48, 768, 1, 1)",)


@pytest.mark.parametrize("case", ["missing", "extra", "reshaped"])
def test_one_wrong_key_is_named_by_the_api_and_the_cli(source, tmp_path, case):
    state, fragments = _mismatch(case, source[0].state_dict())
    path = tmp_path / f"{case}.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointMismatch) as caught:
        load_model(NAME, weights=path)
    message = str(caught.value)
    assert all(f in message for f in fragments), message
    assert message.count("keys:") + message.count("mismatches:") == 1  # only that key
    user_error(reparam_cli(path, tmp_path / "out.pt"), *fragments)
    assert not (tmp_path / "out.pt").exists()


def test_another_variant_through_the_cli(tmp_path):
    path = tmp_path / "fastvit_sa12.pth.tar"
    torch.save(apple_checkpoint(zoo.get_spec("fastvit_sa12").build().state_dict()), path)
    message = user_error(reparam_cli(path, tmp_path / "out.pt"), "does not fit the model")
    assert "stages.3.pos_emb" in message or "shape mismatches" in message


# --- values and tensors -----------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_nonfinite_values_name_the_key(source, tmp_path, value, suffix):
    state = contiguous(source[0].state_dict())
    key = "stages.1.blocks.0.token_mixer.mixer.identity.running_var"
    state[key] = state[key].clone()
    state[key][5] = value
    path = tmp_path / f"bad{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(BadInput, match=f"NaN or Inf values in {key}"):
        load_model(NAME, weights=path)
    user_error(reparam_cli(path, tmp_path / "out.pt"), key)


@pytest.mark.parametrize("key", [0, ("stem", 0), b"stem.0"], ids=["int", "tuple", "bytes"])
def test_keys_that_are_not_strings_are_bad_input(tmp_path, key):
    path = tmp_path / "keys.pt"
    torch.save({key: torch.zeros(1), "head.fc.bias": torch.zeros(1000)}, path)
    with pytest.raises(BadInput, match="keys"):
        read_checkpoint(path)


ODD_TENSORS = {
    "sparse": lambda: torch.zeros(1000).to_sparse(),
    "meta": lambda: torch.zeros(1000, device="meta"),
    "float8": lambda: torch.zeros(1000, dtype=torch.float8_e4m3fn),
}


@pytest.mark.parametrize("kind", list(ODD_TENSORS))
def test_odd_tensors_are_bad_input_or_load(source, tmp_path, kind):
    """Sparse/meta tensors cannot be weights; float8 may be cast like fp16 is."""
    state = dict(source[0].state_dict())
    state["head.fc.bias"] = ODD_TENSORS[kind]()
    path = tmp_path / f"{kind}.pt"
    torch.save(state, path)
    try:
        model = load_into_spec(zoo.get_spec(NAME), path)
    except MvdError:
        return
    assert model.head.fc.bias.dtype == torch.float32


# --- pickles that carry code ------------------------------------------------------


class _Payload:
    """Unpickling this would run `call(*args)`, whose effect leaves `marker` behind."""

    def __init__(self, call, args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return (self.call, self.args)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("call", ["os.system", "builtins.exec"])
def test_code_carrying_pickles_are_refused_by_the_cli(tmp_path, legacy, call):
    marker = tmp_path / "pwned"
    payload = (
        _Payload(os.system, (f"touch {marker}",))
        if call == "os.system"
        else _Payload(exec, (f"open({str(marker)!r}, 'w').close()",))
    )
    path = tmp_path / "evil.pth.tar"
    state = {"head.fc.bias": torch.zeros(1000)}
    torch.save(
        {"state_dict": state, "args": payload}, path, _use_new_zipfile_serialization=not legacy
    )
    named = "posix.system" if call == "os.system" else "exec"
    with pytest.raises(BadInput, match=f"refused, its pickle would call {named}"):
        read_checkpoint(path)
    user_error(reparam_cli(path, tmp_path / "out.pt"), named, "nothing was run")
    assert not marker.exists()


def test_a_plain_pickle_with_code_is_refused_and_not_run(tmp_path):
    """Not a torch file at all (pickle.dump): refused all the same, nothing runs."""
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"w": _Payload(os.system, (f"touch {marker}",))}))
    with pytest.raises(BadInput):
        read_checkpoint(path)
    assert not marker.exists()


# --- corrupt files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_file(source, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("real") / "fastvit_t8.pth.tar"
    torch.save(apple_checkpoint(source[0].state_dict()), path)
    return path.read_bytes()


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.9, 0.9999])
def test_a_truncated_real_checkpoint_is_one_line(real_file, tmp_path, fraction):
    path = tmp_path / "cut.pth.tar"
    path.write_bytes(real_file[: int(len(real_file) * fraction)])
    with pytest.raises(BadInput, match="not a readable checkpoint"):
        read_checkpoint(path)
    user_error(reparam_cli(path, tmp_path / "out.pt"), str(path))


@pytest.mark.parametrize(
    "name",
    ["missing.pt", "folder.pth", "header_past_end.safetensors", "torch_file.safetensors"],
)
def test_unusable_paths_are_one_line(real_file, tmp_path, name):
    path = tmp_path / name
    if name == "folder.pth":
        path.mkdir()
    elif name == "header_past_end.safetensors":
        path.write_bytes((1 << 20).to_bytes(8, "little") + b'{"w":')
    elif name == "torch_file.safetensors":
        path.write_bytes(real_file)
    with pytest.raises(BadInput):
        read_checkpoint(path)
    user_error(reparam_cli(path, tmp_path / "out.pt"), name)


def _legacy_file(tmp_path: Path) -> bytes:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(8)}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def test_a_legacy_torch_file_loads(source, tmp_path):
    """torch < 1.6 wrote a bare pickle stream; old official checkpoints still are."""
    model, x, expected = source
    path = tmp_path / "old.pth"
    torch.save({"state_dict": model.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert rel_error(load_model(NAME, weights=path), x, expected) < 1e-6


LEGACY_DAMAGE = {
    "one byte t": lambda legacy: b"t",
    "one byte q": lambda legacy: b"q",
    "pickle tail cut": lambda legacy: legacy[: len(legacy) - 20],
    "storage key flipped": lambda legacy: _flip_first_storage_key(legacy),
}


def _flip_first_storage_key(legacy: bytes) -> bytes:
    """The tensor names a storage key that the storage list after it does not hold."""
    key = re.search(rb"Storage\nq.X....(\d+)", legacy, re.S).group(1)
    other = key[:-1] + (b"1" if key[-1:] != b"1" else b"2")
    return legacy.replace(key, other, 1)


@pytest.mark.parametrize("damage", list(LEGACY_DAMAGE))
def test_damaged_legacy_files_are_bad_input(tmp_path, damage):
    """A file that is not a zip is parsed as a bare pickle stream: errors of every type."""
    path = tmp_path / "damaged.pt"
    path.write_bytes(LEGACY_DAMAGE[damage](_legacy_file(tmp_path)))
    with pytest.raises(BadInput):
        read_checkpoint(path)


# --- --pretrained and weights URLs ------------------------------------------------


def _publish(monkeypatch, *sources: registry.WeightSource) -> None:
    spec = zoo.get_spec(NAME)
    monkeypatch.setitem(registry.SPECS, NAME, dataclasses.replace(spec, weight_sources=sources))


def _cache_files() -> list[Path]:
    cache = Path(os.environ["MVD_CACHE_DIR"])
    return [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_resolve_pretrained_by_tag_and_default(monkeypatch):
    a = registry.WeightSource("in1k", "https://example.invalid/a.pth.tar", "a" * 64)
    b = registry.WeightSource("in1k_reparam", "https://example.invalid/b.pth.tar", fused=True)
    _publish(monkeypatch, a, b)
    spec = zoo.get_spec(NAME)
    assert resolve_pretrained(spec, True) == (a.url, a.sha256)
    assert resolve_pretrained(spec, "in1k_reparam") == (b.url, None)
    with pytest.raises(BadInput, match="available: in1k, in1k_reparam"):
        resolve_pretrained(spec, "in22k")


def test_no_published_weights_and_both_options_are_bad_input(monkeypatch, tmp_path):
    _publish(monkeypatch)
    with pytest.raises(BadInput, match="no published weights; pass --weights PATH"):
        load_model(NAME, pretrained=True)
    with pytest.raises(BadInput, match="either --weights or --pretrained"):
        load_model(NAME, weights=tmp_path / "w.pt", pretrained="in1k")


def test_a_reparam_tag_downloads_the_deploy_file(source, monkeypatch, weights_server):
    model, x, expected = source
    root, base = weights_server
    file = root / "fastvit_t8_reparam.pth.tar"
    torch.save(apple_checkpoint(reparameterize(model, fold_affine=False).state_dict()), file)
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    _publish(monkeypatch, registry.WeightSource("in1k_reparam", f"{base}/{file.name}", sha, True))
    loaded = load_model(NAME, pretrained="in1k_reparam", progress=False)
    assert loaded.mvd_provenance.form == "deploy"
    assert loaded.mvd_provenance.source == f"{base}/{file.name}"
    assert rel_error(loaded, x, expected) < 1e-6


def test_a_weights_url_is_fetched_once(source, weights_server):
    model, x, expected = source
    root, base = weights_server
    torch.save(model.state_dict(), root / "ft.pth")
    for _ in range(2):
        loaded = load_model(NAME, weights=f"{base}/ft.pth", progress=False)
        assert rel_error(loaded, x, expected) < 1e-6
    assert CountingHandler.hits == ["/ft.pth"]
    assert [p.name for p in _cache_files()] == ["ft.pth"]


def test_a_missing_file_on_the_server_leaves_nothing_cached(monkeypatch, weights_server, tmp_path):
    _, base = weights_server
    _publish(monkeypatch, registry.WeightSource("in1k", f"{base}/gone.pth.tar", "0" * 64))
    with pytest.raises(BadInput, match="HTTP 404"):
        load_model(NAME, pretrained="in1k", progress=False)
    assert _cache_files() == []


def test_a_wrong_checksum_through_the_cli(source, monkeypatch, weights_server, tmp_path):
    root, base = weights_server
    torch.save(apple_checkpoint(source[0].state_dict()), root / "fastvit_t8.pth.tar")
    _publish(monkeypatch, registry.WeightSource("in1k", f"{base}/fastvit_t8.pth.tar", "f" * 64))
    result = CliRunner().invoke(
        app, ["reparam", NAME, "--pretrained", "in1k", "-o", str(tmp_path / "out.pt")]
    )
    user_error(result, "checksum mismatch")
    assert _cache_files() == []
    assert not (tmp_path / "out.pt").exists()
