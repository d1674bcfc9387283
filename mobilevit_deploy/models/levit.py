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

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..errors import BadInput
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
