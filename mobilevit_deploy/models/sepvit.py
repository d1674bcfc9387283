"""SepViT (Li et al., 2022, "SepViT: Separable Vision Transformer") in its train-time
form: the ImageNet-1k classifiers Lite, Tiny, Small and Base.

Facts come from liwei109/SepViT, `classification/sepvit.py`. Module and parameter names
are the official ones (`patch_embeds`, `pos_block`, `blocks`, `attn.DSA_qkv`,
`attn.PSA_qk`, `win_tokens`, ...), so a state dict of the official code loads as it is.
Dropout and stochastic depth are left out: they hold no weights and are the identity at
inference. The authors never published weights.

A block is depthwise separable self-attention. Depthwise (DSA): attention inside each
window, over the window's pixels plus one learned window token. Pointwise (PSA): the
window tokens, after LayerNorm and GELU, give queries and keys for an attention across
windows whose values are the windows' whole feature maps. Grouped self-attention is the
alternation of 7- and 14-pixel windows (at 224) inside a stage. A block whose window
covers the whole map has no PSA and no window token: plain global attention. A
conditional position encoding (PEG: depthwise 3x3 + residual) follows each stage's
first block.

Input sizes. The official classifier only runs at 224: it fixes each block's number of
windows (and hence its learned window tokens) from 224. Here the window grid is derived
the same way from a design size (224, so parameters and checkpoints are the official
ones) and each window's extent from the actual input: a 256 input has 8x8 windows where
224 has 7x7, with the same learned token for each window. Every multiple of 32 runs,
square or not; at 224 this is exactly the official computation.

Export. Every tensor is at most rank 4 (the official code goes up to rank 6), no einsum,
and the forward branches only on structure fixed at construction.

Deploy form. SepViT has no official reparameterization and no BatchNorm, so
`reparameterize(model, fold_affine=False)` is the train-time form; `fold_affine` folds
each PEG's residual into its depthwise kernel (W + I), exact in eval mode.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from ..errors import BadInput
from ..registry import ModelSpec, Preprocessing, register
from ..reparam import fuse
from .layers import FeatureStages

DESIGN_SIZE = 224
# Total stride of the network; window grids at 224 divide every multiple of it.
SIZE_MULTIPLE = 32


class Mlp(nn.Module):
    """fc1, GELU, fc2 (timm's Mlp, as the official block inherits it)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _multi_head_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v over the last two dims; q, k, v are (M, heads, T, d)."""
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v


class SeparableAttention(nn.Module):
    """The official `SeparableAttention`: DSA, then (with window tokens) PSA, then proj.

    Input (batch * windows, 1 + pixels, C) when `pointwise`, else (batch, pixels, C);
    output (batch * windows, pixels, C), the window token dropped.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, pointwise: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.pointwise = pointwise
        self.DSA_qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if pointwise:
            self.win_tokens_norm = nn.LayerNorm(dim)
            self.win_tokens_act = nn.GELU()
            self.PSA_qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _depthwise(self, x: Tensor) -> Tensor:
        """Attention inside each window (window token included), plus the shortcut."""
        m, t, c = x.shape
        h = self.num_heads
        qkv = self.DSA_qkv(x).reshape(m, t, 3 * h, c // h).transpose(1, 2)
        q, k, v = qkv.split(h, dim=1)
        out = _multi_head_attention(q, k, v, self.scale)
        return out.transpose(1, 2).reshape(m, t, c) + x

    def _pointwise(self, x: Tensor, batch: int) -> Tensor:
        """Attention across windows: window tokens give q and k, whole windows are v."""
        m, t, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        windows, pixels = m // batch, t - 1
        tokens = self.win_tokens_act(self.win_tokens_norm(x[:, 0, :]))
        maps = x[:, 1:, :]
        qk = self.PSA_qk(tokens).reshape(batch, windows, 2 * h, d).transpose(1, 2)
        q, k = qk.split(h, dim=1)
        # Per head, each window's (pixels, d) map flattened: (batch, heads, windows, pixels*d).
        v = maps.reshape(m, pixels, h, d).transpose(1, 2).reshape(batch, windows, h, pixels * d)
        out = _multi_head_attention(q, k, v.transpose(1, 2), self.scale)
        out = out.transpose(1, 2).reshape(m, h, pixels, d).transpose(1, 2).reshape(m, pixels, c)
        return out + maps

    def forward(self, x: Tensor, batch: int) -> Tensor:
        x = self._depthwise(x)
        if self.pointwise:
            x = self._pointwise(x, batch)
        return self.proj(x)


def window_partition(x: Tensor, hw: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """(B, H*W, C) -> (B*gh*gw, wh*ww, C), windows in row-major grid order (rank <= 4)."""
    b, _, c = x.shape
    (height, width), (gh, gw) = hw, grid
    wh, ww = height // gh, width // gw
    x = x.reshape(b * gh, wh, gw, ww * c).transpose(1, 2)
    return x.reshape(b * gh * gw, wh * ww, c)


def window_merge(x: Tensor, batch: int, hw: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The inverse of `window_partition`: (B*gh*gw, wh*ww, C) -> (B, H*W, C)."""
    c = x.shape[-1]
    (height, width), (gh, gw) = hw, grid
    wh, ww = height // gh, width // gw
    x = x.reshape(batch * gh, gw, wh, ww * c).transpose(1, 2)
    return x.reshape(batch, height * width, c)


class SepViTBlock(nn.Module):
    """norm1 -> separable attention -> residual; norm2 -> MLP -> residual.

    `grid` is the (rows, cols) window grid, None for a block that attends globally
    (one window over the whole map at the design size). Each window has one learned
    token, `win_tokens` (1, windows, 1, C), zero-initialised as in the official code.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        norm_layer: type[nn.Module],
        grid: tuple[int, int] | None,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.norm1 = norm_layer(dim)
        self.attn = SeparableAttention(dim, num_heads, qkv_bias, pointwise=grid is not None)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if grid is not None:
            self.win_tokens = nn.Parameter(torch.zeros(1, grid[0] * grid[1], 1, dim))

    def _attend(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if self.grid is None:
            return self.attn(self.norm1(x), x.shape[0])
        if hw[0] % self.grid[0] or hw[1] % self.grid[1]:
            raise BadInput(
                f"a {hw[0]}x{hw[1]} feature map does not split into a {self.grid[0]}x"
                f"{self.grid[1]} window grid; SepViT inputs must be multiples of {SIZE_MULTIPLE}"
            )
        b, _, c = x.shape
        windows = window_partition(x, hw, self.grid)
        tokens = self.win_tokens.expand(b, -1, -1, -1).reshape(windows.shape[0], 1, c)
        out = self.attn(self.norm1(torch.cat((tokens, windows), dim=1)), b)
        return window_merge(out, b, hw, self.grid)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = x + self._attend(x, hw)
        return x + self.mlp(self.norm2(x))


def tokens_to_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) feature map."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, hw[0], hw[1])


class PatchEmbed(nn.Module):
    """Strided conv (padding k // 2), flatten to tokens, LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PosCNN(nn.Module):
    """The official PEG: tokens + depthwise 3x3 conv of the tokens' map.

    `fold_affine` makes it one conv with kernel W + I (`reparam_conv`), exact: a
    depthwise conv whose kernel has a centred 1 added returns its input plus the
    original conv's output, padding included.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj: nn.Sequential | None = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim))
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        feat = tokens_to_map(x, hw)
        out = self.reparam_conv(feat) if self.reparam_conv is not None else self.proj(feat) + feat
        return out.flatten(2).transpose(1, 2)

    def fold_affine(self) -> None:
        if self.reparam_conv is not None:
            return
        conv = self.proj[0]
        weight = conv.weight.to(fuse.F64) + fuse.identity_kernel(self.dim, self.dim, 3)
        self.reparam_conv = fuse.conv_like(conv, weight, conv.bias.to(fuse.F64))
        self.proj = None


def window_grid(feature_size: int, window: int) -> tuple[int, int] | None:
    """The official window count per side at the design size; None for one window."""
    per_side = feature_size // window
    return (per_side, per_side) if per_side > 1 else None


class SepViT(FeatureStages, nn.Module):
    """Four stages: patch embed, blocks (PEG after the first), then norm, mean, head
    (an identity without classes, as in the official code: pooled features)."""

    def __init__(
        self,
        embed_dims: list[int],
        num_heads: list[int],
        depths: list[int],
        windows: list[list[int]],
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        design_size: int = DESIGN_SIZE,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embeds = nn.ModuleList()
        self.pos_block = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            if i == 0:
                self.patch_embeds.append(PatchEmbed(3, dim, 7, 4))
            else:
                self.patch_embeds.append(PatchEmbed(embed_dims[i - 1], dim, 3, 2))
            self.pos_block.append(PosCNN(dim))
            feature_size = design_size // 4 // 2**i
            self.blocks.append(
                nn.ModuleList(
                    SepViTBlock(
                        dim,
                        num_heads[i],
                        mlp_ratio,
                        qkv_bias=True,
                        norm_layer=norm_layer,
                        grid=window_grid(feature_size, windows[i][j]),
                    )
                    for j in range(depths[i])
                )
            )
        self.norm = norm_layer(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes else nn.Identity()
        self.embed_dims = tuple(embed_dims)
        self.apply(_init_weights)

    def stage_info(self) -> list[tuple[int, int]]:
        """The four stages at strides 4, 8, 16, 32 (the official patch embeds)."""
        return [(4 * 2**i, dim) for i, dim in enumerate(self.embed_dims)]

    def _stage_tokens(self, x: Tensor, last: int) -> list[tuple[Tensor, tuple[int, int]]]:
        outs = []
        for i, (pos, blocks) in enumerate(zip(self.pos_block, self.blocks, strict=True)):
            if i > last:
                break
            x, hw = self.patch_embeds[i](x if i == 0 else tokens_to_map(*outs[-1]))
            for j, block in enumerate(blocks):
                x = block(x, hw)
                if j == 0:
                    x = pos(x, hw)
            outs.append((x, hw))
        return outs

    def forward_stages(self, x: Tensor, last: int) -> list[Tensor]:
        return [tokens_to_map(tokens, hw) for tokens, hw in self._stage_tokens(x, last)]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.features is not None:
            return self.feature_outputs(x)
        x, _ = self._stage_tokens(x, len(self.blocks) - 1)[-1]
        return self.head(self.norm(x).mean(dim=1))


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated normal Linear, fan-out normal conv."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# Grouped self-attention: 7- and 14-pixel windows alternate (the official `ws` lists).
_WINDOWS_6 = [[7], [7, 14], [7, 14] * 3, [7, 7]]
_WINDOWS_14 = [[7], [7, 14], [7, 14] * 7, [7, 7]]
CONFIGS: dict[str, dict] = {
    "lite": dict(
        embed_dims=[32, 64, 128, 256],
        num_heads=[1, 2, 4, 8],
        depths=[1, 2, 6, 2],
        windows=_WINDOWS_6,
    ),
    "tiny": dict(
        embed_dims=[96, 192, 384, 768],
        num_heads=[3, 6, 12, 24],
        depths=[1, 2, 6, 2],
        windows=_WINDOWS_6,
    ),
    "small": dict(
        embed_dims=[96, 192, 384, 768],
        num_heads=[3, 6, 12, 24],
        depths=[1, 2, 14, 2],
        windows=_WINDOWS_14,
    ),
    "base": dict(
        embed_dims=[128, 256, 512, 1024],
        num_heads=[4, 8, 16, 32],
        depths=[1, 2, 14, 2],
        windows=_WINDOWS_14,
    ),
}


def build_sepvit(variant: str, num_classes: int = 1000) -> SepViT:
    return SepViT(**CONFIGS[variant], num_classes=num_classes)


for _variant in CONFIGS:
    register(
        ModelSpec(
            name=f"sepvit_{_variant}",
            family="sepvit",
            builder=partial(build_sepvit, _variant),
            input_size=DESIGN_SIZE,
            preprocessing=Preprocessing(crop_pct=0.875, interpolation="bicubic"),
            size_multiple=SIZE_MULTIPLE,
            head_key="head.weight",
            description=(
                f"SepViT-{_variant.capitalize()} (Li et al., 2022), ImageNet-1k; the authors "
                "published no weights: random init or your own (--weights)"
            ),
        )
    )
