"""SeaFormer: exact parameter counts, official key names and checkpoint layouts, and a
fused form (Conv-BN folds, q/k/v merged, positional tables resampled once) that is
exact under stress weights at the resolution it was fused for, in torch and in ONNX."""

import copy
import inspect

import numpy as np
import onnx
import pytest
import torch
from conftest import stressed, test_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mobilevit_deploy.models.seaformer as sf
import mobilevit_deploy.models.seaformer_zoo as sfz
from mobilevit_deploy import api
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.reparam import fuse, reparameterize, training_leftovers
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.stress import check_sane_outputs
from mobilevit_deploy.zoo import get_spec

VARIANTS = ("tiny", "small", "base", "large")
CLS = [f"seaformer_{v}" for v in VARIANTS]
SEG = [f"seaformer_seg_{v}_ade20k" for v in VARIANTS]
# docs/architecture.md and the official code.
PARAMS = dict(
    zip(
        CLS + SEG,
        [1_781_096, 4_105_656, 8_742_664, 14_046_504, 1_667_318, 3_990_118, 8_605_654, 13_951_510],
        strict=True,
    )
)
BOUND = 1e-5  # of the output scale (docs/architecture.md)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are small: one intra-op thread loses little, and on a busy 2-core
    machine torch's OpenMP threads spin-waiting on each other made this file take 160 s
    instead of 40 s. Restored afterwards, so no other test file is affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run64(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.from_numpy(x).double())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def fused_at(model: nn.Module, hw: tuple[int, int], dtype=torch.float32) -> nn.Module:
    """The fused form for inputs of size hw (what reparameterize(..., image_size=hw) does)."""
    prepared = copy.deepcopy(model).to(dtype)
    prepared.set_export_resolution(*hw)
    return reparameterize(prepared)


def check_exact(name: str, hw: tuple[int, int], seed: int = 0) -> tuple[float, float]:
    """Fused (fp32-stored and fp64-stored weights) vs unfused, all run in float64."""
    model = stressed(name, hw, seed)
    x = test_inputs(name, hw, seed=seed)
    ref = run64(model, x)
    assert check_sane_outputs(ref.numpy()) == []
    fused = fused_at(model, hw)
    assert training_leftovers(fused) == []
    err32 = rel_err(run64(fused, x), ref)
    err64 = rel_err(run64(fused_at(model, hw, torch.float64), x), ref)
    assert err32 < BOUND, f"{name} at {hw}: fused differs by {err32:.2e} of the output scale"
    # Weights kept in float64 after the float64 fold: only summation order differs.
    assert err64 < 1e-11, f"{name} at {hw}: float64 fused differs by {err64:.2e}"
    return err32, err64


# --- counts and forms --------------------------------------------------------------------


@pytest.mark.parametrize("name", CLS + SEG)
def test_param_counts_and_forms(name):
    model = get_spec(name).build()
    assert n_params(model) == PARAMS[name]
    # No official reparameterization: the official deploy form is the train-time form.
    deploy = reparameterize(model, fold_affine=False)
    assert deploy.state_dict().keys() == model.state_dict().keys()
    assert n_params(deploy) == PARAMS[name]
    fused = reparameterize(model)
    assert n_params(fused) < PARAMS[name]
    assert training_leftovers(fused) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())


