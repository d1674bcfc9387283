"""LeViT (Meta, ICCV 2021) in its train-time form, named like timm's `levit`.

Configs are the official ones (facebookresearch/LeViT, levit.py `specification`);
module names follow timm so timm state dicts load as they are, and `remap_official`
maps the official flat `blocks.N` layout. Counts include the distillation head.

Deploy forms (reparam/engine.py protocol):
  `reparameterize()`  the official `replace_batchnorm`: every Conv-BN, Linear-BN and
                      BN-Linear pair becomes one layer; the attention-bias tables stay
                      parameters, gathered on every call.
  `fold_affine()`     beyond the official code: each bias table is gathered once into a
                      dense (heads, Nq, Nk) buffer (no index tensor, no Gather in the
                      exported graph), the attention scale goes into the query weights,
                      and the two classifier heads, averaged at inference, become one.

Unlike the official and timm code, the train-time attention gathers its bias in every
forward and never caches it on `train(False)`: a cache taken at `.eval()` goes stale
when weights are loaded afterwards, which is what loading a deploy checkpoint does
(weights.py builds the deploy form, in eval mode, then loads into it).

Input size. The bias tables are sized by the token grid (14x14 at 224, H/16 x W/16 in
general, square or not), so a model is built for one input size and its forward
refuses any other. `checkpoint_size` reads the grid a state dict was trained at (a
checkpoint fine-tuned at 256 builds a 256 model); `resize_bias_tables` resamples the
tables to another grid by bicubic interpolation, as timm does for relative-position
tables: that model is no longer the checkpoint's own function, and says so.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import BadInput
from ..registry import ModelSpec, Preprocessing, WeightSource, register
from ..reparam import fuse
from .layers import FeatureStages


class ConvNorm(nn.Module):
    """Conv2d (no bias) + BatchNorm2d; deploy form: the conv with a bias, no norm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return x if self.bn is None else self.bn(x)

    def reparameterize(self) -> None:
        if self.bn is None:
            return
        w, b = fuse.fold_bn_after(self.linear.weight, self.linear.bias, self.bn)
        self.linear, self.bn = fuse.conv_like(self.linear, w, b), None


class LinearNorm(nn.Module):
    """Linear (no bias) + BatchNorm1d over all tokens; deploy form: Linear with bias.

    The norm sees (batch * tokens, channels): a plain Linear->BN1d Sequential would
    normalise over the wrong axis on (B, N, C) input, hence a module of its own.
    """

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn: nn.BatchNorm1d | None = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return x if self.bn is None else self.bn(x.flatten(0, 1)).reshape_as(x)

    def reparameterize(self) -> None:
        if self.bn is None:
            return
        w, b = fuse.fold_bn_after(self.linear.weight, self.linear.bias, self.bn)
        self.linear, self.bn = fuse.linear_like(self.linear, w, b), None


class NormLinear(nn.Module):
    """BatchNorm1d + Linear (the classifier heads); deploy form: one Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn: nn.BatchNorm1d | None = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x if self.bn is None else self.bn(x))

    def reparameterize(self) -> None:
        if self.bn is None:
            return
        scale, shift = fuse.bn_affine(self.bn)
        w, b = fuse.fold_affine_before(self.linear.weight, self.linear.bias, scale, shift)
        self.linear, self.bn = fuse.linear_like(self.linear, w, b), None


def relative_position_index(resolution: tuple[int, int], stride: int = 1) -> Tensor:
    """(Nq, Nk) index into a (heads, H*W) bias table: |dy| * W + |dx| between points.

    Queries sit on every `stride`-th point of the H x W key grid (stride 2 in the
    subsampling attention). This order is timm's, and also the official one: the
    official code numbers offsets by first appearance, and the first query (0, 0)
    meets every offset (dy, dx) in row-major order.
    """
    h, w = resolution
    ky, kx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    qy, qx = torch.meshgrid(torch.arange(0, h, stride), torch.arange(0, w, stride), indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * w + dx


class _BiasedAttention(nn.Module):
    """What both attentions share: the relative-position bias and the folds on it."""

    def _init_bias(self, num_heads: int, resolution: tuple[int, int], stride: int) -> None:
        self.attention_biases: nn.Parameter | None = nn.Parameter(
            torch.zeros(num_heads, resolution[0] * resolution[1])
        )
        # Not persistent (as in timm): it is a function of the geometry, not a weight.
        self.register_buffer(
            "attention_bias_idxs", relative_position_index(resolution, stride), persistent=False
        )
        self.register_buffer("attention_bias_dense", None)  # set by fold_affine
        self.scale_folded = False

    def attention_bias(self) -> Tensor:
        """(heads, Nq, Nk), gathered now: never a cache that could go stale."""
        if self.attention_bias_dense is not None:
            return self.attention_bias_dense
        return self.attention_biases[:, self.attention_bias_idxs]

    def logits(self, q: Tensor, k: Tensor) -> Tensor:
        attn = q @ k
        if not self.scale_folded:
            attn = attn * self.scale
        return attn + self.attention_bias()

    def _query_scale(self) -> Tensor:
        raise NotImplementedError

    def _query_layer(self) -> LinearNorm:
        raise NotImplementedError

    def fold_affine(self) -> None:
        """Dense bias buffer; the attention scale into the query weights (exact)."""
        if self.attention_biases is not None:
            table = self.attention_biases
            dense = fuse.dense_bias_table(table.detach(), self.attention_bias_idxs)
            self.attention_biases = None
            self.attention_bias_idxs = None
            self.attention_bias_dense = dense.to(table.dtype)
        layer = self._query_layer()
        if not self.scale_folded and layer.bn is None:  # BN already folded by reparameterize
            w, b = fuse.scale_output(layer.linear.weight, layer.linear.bias, self._query_scale())
            fuse.assign(layer.linear, w, b)
            self.scale_folded = True


class Attention(_BiasedAttention):
    """Multi-head self-attention over tokens with a learned relative-position bias."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: tuple[int, int]
    ) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim**-0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, (2 * key_dim + self.val_dim) * num_heads)
        self.proj = nn.Sequential(
            OrderedDict(
                act=nn.Hardswish(), ln=LinearNorm(self.val_attn_dim, dim, bn_weight_init=0.0)
            )
        )
        self._init_bias(num_heads, resolution, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = self.logits(q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1)).softmax(dim=-1)
        x = (attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, n, self.val_attn_dim)
        return self.proj(x)

    def _query_layer(self) -> LinearNorm:
        return self.qkv

    def _query_scale(self) -> Tensor:
        # qkv channels are [q | k | v] per head; only the q channels are scaled.
        s = torch.ones(self.num_heads, 2 * self.key_dim + self.val_dim, dtype=fuse.F64)
        s[:, : self.key_dim] = self.scale
        return s.reshape(-1)


