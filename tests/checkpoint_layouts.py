"""Synthetic checkpoints in the layouts the official code writes.

Apple's ml-fastvit (models/fastvit.py) keeps every stage in one flat `network` list:
a RepCPE (`pe`, or `reparam_conv` once fused) before the stage it encodes, the stage's
blocks, and a PatchEmbed (`proj`: a ReparamLargeKernelConv, then a MobileOneBlock)
between stages. Its modules are named `patch_embed` (stem), `rbr_conv` / `rbr_scale` /
`rbr_skip` (MobileOne branches), `lkb_origin` / `small_conv` / `lkb_reparam` (large
kernel), `convffn`, `se.reduce` / `se.expand`, bare `layer_scale*` parameters,
`conv_exp` (final conv) and a `head` Linear. Apple's training script saves
`{"state_dict": ..., ...}` as `.pth.tar`.

This builds that layout from one of our (timm-named) state dicts, so a test can check
that `remap_apple` undoes it for every key of every form.
"""

from __future__ import annotations

import re

_RENAMES = [
    (r"^stem\.", "patch_embed."),
    (r"\.conv_kxk\.", ".rbr_conv."),
    (r"\.conv_scale\.", ".rbr_scale."),
    (r"\.identity\.", ".rbr_skip."),
    (r"\.large_conv\.", ".lkb_origin."),
    (r"^final_conv\.", "conv_exp."),
    (r"\.mlp\.", ".convffn."),
    (r"\.se\.fc1\.", ".se.reduce."),
    (r"\.se\.fc2\.", ".se.expand."),
    (r"(layer_scale(_[12])?)\.gamma$", r"\1"),
    (r"^head\.fc\.", "head."),
]


def _network_index(state_dict: dict) -> dict[tuple[int, str], int]:
    """(stage, part) -> position in Apple's `network` list; part: proj, pe or blocks."""
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"stages\.(\d+)\.", k))})
    index, n = {}, 0
    for s in stages:
        for part, prefix in (("proj", "downsample."), ("pe", "pos_emb."), ("blocks", "blocks.")):
            if any(k.startswith(f"stages.{s}.{prefix}") for k in state_dict):
                index[(s, part)] = n
                n += 1
    return index


def to_apple(state_dict: dict) -> dict:
    """Our FastViT state dict (train or deploy form) in Apple's key layout."""
    index = _network_index(state_dict)
    out = {}
    for key, value in state_dict.items():
        k = key
        # The large-kernel conv is the first layer of a PatchEmbed; fused, Apple calls
        # it lkb_reparam (a MobileOneBlock's fused conv is reparam_conv in both).
        k = re.sub(r"(downsample\.proj\.0)\.reparam_conv\.", r"\1.lkb_reparam.", k)
        for pattern, replacement in _RENAMES:
            k = re.sub(pattern, replacement, k)
        if m := re.match(r"stages\.(\d+)\.downsample\.(proj\..*)", k):
            k = f"network.{index[(int(m.group(1)), 'proj')]}.{m.group(2)}"
        elif m := re.match(r"stages\.(\d+)\.pos_emb\.pos_enc\.(.*)", k):
            k = f"network.{index[(int(m.group(1)), 'pe')]}.pe.{m.group(2)}"
        elif m := re.match(r"stages\.(\d+)\.pos_emb\.(reparam_conv\..*)", k):
            k = f"network.{index[(int(m.group(1)), 'pe')]}.{m.group(2)}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(.*)", k):
            k = f"network.{index[(int(m.group(1)), 'blocks')]}.{m.group(2)}"
        out[k] = value
    return out


def apple_checkpoint(state_dict: dict) -> dict:
    """What Apple's training script saves (train.py: `state_dict` plus bookkeeping)."""
    return {"epoch": 299, "arch": "fastvit", "state_dict": to_apple(state_dict)}