# --- the two fuse functions this family adds ---------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    outs=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    cin=st.integers(1, 5),
    k=st.sampled_from([1, 3]),
    bias=st.booleans(),
)
def test_concat_output_channels_equals_the_concatenated_outputs(outs, cin, k, bias):
    g = torch.Generator().manual_seed(sum(outs) * 31 + cin)
    x = torch.randn(2, cin, 5, 6, generator=g, dtype=torch.float64)
    layers = [
        (
            torch.randn(o, cin, k, k, generator=g, dtype=torch.float64),
            torch.randn(o, generator=g, dtype=torch.float64) if bias else None,
        )
        for o in outs
    ]
    w, b = fuse.concat_output_channels(layers)
    conv = nn.functional.conv2d
    want = torch.cat([conv(x, lw, lb, padding=k // 2) for lw, lb in layers], dim=1)
    assert torch.allclose(conv(x, w, b, padding=k // 2), want, rtol=0, atol=1e-12)


def test_concat_output_channels_refuses_mismatched_layers():
    with pytest.raises(ValueError, match="beyond their output channels"):
        fuse.concat_output_channels(
            [(torch.zeros(2, 3, 1, 1), None), (torch.zeros(2, 4, 1, 1), None)]
        )


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), channels=st.integers(1, 4), source=st.integers(1, 20))
def test_resample_linear_1d_is_the_interpolation_done_once(n, channels, source):
    table = torch.randn(1, channels, source, dtype=torch.float32, requires_grad=True)
    out = fuse.resample_linear_1d(table, n)
    assert out.dtype == torch.float64 and out.shape == (1, channels, n) and out.grad_fn is None
    want = nn.functional.interpolate(table.detach().double(), size=n, mode="linear")
    assert torch.equal(out, want)


# --- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLS + SEG)
def test_reparam_is_exact_under_stress_at_128(name):
    """128 is not the default export size (224 / 512): the tables are resampled for it."""
    check_exact(name, (128, 128))


@pytest.mark.parametrize(("name", "hw"), [("seaformer_tiny", (96, 160)), (SEG[0], (192, 128))])
def test_reparam_is_exact_on_non_square_inputs(name, hw):
    """H != W: a row table resampled to W (or a column table to H) would fail here."""
    check_exact(name, hw)


def test_builder_default_is_the_spec_size():
    """Without set_export_resolution the fused classifier is made for 224 and exact there."""
    name = "seaformer_tiny"
    model = stressed(name, 224)
    x = test_inputs(name, 224)
    fused = reparameterize(model)
    assert rel_err(run64(fused, x), run64(model, x)) < BOUND


@pytest.mark.slow
@pytest.mark.parametrize("name", [SEG[0], SEG[3]])
def test_segmenter_at_its_default_512(name):
    model = stressed(name, 512)
    x = test_inputs(name, 512, count=2)
    ref = run64(model, x)
    assert ref.shape == (2, 150, 64, 64)
    assert rel_err(run64(reparameterize(model), x), ref) < BOUND


def _squeezed_lengths(model: nn.Module, hw: tuple[int, int]) -> dict[str, int]:
    """The lengths each positional embedding really sees in a forward at hw."""
    seen: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0].shape[-1]))
        for n, m in model.named_modules()
        if isinstance(m, sf.SqueezeAxialPositionalEmbedding)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, *hw))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["seaformer_tiny", "seaformer_large", SEG[3]])
@pytest.mark.parametrize("hw", [(224, 224), (200, 136), (512, 96)])
def test_export_resolution_gives_the_lengths_a_forward_sees(name, hw):
    """The strided-conv arithmetic agrees with the network, odd sizes included."""
    model = get_spec(name).build()
    model.set_export_resolution(*hw)
    seen = _squeezed_lengths(model, hw)
    told = {
        n: m.length
        for n, m in model.named_modules()
        if isinstance(m, sf.SqueezeAxialPositionalEmbedding)
    }
    attentions = [m for m in model.modules() if isinstance(m, sf.SeaAttention)]
    assert seen == told
    assert len(seen) == 4 * len(attentions) > 0


def test_fused_model_refuses_another_size():
    model = get_spec("seaformer_tiny").build()
    fused = fused_at(model, (128, 128))
    fused(torch.zeros(1, 3, 128, 128))
    with pytest.raises(BadInput, match="set_export_resolution"):
        fused(torch.zeros(1, 3, 192, 192))
    with pytest.raises(BadInput, match="train-time"):
        fused.set_export_resolution(192, 192)
    fused.set_export_resolution(128, 128)  # the size it has: fine
    # Reparameterizing again is a no-op.
    again = reparameterize(fused)
    assert again.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fused.state_dict().items())


