"""LeViT: exact parameter counts, exact reparameterization under stress, the dense
attention bias and merged head, no stale bias cache, official and timm checkpoints,
and an ONNX graph without bias gathers or BatchNorms.

Fused and unfused are compared in float64 on a float64 copy of the stressed model:
under the stress weights LeViT is chaotic in float32 (every residual branch at full
strength drives attention logits to ranges of 1e2-1e3; the softmax then amplifies
rounding 30-200x per block), so rounding the folded weights back to float32 alone
moves the output by 1e-2..5e-1 of its scale (measured), hiding the fold's own error
(~1e-14). stress.py damps the residual branches LeViT zero-initialises, which keeps
float32 artifacts within 1e-5 while every branch still contributes.
"""

import copy
import itertools

import numpy as np
import onnx
import pytest
import torch
from conftest import stressed, test_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mobilevit_deploy.models.levit as levit
import mobilevit_deploy.models.levit_zoo as levit_zoo
from mobilevit_deploy import api
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.reparam import fuse, reparameterize, training_leftovers
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.stress import check_sane_outputs
from mobilevit_deploy.weights import load_into_spec
from mobilevit_deploy.zoo import get_spec

# docs/architecture.md and the official code (distillation head included): train / official deploy.
PARAMS = {
    "levit_128s": (7_777_058, 7_756_466),
    "levit_128": (9_213_936, 9_188_864),
    "levit_192": (10_947_069, 10_918_613),
    "levit_256": (18_893_876, 18_856_276),
    "levit_384": (39_128_836, 39_074_100),
}
SIZE = 224
FAST = settings(max_examples=30, deadline=None)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stressed224(name: str, seed: int = 0) -> nn.Module:
    """conftest's stress weights at 224, on a seeded build (the init is not drawn by stress)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return stressed(name, SIZE, seed)


def run64(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.double()(torch.from_numpy(x).double())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_counts_train_and_official_deploy(name):
    model = get_spec(name).build()
    assert n_params(model) == PARAMS[name][0]
    assert n_params(reparameterize(model, fold_affine=False)) == PARAMS[name][1]
    # Our folds move the bias tables into buffers and merge the heads: fewer parameters.
    assert n_params(reparameterize(model)) < PARAMS[name][1]


@pytest.mark.parametrize("name", list(PARAMS))
def test_reparam_is_exact_under_stress(name):
    model = stressed224(name).double()
    x = test_inputs(name, SIZE, count=2)
    ref = run64(copy.deepcopy(model), x)
    assert check_sane_outputs(ref.numpy()) == []
    for fold_affine in (False, True):
        fused = reparameterize(model, fold_affine=fold_affine)
        assert training_leftovers(fused) == []
        err = rel_err(run64(fused, x), ref)
        assert err < 1e-5, f"{name} fold_affine={fold_affine}: differs by {err:.2e} of scale"


def test_fused_form_has_dense_bias_buffers_and_one_head():
    fused = reparameterize(get_spec("levit_128s").build())
    kinds = {type(m).__name__ for m in fused.modules()}
    assert not kinds & {"BatchNorm1d", "BatchNorm2d"}
    buffers = dict(fused.named_buffers())
    assert not any("attention_bias_idxs" in k for k in buffers)
    assert not any("attention_biases" in k for k, _ in fused.named_parameters())
    dense = {k: v for k, v in buffers.items() if k.endswith("attention_bias_dense")}
    assert len(dense) == 2 + 3 + 4 + 2  # 128S: blocks per stage + two subsampling attentions
    assert dense["stages.0.blocks.0.attn.attention_bias_dense"].shape == (4, 196, 196)
    assert dense["stages.1.downsample.attn_downsample.attention_bias_dense"].shape == (8, 49, 196)
    assert dense["stages.2.downsample.attn_downsample.attention_bias_dense"].shape == (16, 16, 49)
    assert set(dense) <= set(fused.state_dict())  # persistent: a fused checkpoint carries them
    assert fused.head_dist is None
    assert [n for n, m in fused.named_modules() if n.startswith("head")] == ["head", "head.linear"]


def test_official_deploy_form_keeps_bias_tables_and_both_heads():
    deploy = reparameterize(get_spec("levit_128s").build(), fold_affine=False)
    assert training_leftovers(deploy) == []
    names = [n for n, _ in deploy.named_parameters()]
    assert "stages.0.blocks.0.attn.attention_biases" in names
    assert "head_dist.linear.weight" in names and "head.linear.bias" in names
    assert "stem.conv1.linear.bias" in names  # BN folded into the conv, which gained a bias


def test_reparam_is_idempotent_and_leaves_the_caller_alone():
    model = stressed224("levit_128s")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    fused = reparameterize(model)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    again = reparameterize(fused)
    assert fused.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fused.state_dict().items())


def test_weights_loaded_after_eval_take_effect():
    """The official code caches the gathered bias on `train(False)`; a later load would
    leave that cache stale. Here the bias is gathered in every forward."""
    x = test_inputs("levit_128s", SIZE, count=1)
    target = stressed224("levit_128s", seed=1)
    model = stressed224("levit_128s", seed=2).eval()
    before = run64(copy.deepcopy(model), x)
    model.load_state_dict(target.state_dict())
    expected = run64(copy.deepcopy(target), x)
    assert rel_err(run64(copy.deepcopy(model), x), expected) < 1e-12
    assert rel_err(before, expected) > 1e-2
    # The bias tables alone, changed in place after .eval(), change the output too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.mul_(-1)
    assert rel_err(run64(copy.deepcopy(model), x), expected) > 1e-3


def test_a_wrong_fold_is_caught_under_stress(monkeypatch):
    """The head merge with the wrong weights (sum instead of mean) must show up."""
    model = stressed224("levit_128s").double()
    x = test_inputs("levit_128s", SIZE, count=2)
    ref = run64(copy.deepcopy(model), x)
    original = fuse.combine_linears
    monkeypatch.setattr(fuse, "combine_linears", lambda layers, _c: original(layers, [1.0, 1.0]))
    assert rel_err(run64(reparameterize(model), x), ref) > 1e-2


# --- The pieces: index, subsampling, fuse math ---------------------------------------
def official_bias_index(resolution: int, stride: int) -> torch.Tensor:
    """The official enumeration: offsets numbered by first appearance (levit.py)."""
    res_q = (resolution - 1) // stride + 1
    keys = list(itertools.product(range(resolution), range(resolution)))
    queries = list(itertools.product(range(res_q), range(res_q)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in queries:
        for p2 in keys:
            off = (abs(p1[0] * stride - p2[0]), abs(p1[1] * stride - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.tensor(idxs).view(len(queries), len(keys))


@pytest.mark.parametrize(("res", "stride"), [(14, 1), (7, 1), (4, 1), (14, 2), (7, 2)])
def test_bias_index_equals_the_official_one(res, stride):
    assert torch.equal(
        levit.relative_position_index((res, res), stride), official_bias_index(res, stride)
    )


@FAST
@given(h=st.integers(1, 15), w=st.integers(1, 15), stride=st.sampled_from([2, 3]))
def test_subsample_equals_strided_slicing(h, w, stride):
    x = torch.randn(2, h * w, 5)
    expected = x.view(2, h, w, 5)[:, ::stride, ::stride].reshape(2, -1, 5)
    assert torch.equal(levit.Subsample(stride, (h, w))(x), expected)


@FAST
@given(
    fin=st.integers(1, 9),
    fout=st.integers(1, 9),
    coefficients=st.lists(st.floats(-2, 2), min_size=1, max_size=3),
    seed=st.integers(0, 9999),
)
def test_combine_linears_is_exact(fin, fout, coefficients, seed):
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(fin, fout, bias=i % 2 == 0).double() for i in range(len(coefficients))]
    x = torch.randn(4, fin, generator=gen, dtype=torch.float64)
    expected = sum(c * layer(x) for c, layer in zip(coefficients, layers, strict=True))
    w, b = fuse.combine_linears([(la.weight, la.bias) for la in layers], coefficients)
    out = x @ w.T + b
    assert (out - expected).abs().max().item() <= 1e-12 * max(expected.abs().max().item(), 1.0)


@FAST
@given(heads=st.integers(1, 4), res=st.integers(1, 8), stride=st.sampled_from([1, 2]))
def test_dense_bias_table_equals_the_gather(heads, res, stride):
    table = torch.randn(heads, res * res)
    index = levit.relative_position_index((res, res), stride)
    dense = fuse.dense_bias_table(table, index)
    assert dense.dtype == torch.float64 and torch.equal(dense, table.double()[:, index])


def test_dense_bias_table_rejects_bad_indices():
    with pytest.raises(ValueError):
        fuse.dense_bias_table(torch.zeros(2, 4), torch.tensor([[4]]))
    with pytest.raises(ValueError):
        fuse.dense_bias_table(torch.zeros(2, 4), torch.tensor([[0.0]]))


# --- Checkpoints: official and timm layouts, and our own fused form ------------------
def _layer(path: str, rest: str) -> str:
    """Ours `linear.X` / `bn.X` -> the official `c.X` / `bn.X` (`l.X` in the heads)."""
    kind, tail = rest.split(".", 1)
    if kind == "bn":
        return f"{path}.bn.{tail}"
    return f"{path}.{'l' if path.startswith('head') else 'c'}.{tail}"


def to_official(model: nn.Module, state: dict, fused: bool = False) -> dict:
    """This project's names -> the official flat layout, written independently of
    `remap_official`: walks the module tree, numbers the official blocks in order."""
    prefix = {f"stem.conv{i + 1}": f"patch_embed.{2 * i}" for i in range(4)}
    prefix |= {"head": "head", "head_dist": "head_dist"}
    n = 0
    for s, stage in enumerate(model.stages):
        if s > 0:
            base = f"stages.{s}.downsample"
            prefix |= {
                f"{base}.attn_downsample.kv": f"blocks.{n}.kv",
                f"{base}.attn_downsample.q.ln": f"blocks.{n}.q.1",
                f"{base}.attn_downsample.proj.ln": f"blocks.{n}.proj.1",
                f"{base}.attn_downsample": f"blocks.{n}",
                f"{base}.mlp.ln1": f"blocks.{n + 1}.m.0",
                f"{base}.mlp.ln2": f"blocks.{n + 1}.m.2",
            }
            n += 2
        for j in range(len(stage.blocks)):
            base = f"stages.{s}.blocks.{j}"
            prefix |= {
                f"{base}.attn.qkv": f"blocks.{n}.m.qkv",
                f"{base}.attn.proj.ln": f"blocks.{n}.m.proj.1",
                f"{base}.attn": f"blocks.{n}.m",
                f"{base}.mlp.ln1": f"blocks.{n + 1}.m.0",
                f"{base}.mlp.ln2": f"blocks.{n + 1}.m.2",
            }
            n += 2
    out = {}
    for key, value in state.items():
        path, leaf = key.rsplit(".", 1)
        if leaf == "attention_biases":
            out[f"{prefix[path]}.attention_biases"] = value
            size = value.shape[1]
            res = round(size**0.5)
            stride = 2 if "attn_downsample" in path else 1
            out[f"{prefix[path]}.attention_bias_idxs"] = official_bias_index(res, stride)
            continue
        layer_path, rest = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
        if fused:  # official replace_batchnorm: the fused layer replaces the whole pair
            out[f"{prefix[layer_path]}.{leaf}"] = value
        else:
            out[_layer(prefix[layer_path], rest)] = value
    return out


@pytest.mark.parametrize("name", ["levit_128s", "levit_192"])
def test_official_train_checkpoint_loads(tmp_path, name):
    model = stressed224(name)
    official = to_official(model, model.state_dict())
    assert any(k.endswith("m.qkv.c.weight") for k in official)
    path = tmp_path / "official.pth"
    torch.save({"model": official, "epoch": torch.tensor(300)}, path)
    loaded = load_into_spec(get_spec(name), path)
    assert loaded.mvd_provenance.form == "train" and loaded.mvd_provenance.wrapper_key == "model"
    x = test_inputs(name, SIZE, count=1)
    assert rel_err(run64(loaded, x), run64(copy.deepcopy(model), x)) == 0.0


def test_official_fused_checkpoint_loads_as_deploy_form(tmp_path):
    model = stressed224("levit_128s")
    deploy = reparameterize(model, fold_affine=False)
    official = to_official(model, deploy.state_dict(), fused=True)
    assert "patch_embed.0.bias" in official and "head.weight" in official
    path = tmp_path / "official_fused.pth"
    torch.save({"model": official}, path)
    loaded = load_into_spec(get_spec("levit_128s"), path)
    assert loaded.mvd_provenance.form == "deploy"
    x = test_inputs("levit_128s", SIZE, count=1)
    assert rel_err(run64(loaded, x), run64(deploy, x)) == 0.0


def test_official_checkpoint_with_a_foreign_bias_index_is_refused(tmp_path):
    model = get_spec("levit_128s").build()
    official = to_official(model, model.state_dict())
    key = "blocks.0.m.attention_bias_idxs"
    official[key] = official[key].flip(0)
    with pytest.raises(BadInput, match="bias index"):
        levit_zoo.remap_official(official)


def test_timm_checkpoint_loads_as_is(tmp_path):
    """timm's `levit_*` names are ours; its bias index is not persistent, so absent."""
    from safetensors.torch import save_file

    model = stressed224("levit_128s")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert not any("attention_bias_idxs" in k for k in state)
    assert "stages.1.downsample.attn_downsample.q.ln.linear.weight" in state
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    loaded = load_into_spec(get_spec("levit_128s"), path)
    assert loaded.mvd_provenance.form == "train"
    x = test_inputs("levit_128s", SIZE, count=1)
    assert rel_err(run64(loaded, x), run64(copy.deepcopy(model), x)) == 0.0