class Subsample(nn.Module):
    """Keep every `stride`-th token of the (H, W) grid: x.view(B,H,W,C)[:, ::s, ::s].

    Written as pad + reshape + unit-step slice: the same values, but no strided Slice
    in the exported graph (which some converters and delegates mishandle), and no
    tensor above rank 3 (CoreML stops at rank 5, mobile delegates at 4). Odd sizes
    are padded at the far end, and the padding never lands on a kept position.
    Named `Downsample` in timm; the name only matters for modules with weights.
    """

    def __init__(self, stride: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.stride, self.resolution = stride, resolution

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        (h, w), s = self.resolution, self.stride
        hs, ws = -(-h // s), -(-w // s)
        x = x.reshape(b, h, w, c)
        if (hs * s, ws * s) != (h, w):
            x = nn.functional.pad(x, (0, 0, 0, ws * s - w, 0, hs * s - h))
        x = x.reshape(b * hs, s, ws * s * c)[:, :1]  # first row of each s-row band
        x = x.reshape(b * hs * ws, s, c)[:, :1]  # first column of each s-column band
        return x.reshape(b, hs * ws, c)


class AttentionDownsample(_BiasedAttention):
    """Attention whose queries come from a stride-2 subsampled grid (halves H and W)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: tuple[int, int],
        stride: int = 2,
    ) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim**-0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.kv = LinearNorm(in_dim, (key_dim + self.val_dim) * num_heads)
        self.q = nn.Sequential(
            OrderedDict(
                down=Subsample(stride, resolution), ln=LinearNorm(in_dim, key_dim * num_heads)
            )
        )
        self.proj = nn.Sequential(
            OrderedDict(act=nn.Hardswish(), ln=LinearNorm(self.val_attn_dim, out_dim))
        )
        self._init_bias(num_heads, resolution, stride)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        kv = self.kv(x).view(b, n, self.num_heads, -1)
        k, v = kv.split([self.key_dim, self.val_dim], dim=3)
        q = self.q(x).view(b, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        attn = self.logits(q, k.permute(0, 2, 3, 1)).softmax(dim=-1)
        x = (attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, -1, self.val_attn_dim)
        return self.proj(x)

    def _query_layer(self) -> LinearNorm:
        return self.q.ln

    def _query_scale(self) -> Tensor:
        return torch.full((self.num_heads * self.key_dim,), self.scale, dtype=fuse.F64)


class LevitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LevitDownsample(nn.Module):
    """Between stages: subsampling attention (no residual), then a residual MLP."""

    def __init__(
        self, in_dim: int, out_dim: int, key_dim: int, resolution: tuple[int, int]
    ) -> None:
        super().__init__()
        self.attn_downsample = AttentionDownsample(
            in_dim, out_dim, key_dim, in_dim // key_dim, 4.0, resolution
        )
        self.mlp = LevitMlp(out_dim, 2 * out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_downsample(x)
        return x + self.mlp(x)


class LevitBlock(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, 2.0, resolution)
        self.mlp = LevitMlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class LevitStage(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        depth: int,
        num_heads: int,
        resolution: tuple[int, int],
        downsample: bool,
    ) -> None:
        super().__init__()
        if downsample:
            self.downsample: nn.Module = LevitDownsample(in_dim, out_dim, key_dim, resolution)
            resolution = tuple((r - 1) // 2 + 1 for r in resolution)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(LevitBlock(out_dim, key_dim, num_heads, resolution) for _ in range(depth))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


def _stem16(out_chs: int) -> nn.Sequential:
    """Four stride-2 3x3 ConvNorms (3 -> C/8 -> C/4 -> C/2 -> C), Hardswish between."""
    chs = [3, out_chs // 8, out_chs // 4, out_chs // 2, out_chs]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(4):
        layers[f"conv{i + 1}"] = ConvNorm(chs[i], chs[i + 1])
        if i < 3:
            layers[f"act{i + 1}"] = nn.Hardswish()
    return nn.Sequential(layers)


def stage_grids(image_size: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """Token grid of each stage: H/16 x W/16, then halved (rounding up) per stage."""
    grid = (image_size[0] // Levit.stem_stride, image_size[1] // Levit.stem_stride)
    grids = [grid]
    for _ in range(stages - 1):
        grid = ((grid[0] - 1) // 2 + 1, (grid[1] - 1) // 2 + 1)
        grids.append(grid)
    return grids


class Levit(FeatureStages, nn.Module):
    """LeViT with its distillation head; inference averages the two heads (as timm).

    With no classes (timm's num_classes=0) both heads are gone, BatchNorm included, and
    the pooled tokens come out."""

    stem_stride = 16

    def __init__(
        self,
        embed_dim: tuple[int, ...],
        key_dim: int,
        num_heads: tuple[int, ...],
        depth: tuple[int, ...],
        image_size: tuple[int, int] = (224, 224),
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.img_size = tuple(image_size)
        self.embed_dim = tuple(embed_dim)
        self.stem = _stem16(embed_dim[0])
        self.grids = stage_grids(self.img_size, len(embed_dim))
        stages, in_dim = [], embed_dim[0]
        for i, dim in enumerate(embed_dim):
            resolution = self.grids[max(i - 1, 0)]  # a downsampling stage sees the grid before
            stages.append(
                LevitStage(in_dim, dim, key_dim, depth[i], num_heads[i], resolution, i > 0)
            )
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.head: nn.Module = (
            NormLinear(embed_dim[-1], num_classes) if num_classes else nn.Identity()
        )
        self.head_dist: NormLinear | None = (
            NormLinear(embed_dim[-1], num_classes) if num_classes else None
        )

    def stage_info(self) -> list[tuple[int, int]]:
        """timm's feature_info: the three stages at strides 16, 32, 64."""
        return [(self.stem_stride * 2**i, dim) for i, dim in enumerate(self.embed_dim)]

    def forward_stages(self, x: Tensor, last: int) -> list[Tensor]:
        """Each stage's tokens as an NCHW map of its grid (timm's NCHW feature format)."""
        outs, x = [], self.stem(x).flatten(2).transpose(1, 2)
        for stage, (h, w) in zip(self.stages[: last + 1], self.grids, strict=False):
            x = stage(x)
            outs.append(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w))
        return outs

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if tuple(x.shape[-2:]) != self.img_size:
            h, w = self.img_size
            raise BadInput(
                f"this LeViT takes {h}x{w} inputs only, got {x.shape[-2]}x{x.shape[-1]}: its "
                f"attention-bias tables are sized by the token grid it was built for. Build "
                f"it for that size (--image-size), which resizes the tables of a checkpoint."
            )
        if self.features is not None:
            return self.feature_outputs(x)
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.stages(x).mean(dim=1)
        if self.head_dist is None:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2

    def fold_affine(self) -> None:
        """(head(x) + head_dist(x)) / 2 -> one Linear; after both BNs were folded."""
        if self.head_dist is None or self.head.bn is not None or self.head_dist.bn is not None:
            return
        a, b = self.head.linear, self.head_dist.linear
        w, bias = fuse.combine_linears([(a.weight, a.bias), (b.weight, b.bias)], [0.5, 0.5])
        self.head.linear, self.head_dist = fuse.linear_like(a, w, bias), None


# Official `specification`: C embed dims, D key dim, N heads, X depths.
_CONFIGS = {
    "128s": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4)),
    "128": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4)),
    "192": dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4)),
    "256": dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4)),
    "384": dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4)),
}


def build_levit(
    variant: str, num_classes: int = 1000, image_size: tuple[int, int] = (224, 224)
) -> Levit:
    return Levit(num_classes=num_classes, image_size=image_size, **_CONFIGS[variant])


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
            # of 16 runs. The bias tables tie the weights to a size (module docstring).
            size_multiple=16,
            head_key="head.linear.weight",
            sized_by_input=True,
            checkpoint_size=checkpoint_size,
            resize_state=resize_bias_tables,
            description=f"LeViT-{_variant.upper()} (Meta, ICCV 2021), ImageNet-1k, distilled",
        )
    )