# --- what the fused graph holds ----------------------------------------------------------


def _interpolated_tensors(model: nn.Module, hw: tuple[int, int], monkeypatch) -> list[str]:
    """What F.interpolate is applied to in a forward: 'param' for a parameter or buffer."""
    owned = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    calls: list[str] = []
    real = torch.nn.functional.interpolate

    def spy(inp, *args, **kwargs):
        calls.append("param" if id(inp) in owned else "activation")
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    with torch.no_grad():
        model(torch.zeros(1, 3, *hw))
    monkeypatch.setattr(torch.nn.functional, "interpolate", real)
    return calls


@pytest.mark.parametrize(("name", "gates"), [("seaformer_tiny", 0), (SEG[0], 2), (SEG[3], 3)])
def test_no_batchnorm_and_no_parameter_interpolation_after_fusion(name, gates, monkeypatch):
    model = get_spec(name).build().eval()
    unfused_calls = _interpolated_tensors(model, (128, 128), monkeypatch)
    assert unfused_calls.count("param") > 0  # the check below can fail
    fused = fused_at(model, (128, 128))
    kinds = {type(m).__name__ for m in fused.modules()}
    assert not kinds & {"BatchNorm2d", "BatchNorm1d", "SyncBatchNorm"}
    assert not any("pos_embed" in n for n, _ in fused.named_parameters())
    # Only the segmentation head's fusion gates (activations) are still resized.
    assert _interpolated_tensors(fused, (128, 128), monkeypatch) == ["activation"] * gates


def test_qkv_merge_is_one_conv_equal_to_the_three():
    model = stressed("seaformer_small", 64)
    fused = fused_at(model, (64, 64), torch.float64)
    merged_by_name = dict(fused.named_modules())
    pairs = [
        (m, merged_by_name[n]) for n, m in model.named_modules() if isinstance(m, sf.SeaAttention)
    ]
    assert len(pairs) == 6
    for orig, merged in pairs:
        assert merged.to_q is None and merged.to_k is None and merged.to_v is None
        conv = merged.to_qkv
        assert conv.kernel_size == (1, 1) and conv.bias is not None
        assert conv.out_channels == 2 * orig.nh_kd + orig.dh
        three = copy.deepcopy(orig).double().eval()
        x = torch.randn(2, conv.in_channels, 4, 4, dtype=torch.float64)
        with torch.no_grad():
            want = torch.cat([three.to_q(x), three.to_k(x), three.to_v(x)], dim=1)
            assert rel_err(conv(x), want) < 1e-12


# --- checkpoints -------------------------------------------------------------------------

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_keys(variant: str, seg: bool) -> list[str]:
    """Every key an official state dict has, enumerated from the official code's structure
    (seaformer-cls/seaformer.py, seaformer-seg backbone + light_head.py), not from ours."""
    cfg = sfz.CONFIGS[variant]
    pre = "backbone." if seg else ""
    keys: list[str] = []

    def conv_bn(path: str, conv: str = "c", norm: str = "bn") -> None:
        keys.append(f"{path}.{conv}.weight")
        keys.extend(f"{path}.{norm}.{k}" for k in BN_KEYS)

    for i, stage in enumerate(cfg["cfgs"]):
        smb = f"{pre}smb{i + 1}"
        if i == 0:
            conv_bn(f"{smb}.stem_block.0")
        for j, (_k, t, _c, _s) in enumerate(stage):
            seq = f"{smb}.layer{j + 1}.conv"
            first = 0
            if t != 1:
                conv_bn(f"{seq}.0")
                first = 2
            conv_bn(f"{seq}.{first}")
            conv_bn(f"{seq}.{first + 2}")
    for i, depth in enumerate(cfg["depths"]):
        for b in range(depth):
            blk = f"{pre}trans{i + 1}.transformer_blocks.{b}"
            for part in ("to_q", "to_k", "to_v", "proj.1", "proj_encode_row.1"):
                conv_bn(f"{blk}.attn.{part}")
            keys += [f"{blk}.attn.pos_emb_row{c}.pos_embed" for c in "qk"]
            conv_bn(f"{blk}.attn.proj_encode_column.1")
            keys += [f"{blk}.attn.pos_emb_column{c}.pos_embed" for c in "qk"]
            conv_bn(f"{blk}.attn.dwconv")
            conv_bn(f"{blk}.attn.pwconv")
            conv_bn(f"{blk}.mlp.fc1")
            keys += [f"{blk}.mlp.dwconv.weight", f"{blk}.mlp.dwconv.bias"]
            conv_bn(f"{blk}.mlp.fc2")
    if not seg:
        return [*keys, "linear.weight", "linear.bias"]
    keys += ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    conv_bn("decode_head.linear_fuse", "conv")
    for i in range(len(sfz.CONFIGS[variant]["depths"])):
        for part in ("local_embedding", "global_act"):
            conv_bn(f"decode_head.fuse{i + 1}.{part}", "conv")
    return keys