def test_fused_checkpoint_round_trips(tmp_path):
    fused = reparameterize(stressed224("levit_128s"))
    path = tmp_path / "fused.pth"
    torch.save(fused.state_dict(), path)
    loaded = load_into_spec(get_spec("levit_128s"), path)
    assert loaded.mvd_provenance.form == "fused"
    x = test_inputs("levit_128s", SIZE, count=1)
    assert rel_err(run64(loaded, x), run64(fused, x)) == 0.0


# --- Input size, ONNX, verify --------------------------------------------------------
def test_a_levit_runs_only_the_size_it_was_built_for(tmp_path):
    spec = get_spec("levit_128s")
    assert spec.input_hw == (224, 224) and spec.size_multiple == 16
    with pytest.raises(BadInput, match="takes 224x224 inputs only"):
        spec.build()(torch.zeros(1, 3, 256, 256))
    with pytest.raises(BadInput, match="multiples of 16"):
        api.export("levit_128s", output=tmp_path / "b.onnx", image_size=200)
    assert list(tmp_path.iterdir()) == []
    at256 = api.export("levit_128s", output=tmp_path / "a.onnx", image_size=256)
    assert at256.metadata["input_shape"] == [1, 3, 256, 256]


def test_onnx_export_matches_and_has_no_bias_gather_or_batchnorm(tmp_path):
    model = stressed224("levit_128s")
    x = test_inputs("levit_128s", SIZE, count=2)
    art = api.export("levit_128s", model=model, output=tmp_path / "levit.onnx")
    graph = onnx.load(str(art.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops
    assert "Gather" not in ops and "GatherElements" not in ops and "GatherND" not in ops
    assert ops.count("Softmax") == 11 and ops.count("Gemm") + ops.count("MatMul") > 0
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # subsampling: unit-step slices only
        if node.op_type == "Slice" and len(node.input) > 4:
            assert np.all(consts[node.input[4]] == 1), node.name
    # Each attention adds its dense bias as a constant.
    dense_shapes = {tuple(v.shape) for v in consts.values() if v.ndim == 3}
    assert {(4, 196, 196), (8, 49, 196), (16, 16, 49)} <= dense_shapes
    ref = TorchRunner(model, torch.float64)(x)
    assert check_sane_outputs(ref) == []
    out = np.concatenate([OrtRunner(art.path)(x[i : i + 1]) for i in range(len(x))])
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"onnxruntime differs by {err:.2e} of the output scale"


def test_mvd_verify_passes():
    from mobilevit_deploy.verify import verify

    report = verify("levit_128s", num_images=2)
    assert report.problems == []
    assert report.passed, [(p.candidate, p.metrics["max_rel"]) for p in report.pairs]
