"""LeViT's zoo entries and what its checkpoints need: the token grid a checkpoint was
trained at, its bias tables resized to another, and the official facebookresearch
layout mapped to timm's names. The network itself is levit.py.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import BadInput
from ..registry import ModelSpec, Preprocessing, WeightSource, register
from .levit import Levit, build_levit, relative_position_index, stage_grids

# --- Token grid of a checkpoint, and resizing its bias tables ----------------------
_FIRST_TABLE = "stages.0.blocks.0.attn.attention_biases"
_FIRST_DENSE = "stages.0.blocks.0.attn.attention_bias_dense"
_TABLE = re.compile(r"stages\.(\d+)\.(blocks\.\d+\.attn|downsample\.attn_downsample)\.")


def checkpoint_size(
    state: dict, declared: tuple[int, int] | None, asked: tuple[int, int] | None
) -> tuple[int, int]:
    """The input size a LeViT state dict was trained at, from its first bias table.

    A table holds H/16 x W/16 entries. In order: the size a hub config declares, if
    it has that many tokens; the square size, if the count is a square (so a 256
    checkpoint asked for at 128x512, the same 256 tokens, is resized, not misread);
    for a non-square count, the size asked for, if it has that many tokens.
    """
    table = state.get(_FIRST_TABLE)
    tokens = table.shape[-1] if table is not None else None
    if tokens is None and _FIRST_DENSE in state:
        tokens = state[_FIRST_DENSE].shape[-1]
    if tokens is None:
        raise BadInput(f"no LeViT attention-bias table in the checkpoint ({_FIRST_TABLE})")
    stride = Levit.stem_stride

    def fits(size: tuple[int, int] | None) -> bool:
        return size is not None and (size[0] // stride) * (size[1] // stride) == tokens

    if fits(declared):
        return tuple(declared)
    side = math.isqrt(tokens)
    if side * side == tokens:
        return (side * stride, side * stride)
    if fits(asked):
        return tuple(asked)
    raise BadInput(
        f"the checkpoint's bias tables have a {tokens}-token grid, not a square one: pass the "
        f"size it was trained at, --image-size HxW with (H/16) x (W/16) = {tokens}"
    )


def _resize_table(table: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """(heads, h*w) -> (heads, h'*w'): the table is an image of offsets (|dy|, |dx|)."""
    grid = table.detach().to(torch.float64).reshape(1, -1, *src)
    resized = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return resized.reshape(table.shape[0], dst[0] * dst[1]).to(table.dtype)


def resize_bias_tables(state: dict, src: tuple[int, int], dst: tuple[int, int]) -> dict:
    """A state dict trained at input size `src` with its bias tables resampled for `dst`."""
    if any(k.endswith("attention_bias_dense") for k in state):
        raise BadInput(
            "this LeViT file is fused (its bias tables are gathered for one grid); "
            "resize from the train-time checkpoint instead, then fuse"
        )
    depth = 1 + max(int(m.group(1)) for k in state if (m := _TABLE.match(k)))
    src_grids, dst_grids = stage_grids(src, depth), stage_grids(dst, depth)
    out = dict(state)
    for key, value in state.items():
        m = _TABLE.match(key)
        if m is None or not key.endswith("attention_biases"):
            continue
        stage = int(m.group(1))
        grid = stage if m.group(2).startswith("blocks") else stage - 1  # keys of the stage before
        out[key] = _resize_table(value, src_grids[grid], dst_grids[grid])
    return out


# --- Official facebookresearch/LeViT layout -> timm names ---------------------------
# Official: `patch_embed.{0,2,4,6}` (Conv2d_BN), one flat `blocks.N` list of
# Residual(Attention) `m.qkv/m.proj.1`, Residual(MLP) `m.0/m.2`, and, between
# stages, AttentionSubsample `kv/q.1/proj.1` followed by its Residual(MLP). A fused
# layer (`c` + `bn`, or `bn` + `l` in the heads) becomes a plain layer after the
# official `replace_batchnorm`, so `<layer>.weight` maps to `<layer>.linear.weight`.
_OFFICIAL_LAYERS = {
    "m.qkv": "attn.qkv",
    "m.proj.1": "attn.proj.ln",
    "m.0": "mlp.ln1",
    "m.2": "mlp.ln2",
    "kv": "attn_downsample.kv",
    "q.1": "attn_downsample.q.ln",
    "proj.1": "attn_downsample.proj.ln",
}


def is_official_layout(state_dict: dict) -> bool:
    return any(k.startswith(("patch_embed.", "blocks.")) for k in state_dict)


def _official_block_paths(state_dict: dict) -> dict[int, str]:
    """Flat block index -> timm path (`stages.S.blocks.J` or `stages.S.downsample`)."""
    kinds: dict[int, str] = {}
    for key in state_dict:
        m = re.match(r"blocks\.(\d+)\.(m\.qkv|m\.0|kv)\.", key)
        if m:
            kinds[int(m.group(1))] = m.group(2)
    paths, stage, block, after_subsample = {}, 0, 0, False
    for n in sorted(kinds):
        if kinds[n] == "kv":
            stage, block, after_subsample = stage + 1, 0, True
            paths[n] = f"stages.{stage}.downsample"
        elif kinds[n] == "m.qkv":
            paths[n], after_subsample = f"stages.{stage}.blocks.{block}", False
        elif after_subsample:  # the MLP right after a subsampling attention
            paths[n] = f"stages.{stage}.downsample"
        else:
            paths[n] = f"stages.{stage}.blocks.{block}"
            block += 1
    return paths


def _layer_tail(tail: str) -> str:
    """`c.X` / `l.X` / `bn.X` of a Conv2d_BN, Linear_BN or BN_Linear; bare X if fused."""
    m = re.match(r"(c|l|bn)\.(.+)", tail)
    if m:
        return ("bn." if m.group(1) == "bn" else "linear.") + m.group(2)
    return f"linear.{tail}"


def _check_official_index(key: str, index: Tensor) -> None:
    """The official index buffer must agree with ours (it is dropped, not loaded), on
    some grid of its size: square at the official 224, any H x W when fine-tuned."""
    nq, nk = index.shape
    stride = 1 if nq == nk else 2
    for h in (d for d in range(1, nk + 1) if nk % d == 0):
        ours = relative_position_index((h, nk // h), stride)
        if ours.shape == index.shape and torch.equal(ours, index.to(ours.dtype)):
            return
    raise BadInput(f"{key}: the official bias index disagrees with this model's layout")


def remap_official(state_dict: dict) -> dict:
    """Official facebookresearch/LeViT names (train or `replace_batchnorm` form) -> timm's.

    The `attention_bias_idxs` buffers are checked against our index, then dropped.
    """
    if not is_official_layout(state_dict):
        return state_dict
    paths = _official_block_paths(state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attention_bias_idxs"):
            _check_official_index(key, value)
            continue
        new = None
        if m := re.match(r"patch_embed\.(\d+)\.(.+)", key):
            new = f"stem.conv{int(m.group(1)) // 2 + 1}.{_layer_tail(m.group(2))}"
        elif m := re.match(r"(head|head_dist)\.(.+)", key):
            new = f"{m.group(1)}.{_layer_tail(m.group(2))}"
        elif m := re.match(r"blocks\.(\d+)\.(.+)", key):
            n, rest = int(m.group(1)), m.group(2)
            base = paths.get(n)
            if base is None:
                raise BadInput(f"{key}: not part of any official LeViT block")
            if rest.endswith("attention_biases"):
                sub = "attn" if rest.startswith("m.") else "attn_downsample"
                new = f"{base}.{sub}.attention_biases"
            else:
                for old, ours in _OFFICIAL_LAYERS.items():
                    if rest.startswith(old + "."):
                        new = f"{base}.{ours}.{_layer_tail(rest[len(old) + 1 :])}"
                        break
        out[new if new is not None else key] = value  # unknown keys surface as unexpected
    return out


_OFFICIAL_URLS = {
    "128s": "https://dl.fbaipublicfiles.com/LeViT/LeViT-128S-96703c44.pth",
    "128": "https://dl.fbaipublicfiles.com/LeViT/LeViT-128-b88c2750.pth",
    "192": "https://dl.fbaipublicfiles.com/LeViT/LeViT-192-92712e41.pth",
    "256": "https://dl.fbaipublicfiles.com/LeViT/LeViT-256-13b5763e.pth",
    "384": "https://dl.fbaipublicfiles.com/LeViT/LeViT-384-9bdaf2e2.pth",
}

for _variant, _url in _OFFICIAL_URLS.items():
    register(
        ModelSpec(
            name=f"levit_{_variant}",
            family="levit",
            builder=partial(build_levit, _variant),
            input_size=224,
            preprocessing=Preprocessing(crop_pct=0.9, interpolation="bicubic"),
            weight_sources=(WeightSource("dist_in1k", _url),),
            remap_state_dict=remap_official,
            # The stem's total stride; the subsampling stages round up, so any multiple
            # of 16 runs. The bias tables tie the weights to a size (levit.py docstring).
            size_multiple=16,
            head_key="head.linear.weight",
            sized_by_input=True,
            checkpoint_size=checkpoint_size,
            resize_state=resize_bias_tables,
            description=f"LeViT-{_variant.upper()} (Meta, ICCV 2021), ImageNet-1k, distilled",
        )
    )