@pytest.mark.parametrize("variant", ["tiny", "large"])
@pytest.mark.parametrize("seg", [False, True])
def test_module_names_are_the_official_ones(variant, seg):
    name = f"seaformer_seg_{variant}_ade20k" if seg else f"seaformer_{variant}"
    ours = get_spec(name).build().state_dict()
    assert sorted(ours) == sorted(official_keys(variant, seg))


def to_official_layout(state: dict, seg: bool) -> dict:
    """Our state dict written as the official trainers write theirs. Key names map one to
    one (checked above against the independent enumeration); the layouts differ in the
    wrappers: timm's CheckpointSaver for classification, mmcv's save_checkpoint for
    segmentation (with `meta`, an optimizer, and here an auxiliary head to be dropped)."""
    names = set(official_keys(SEG_VARIANT if seg else CLS_VARIANT, seg))
    assert set(state) == names
    official = {k: v.clone() for k, v in state.items()}
    if not seg:
        return official
    official["auxiliary_head.conv_seg.weight"] = torch.randn(150, 32, 1, 1)
    official["auxiliary_head.conv_seg.bias"] = torch.randn(150)
    return official


CLS_VARIANT, SEG_VARIANT = "tiny", "tiny"


def _perturbed(state: dict, scale: float) -> dict:
    return {
        k: v + scale * torch.randn_like(v) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def test_official_classification_checkpoint_prefers_ema(tmp_path):
    name = f"seaformer_{CLS_VARIANT}"
    model = stressed(name)
    ema = to_official_layout(model.state_dict(), seg=False)
    raw = to_official_layout(_perturbed(model.state_dict(), 0.5), seg=False)
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 599,
            "arch": "SeaFormer_T",
            "state_dict": raw,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.064}]},
            "version": 2,
            "state_dict_ema": ema,
            "metric": 68.1,
        },
        path,
    )
    loaded = api.load_model(name, path)
    assert loaded.mvd_provenance.wrapper_key == "state_dict_ema"
    assert loaded.mvd_provenance.form == "train"
    x = test_inputs(name)
    assert torch.equal(run64(loaded, x), run64(model, x))


def test_official_mmseg_checkpoint_with_syncbn_keys(tmp_path):
    name = f"seaformer_seg_{SEG_VARIANT}_ade20k"
    model = stressed(name)
    official = to_official_layout(model.state_dict(), seg=True)
    assert any(k.endswith(".bn.num_batches_tracked") for k in official)  # SyncBN keys
    path = tmp_path / "iter_160000.pth"
    classes = ("wall", "building", *(f"class {i}" for i in range(2, 150)))
    meta = {"mmseg_version": "0.x", "CLASSES": classes, "iter": 160000}
    torch.save({"meta": meta, "state_dict": official, "optimizer": {"state": {}}}, path)
    loaded = api.load_model(name, path)
    assert loaded.mvd_provenance.wrapper_key == "state_dict"
    assert loaded.mvd_spec.class_names == classes
    x = test_inputs(name)
    assert torch.equal(run64(loaded, x), run64(model, x))


