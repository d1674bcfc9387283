"""SepViT: exact parameter counts, the rank-4 forward against the official arithmetic,
the PEG fold (W + I) exact under stress weights at 224 and other sizes, checkpoints of
our layout, and an ONNX graph without einsum, rank-5 values or BatchNorm."""

import copy

import numpy as np
import onnx
import pytest
import torch
from conftest import stressed, test_inputs
from safetensors.torch import save_file
from torch import nn

import mobilevit_deploy.models.sepvit as sv
from mobilevit_deploy import api
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.reparam import fuse, reparameterize, training_leftovers
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.stress import check_sane_outputs
from mobilevit_deploy.zoo import get_spec

NAMES = ["sepvit_lite", "sepvit_tiny", "sepvit_small", "sepvit_base"]
# docs/architecture.md and the official code.
PARAMS = dict(zip(NAMES, [3_661_128, 31_182_856, 46_570_504, 82_377_064], strict=True))
BOUND = 1e-5  # of the output scale (docs/architecture.md)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """On this busy 2-core machine torch's OpenMP threads spin-waiting on each other made
    a 64x64 forward of SepViT-Lite take 8 s instead of 0.07 s. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run64(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(torch.from_numpy(x).double())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def stressed_sepvit(name: str, hw: tuple[int, int], seed: int = 0) -> nn.Module:
    """Stress weights, plus what they leave at init here: the window tokens (zeros) and
    the LayerNorm weights (ones), so a token in the wrong window or a swapped norm shows."""
    model = stressed(name, hw, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("win_tokens"):
                p.copy_(torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
    return model.eval()


# --- the official arithmetic, written out with its rank-5 and rank-6 reshapes -----------


def official_attention(a: sv.SeparableAttention, x: torch.Tensor, hw, ws: int) -> torch.Tensor:
    """`SeparableAttention.forward` of classification/sepvit.py; x (B, windows, T, C)."""
    b, wn, _, c = x.shape
    nh = a.num_heads
    qkv = a.DSA_qkv(x).reshape(b, wn, -1, 3, nh, c // nh).permute(3, 0, 1, 4, 2, 5)
    attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * a.scale).softmax(-1)
    out = (attn @ qkv[2]).transpose(2, 3).reshape(b, wn, -1, c) + x
    if not a.pointwise:
        return a.proj(out.squeeze(1))
    tokens = a.win_tokens_act(a.win_tokens_norm(out[:, :, 0, :]))
    maps = out[:, :, 1:, :]
    qk = a.PSA_qk(tokens).reshape(b, wn, 2, nh, -1).permute(2, 0, 3, 1, 4)
    v = maps.reshape(b, wn, ws * ws, nh, -1).permute(0, 3, 1, 2, 4).reshape(b, nh, wn, -1)
    attn = ((qk[0] @ qk[1].transpose(-2, -1)) * a.scale).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, wn, nh, ws * ws, -1)
    out = out.transpose(2, 3).reshape(b, wn, ws * ws, c) + maps
    out = out.reshape(b, hw[0] // ws, hw[1] // ws, ws, ws, c).transpose(2, 3).reshape(b, -1, c)
    return a.proj(out)


def official_block(blk: sv.SepViTBlock, x: torch.Tensor, hw) -> torch.Tensor:
    b, _, c = x.shape
    if blk.grid is None:
        windows, ws = x.unsqueeze(1), hw[0]
    else:
        (hg, wg), ws = blk.grid, hw[0] // blk.grid[0]
        windows = x.reshape(b, hg, ws, wg, ws, c).transpose(2, 3).reshape(b, hg * wg, ws * ws, c)
        windows = torch.cat((blk.win_tokens.expand(b, -1, -1, -1), windows), dim=2)
    x = x + official_attention(blk.attn, blk.norm1(windows), hw, ws)
    return x + blk.mlp(blk.norm2(x))


def official_forward(model: sv.SepViT, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    for i, embed in enumerate(model.patch_embeds):
        x = embed.proj(x)
        hw = tuple(x.shape[2:])
        x = embed.norm(x.flatten(2).transpose(1, 2))
        for j, blk in enumerate(model.blocks[i]):
            x = official_block(blk, x, hw)
            if j == 0:
                feat = x.transpose(1, 2).reshape(b, -1, *hw)
                x = (model.pos_block[i].proj(feat) + feat).flatten(2).transpose(1, 2)
        if i < 3:
            x = x.reshape(b, *hw, -1).permute(0, 3, 1, 2)
    return model.head(model.norm(x).mean(dim=1))


# --- counts and forms --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_param_counts(name):
    with torch.device("meta"):
        model = get_spec(name).build()
    assert n_params(model) == PARAMS[name]


def test_window_layout_is_the_official_one():
    """Windows per block at 224: 64 in stage 1, 16 / 4 in stage 2, 4 / global in stage 3,
    global in stage 4 (the blocks whose 224 window covers the whole map)."""
    with torch.device("meta"):
        model = get_spec("sepvit_small").build()
    grids = [[blk.grid for blk in stage] for stage in model.blocks]
    assert grids == [[(8, 8)], [(4, 4), (2, 2)], [(2, 2), None] * 7, [None, None]]
    assert model.blocks[0][0].win_tokens.shape == (1, 64, 1, 96)
    assert not hasattr(model.blocks[3][0], "win_tokens")
    assert not hasattr(model.blocks[3][0].attn, "PSA_qk")


def test_forms_and_leftovers():
    model = get_spec("sepvit_lite").build()
    deploy = reparameterize(model, fold_affine=False)
    assert deploy.state_dict().keys() == model.state_dict().keys()
    fused = reparameterize(model)
    assert n_params(fused) == PARAMS["sepvit_lite"]
    assert training_leftovers(fused) == []
    pegs = [m for m in fused.modules() if isinstance(m, sv.PosCNN)]
    assert len(pegs) == 4
    assert all(p.proj is None and p.reparam_conv is not None for p in pegs)
    assert all(p.proj is not None for p in model.modules() if isinstance(p, sv.PosCNN))
    again = copy.deepcopy(fused)
    for p in again.modules():
        if isinstance(p, sv.PosCNN):
            p.fold_affine()
    x = torch.from_numpy(test_inputs("sepvit_lite", 64, count=1))
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))


# --- the rank-4 forward equals the official one ------------------------------------------


@pytest.mark.parametrize("hw", [(224, 224), (256, 256)])
def test_forward_equals_the_official_arithmetic(hw):
    """At 224 the official code itself; at 256 the same with 8x8 windows."""
    model = stressed_sepvit("sepvit_lite", hw).double()
    x = torch.from_numpy(test_inputs("sepvit_lite", hw, count=2)).double()
    with torch.no_grad():
        ref = official_forward(model, x)
        out = model(x)
    assert check_sane_outputs(ref.numpy()) == []
    assert rel_err(out, ref) < 1e-12


def test_window_tokens_take_effect():
    model = stressed_sepvit("sepvit_lite", (64, 64)).double()
    x = test_inputs("sepvit_lite", 64, count=2)
    ref = run64(model, x)
    with torch.no_grad():
        tokens = model.blocks[0][0].win_tokens
        tokens.copy_(tokens.roll(1, dims=1))
    assert rel_err(run64(model, x), ref) > 1e-3


@pytest.mark.parametrize(("h", "w", "gh", "gw"), [(56, 56, 8, 8), (14, 20, 2, 2), (24, 40, 4, 2)])
def test_window_partition_round_trips_in_grid_order(h, w, gh, gw):
    x = torch.randn(2, h * w, 3, dtype=torch.float64)
    windows = sv.window_partition(x, (h, w), (gh, gw))
    wh, ww = h // gh, w // gw
    grid = x.reshape(2, gh, wh, gw, ww, 3).transpose(2, 3).reshape(2 * gh * gw, wh * ww, 3)
    assert torch.equal(windows, grid)
    assert torch.equal(sv.window_merge(windows, 2, (h, w), (gh, gw)), x)


# --- the PEG fold ------------------------------------------------------------------------


def check_exact(name: str, hw: tuple[int, int]) -> tuple[float, float]:
    """Fused (fp32-stored and fp64-stored) vs unfused, all run in float64."""
    model = stressed_sepvit(name, hw)
    x = test_inputs(name, hw, count=2)
    ref = run64(model, x)
    assert check_sane_outputs(ref.numpy()) == []
    err32 = rel_err(run64(reparameterize(model), x), ref)
    err64 = rel_err(run64(reparameterize(copy.deepcopy(model).double()), x), ref)
    assert err32 < BOUND, f"{name} at {hw}: fused differs by {err32:.2e} of the output scale"
    assert err64 < 1e-12, f"{name} at {hw}: float64 fused differs by {err64:.2e}"
    return err32, err64


@pytest.mark.parametrize("hw", [(224, 224), (256, 256), (160, 224)])
def test_fold_is_exact_under_stress(hw):
    check_exact("sepvit_lite", hw)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sepvit_tiny", "sepvit_base"])
def test_fold_is_exact_for_the_large_variants(name):
    check_exact(name, (96, 128))


def test_fp32_fused_and_unfused_agree():
    model = stressed_sepvit("sepvit_lite", (224, 224))
    x = test_inputs("sepvit_lite", 224, count=2)
    ref = TorchRunner(model)(x)
    out = TorchRunner(reparameterize(model))(x)
    assert np.abs(out - ref).max() / np.abs(ref).max() < BOUND


def test_a_peg_without_the_identity_is_caught(monkeypatch):
    model = stressed_sepvit("sepvit_lite", (64, 64)).double()
    x = test_inputs("sepvit_lite", 64, count=2)
    ref = run64(model, x)
    monkeypatch.setattr(fuse, "identity_kernel", lambda c, g, k: torch.zeros(c, c // g, k, k))
    assert rel_err(run64(reparameterize(model), x), ref) > 1e-2


# --- input sizes -------------------------------------------------------------------------


def test_spec_sizes_and_refusal():
    spec = get_spec("sepvit_lite")
    assert spec.input_hw == (224, 224) and spec.size_multiple == 32
    model = get_spec("sepvit_lite").build().eval()
    with pytest.raises(BadInput, match="multiples of 32"), torch.no_grad():
        model(torch.zeros(1, 3, 240, 224))


# --- weights -----------------------------------------------------------------------------


def test_no_published_weights():
    spec = get_spec("sepvit_lite")
    assert spec.weight_sources == ()
    assert "no weights" in spec.description
    with pytest.raises(BadInput, match="no published weights"):
        api.load_model("sepvit_lite", pretrained=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_our_state_dicts_load(tmp_path, suffix):
    model = stressed_sepvit("sepvit_lite", (64, 64))
    path = tmp_path / f"sepvit{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = api.load_model("sepvit_lite", weights=path)
    assert loaded.mvd_provenance.form == "train"
    x = test_inputs("sepvit_lite", 64, count=1)
    assert rel_err(run64(loaded, x), run64(model, x)) == 0.0


def test_fused_state_dict_round_trips(tmp_path):
    fused = reparameterize(stressed_sepvit("sepvit_lite", (64, 64)))
    path = tmp_path / "fused.pth"
    torch.save(fused.state_dict(), path)
    loaded = api.load_model("sepvit_lite", weights=path)
    assert loaded.mvd_provenance.form == "fused"
    x = test_inputs("sepvit_lite", 64, count=1)
    assert rel_err(run64(loaded, x), run64(fused, x)) == 0.0


# --- ONNX and verify ---------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(224, 224), (160, 224)])
def test_onnx_export_matches_with_no_einsum_rank5_or_batchnorm(tmp_path, hw):
    model = stressed_sepvit("sepvit_lite", hw)
    x = test_inputs("sepvit_lite", hw, count=2)
    art = api.export("sepvit_lite", model=model, output=tmp_path / "sepvit.onnx", image_size=hw)
    graph = onnx.load(str(art.path))
    ops = [n.op_type for n in graph.graph.node]
    assert "Einsum" not in ops and "BatchNormalization" not in ops
    assert ops.count("Softmax") == 11 + 6  # DSA in every block, PSA in the 6 windowed ones
    inferred = onnx.shape_inference.infer_shapes(graph).graph
    values = list(inferred.value_info) + list(inferred.input) + list(inferred.output)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values}
    assert ranks and max(ranks.values()) <= 4, {k: r for k, r in ranks.items() if r > 4}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == 8  # 4 patch embeds + 4 PEGs folded to one conv each
    ref = TorchRunner(model, torch.float64)(x)
    assert check_sane_outputs(ref) == []
    out = np.concatenate([OrtRunner(art.path)(x[i : i + 1]) for i in range(len(x))])
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"onnxruntime differs by {err:.2e} of the output scale"


def test_mvd_verify_passes():
    from mobilevit_deploy.verify import verify

    report = verify("sepvit_lite", num_images=2)
    assert report.problems == []
    assert report.passed, [(p.candidate, p.metrics["max_rel"]) for p in report.pairs]
