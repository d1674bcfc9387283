"""timm's EfficientViT (MIT) state dicts load into the official-named models.

timm is not installed. Its layout is written out here from timm's module structure
(timm/models/efficientvit_mit.py: `EfficientVit`, `EfficientVitLarge`, `Stem`,
`EfficientVitStage`, `EfficientVitLargeStage`, `ClassifierHead`), independently of
`remap_timm`: `timm_shapes` lists every state-dict entry timm would build, with its
shape, from timm's configs, and `to_timm` renames our keys into it.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import stressed, test_inputs

from mobilevit_deploy import api
from mobilevit_deploy.errors import CheckpointMismatch
from mobilevit_deploy.models.efficientvit import remap_timm
from mobilevit_deploy.zoo import get_spec

SIZE = 64

# timm's @register_model arguments: (large, widths, depths, head_dim, head_widths).
TIMM_CONFIGS = {
    "efficientvit_b0": (False, (8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, (1024, 1280)),
    "efficientvit_b1": (False, (16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600)),
    "efficientvit_b2": (False, (24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560)),
    "efficientvit_b3": (False, (32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560)),
    "efficientvit_l1": (True, (32, 64, 128, 256, 512), (1, 1, 1, 6, 6), 32, (3072, 3200)),
    "efficientvit_l2": (True, (32, 64, 128, 256, 512), (1, 2, 2, 8, 8), 32, (3072, 3200)),
    "efficientvit_l3": (True, (64, 128, 256, 512, 1024), (1, 2, 2, 8, 8), 32, (6144, 6400)),
}
# What timm's efficientvit_b0 state dict holds (counted from the structure below): 50
# conv weights (8 of them LiteMLA's aggregation convs), 12 conv biases, 26 BatchNorms x 5
# entries (num_batches_tracked included), the LayerNorm's 2 and the two Linears' 3.
TIMM_B0_ENTRIES = 197


def _cna(
    out: dict, prefix: str, cin: int, cout: int, k: int, *, groups=1, bias=False, norm=True
) -> None:
    """timm's ConvNormAct: `conv` (create_conv2d -> nn.Conv2d), `norm` or Identity."""
    out[f"{prefix}.conv.weight"] = (cout, cin // groups, k, k)
    if bias:
        out[f"{prefix}.conv.bias"] = (cout,)
    if norm:
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.norm.{name}"] = (cout,)
        out[f"{prefix}.norm.num_batches_tracked"] = ()


def _mbconv(out: dict, p: str, cin: int, cout: int, expand: float, fewer_norm: bool) -> None:
    mid = round(cin * expand)
    _cna(out, f"{p}.inverted_conv", cin, mid, 1, bias=fewer_norm, norm=not fewer_norm)
    _cna(out, f"{p}.depth_conv", mid, mid, 3, groups=mid, bias=fewer_norm, norm=not fewer_norm)
    _cna(out, f"{p}.point_conv", mid, cout, 1)


def _fused_mbconv(out: dict, p: str, cin: int, cout: int, expand: float) -> None:
    mid = round(cin * expand)
    _cna(out, f"{p}.spatial_conv", cin, mid, 3)
    _cna(out, f"{p}.point_conv", mid, cout, 1)


def _vit_block(out: dict, p: str, ch: int, head_dim: int, expand: float) -> None:
    """EfficientVitBlock: LiteMLA (qkv without norm, one 5x5 aggregation) + MBConv."""
    heads = ch // head_dim
    total = heads * head_dim
    att = f"{p}.context_module.main"
    _cna(out, f"{att}.qkv", ch, 3 * total, 1, norm=False)
    out[f"{att}.aggreg.0.0.weight"] = (3 * total, 1, 5, 5)
    out[f"{att}.aggreg.0.1.weight"] = (3 * total, head_dim, 1, 1)
    _cna(out, f"{att}.proj", 2 * total, ch, 1)
    _mbconv(out, f"{p}.local_module.main", ch, ch, expand, fewer_norm=True)


def timm_shapes(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every entry of timm's `name` state dict, with its shape, in timm's order."""
    large, widths, depths, head_dim, head_widths = TIMM_CONFIGS[name]
    out: dict[str, tuple[int, ...]] = {}
    w0 = widths[0]
    _cna(out, "stem.in_conv", 3, w0, 3)
    for i in range(depths[0]):
        if large:  # ConvBlock
            _cna(out, f"stem.res{i}.main.conv1", w0, w0, 3)
            _cna(out, f"stem.res{i}.main.conv2", w0, w0, 3)
        else:  # DSConv
            _cna(out, f"stem.res{i}.main.depth_conv", w0, w0, 3, groups=w0)
            _cna(out, f"stem.res{i}.main.point_conv", w0, w0, 1)
    cin = w0
    for i, (w, d) in enumerate(zip(widths[1:], depths[1:], strict=True)):
        p = f"stages.{i}.blocks"
        if not large:
            vit = i >= 2
            _mbconv(out, f"{p}.0.main", cin, w, 4, fewer_norm=vit)
            for j in range(1, d + 1) if vit else range(1, d):
                if vit:
                    _vit_block(out, f"{p}.{j}", w, head_dim, 4)
                else:
                    _mbconv(out, f"{p}.{j}.main", w, w, 4, fewer_norm=False)
        else:
            vit, fewer = i >= 3, i >= 2
            if fewer:
                _mbconv(out, f"{p}.0.main", cin, w, 24 if vit else 16, fewer_norm=True)
            else:
                _fused_mbconv(out, f"{p}.0.main", cin, w, 16)
            for j in range(1, d + 1):
                if vit:
                    _vit_block(out, f"{p}.{j}", w, head_dim, 6)
                elif fewer:
                    _mbconv(out, f"{p}.{j}.main", w, w, 4, fewer_norm=True)
                else:
                    _fused_mbconv(out, f"{p}.{j}.main", w, w, 4)
        cin = w
    _cna(out, "head.in_conv", cin, head_widths[0], 1)
    out["head.classifier.0.weight"] = (head_widths[1], head_widths[0])
    out["head.classifier.1.weight"] = (head_widths[1],)
    out["head.classifier.1.bias"] = (head_widths[1],)
    out["head.classifier.4.weight"] = (num_classes, head_widths[1])
    out["head.classifier.4.bias"] = (num_classes,)
    return out


# Ours -> timm, container by container (block interiors are named alike).
_HEAD_TO_TIMM = [
    ("head.op_list.0.", "head.in_conv."),
    ("head.op_list.2.linear.", "head.classifier.0."),
    ("head.op_list.2.norm.", "head.classifier.1."),
    ("head.op_list.3.linear.", "head.classifier.4."),
]


def _timm_key(key: str, large: bool) -> str:
    stem = r"backbone\.stages\.0\.op_list" if large else r"backbone\.input_stem\.op_list"
    if m := re.fullmatch(stem + r"\.(\d+)\.(.+)", key):
        j = int(m[1])
        return f"stem.in_conv.{m[2]}" if j == 0 else f"stem.res{j - 1}.{m[2]}"
    if m := re.fullmatch(r"backbone\.stages\.(\d+)\.op_list\.(\d+)\.(.+)", key):
        return f"stages.{int(m[1]) - large}.blocks.{m[2]}.{m[3]}"
    for ours, theirs in _HEAD_TO_TIMM:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(f"no timm name for {key}")


def to_timm(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    large = TIMM_CONFIGS[name][0]
    return {_timm_key(k, large): v for k, v in state.items()}


def test_timm_b0_entry_count():
    assert len(timm_shapes("efficientvit_b0")) == TIMM_B0_ENTRIES


@pytest.mark.parametrize("name", TIMM_CONFIGS)
def test_remapped_keys_are_exactly_ours(name):
    """All seven variants: ours -> timm gives timm's structure (names and shapes), and
    remap_timm brings it back to exactly our keys, every tensor where it came from."""
    state = get_spec(name).build().state_dict()
    timm_state = to_timm(state, name)
    assert {k: tuple(v.shape) for k, v in timm_state.items()} == timm_shapes(name)
    remapped = remap_timm(timm_state)
    assert set(remapped) == set(state)
    assert all(remapped[k] is state[k] for k in state)
    assert remap_timm(state) is state  # our own layout passes through


@pytest.mark.parametrize("name", ["efficientvit_b0", "efficientvit_l1"])
def test_timm_checkpoint_loads_and_matches(tmp_path, name):
    """Saved bare and as `{"state_dict": ...}`: same outputs as the source model."""
    source = stressed(name, SIZE).eval()
    timm_state = to_timm(source.state_dict(), name)
    assert set(timm_state) == set(timm_shapes(name))
    x = torch.from_numpy(test_inputs(name, SIZE))
    with torch.no_grad():
        expected = source(x)
    for wrapper in (None, "state_dict"):
        path = tmp_path / f"timm_{wrapper}.pth"
        torch.save({wrapper: timm_state} if wrapper else timm_state, path)
        loaded = api.load_model(name, weights=path)
        assert loaded.mvd_provenance.form == "train"
        assert loaded.mvd_provenance.wrapper_key == wrapper
        with torch.no_grad():
            assert (loaded(x) - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize(
    ("name", "dropped", "ours"),
    [
        (
            "efficientvit_b0",
            "stages.3.blocks.2.context_module.main.proj.norm.weight",
            "backbone.stages.3.op_list.2.context_module.main.proj.norm.weight",
        ),
        (
            "efficientvit_l1",
            "stem.res0.main.conv2.conv.weight",
            "backbone.stages.0.op_list.1.main.conv2.conv.weight",
        ),
    ],
)
def test_truncated_timm_checkpoint_names_the_missing_key_in_our_naming(
    tmp_path, name, dropped, ours
):
    timm_state = to_timm(get_spec(name).build().state_dict(), name)
    del timm_state[dropped]
    path = tmp_path / "truncated.pth"
    torch.save(timm_state, path)
    with pytest.raises(CheckpointMismatch, match=re.escape(ours)) as info:
        api.load_model(name, weights=path)
    assert dropped not in str(info.value)