def test_remap_drops_only_the_auxiliary_head():
    state = {"backbone.a": torch.zeros(1), "auxiliary_head.b": torch.zeros(1), "linear.w": 1}
    assert list(sfz.remap_official(state)) == ["backbone.a", "linear.w"]


@pytest.mark.parametrize("name", ["seaformer_tiny", SEG[0]])
def test_fused_checkpoint_loads_as_fused(tmp_path, name):
    model = stressed(name, 128)
    size = get_spec(name).input_hw
    fused = reparameterize(model)  # at the spec's default size, as weights.py builds it
    path = tmp_path / "fused.pt"
    torch.save(fused.state_dict(), path)
    loaded = api.load_model(name, path)
    assert loaded.mvd_provenance.form == "fused"
    x = test_inputs(name, size, count=2)
    assert torch.equal(run64(loaded, x), run64(fused, x))


# --- ONNX --------------------------------------------------------------------------------


def _resized_constants(graph: onnx.GraphProto) -> list[str]:
    """Resize nodes whose data input is computed from constants only (a parameter)."""
    const = {t.name for t in graph.initializer}
    hits = []
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type == "Resize" and node.input[0] in const:
            hits.append(node.name or node.output[0])
        if all(i in const or i == "" for i in node.input):
            const.update(node.output)
    return hits


@pytest.mark.parametrize(
    ("name", "size", "resizes"), [("seaformer_tiny", 224, 0), (SEG[0], 256, 2)]
)
def test_onnx_export_matches_unfused_model(tmp_path, name, size, resizes):
    model = stressed(name, size)
    if size != get_spec(name).input_hw[0]:
        model.set_export_resolution(size, size)
    x = test_inputs(name, size, count=2)
    art = api.export(name, model=model, output=tmp_path / f"{name}.onnx", image_size=size)
    graph = onnx.load(str(art.path))
    onnx.checker.check_model(graph, full_check=True)
    ops = [n.op_type for n in graph.graph.node]
    assert "BatchNormalization" not in ops
    assert _resized_constants(graph.graph) == []
    assert ops.count("Resize") == resizes  # the segmentation head's two fusion gates
    ref = TorchRunner(model, torch.float64)(x)
    out = np.concatenate([OrtRunner(art.path)(x[i : i + 1]) for i in range(len(x))])
    if get_spec(name).task == "segmentation":
        assert out.shape == (2, 150, size // 8, size // 8)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < BOUND, f"{name}: onnxruntime differs by {err:.2e} of the output scale"


def test_unfused_onnx_still_resizes_its_positional_tables(tmp_path):
    """The graph check above can fail: the train-time export resamples 16 tables."""
    art = api.export(
        "seaformer_tiny",
        output=tmp_path / "u.onnx",
        image_size=128,
        reparam=False,
        simplify=False,
    )
    assert len(_resized_constants(onnx.load(str(art.path)).graph)) == 16


@pytest.mark.skipif(
    "image_size" not in inspect.signature(reparameterize).parameters,
    reason="needs the engine hook reparameterize(..., image_size=) (see the SeaFormer report)",
)
def test_api_export_at_another_size_fuses_for_that_size(tmp_path):
    model = stressed("seaformer_tiny", 64)
    art = api.export("seaformer_tiny", model=model, output=tmp_path / "s.onnx", image_size="96x160")
    x = test_inputs("seaformer_tiny", (96, 160), count=1)
    ref = TorchRunner(model, torch.float64)(x)
    assert np.abs(OrtRunner(art.path)(x) - ref).max() < BOUND * np.abs(ref).max()
