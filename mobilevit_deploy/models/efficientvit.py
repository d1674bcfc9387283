"""EfficientViT (MIT Han Lab; Cai et al., ICCV 2023) classifiers, B0-B3 and L1-L3, in
their train-time form.

Facts come from mit-han-lab/efficientvit: `models/efficientvit/backbone.py` and
`cls.py` (configs), `models/nn/ops.py` (ConvLayer, DSConv, MBConv, FusedMBConv,
ResBlock, LiteMLA, EfficientViTBlock, ResidualBlock, OpSequential) and
`cls_model_zoo.py` (the L models' norms use eps 1e-7). Module names are the official
ones, so an official checkpoint (`{"state_dict": ...}`) loads as it is; timm's
`efficientvit_*` state dicts load through `remap_timm`.

Deploy form. EfficientViT ships no reparameterization; `fold_affine` folds every
ConvLayer's BatchNorm into its conv, each with its own eps (1e-5 for B, 1e-7 for L).
The head's LayerNorm follows a pooled Linear and stays.

Linear attention in fp16. The official LiteMLA divides by (k-sum . q + 1e-15): in fp16
1e-15 is zero (0/0 where ReLU zeroes a column), and v @ k^T @ q multiplies three
activations summed over every token, which passes 65504 at segmentation resolutions
or with activations of a few hundred, so the official code upcasts to fp32. Here the
ratio's invariances keep every product small: q is divided by its own sum per token
and k by its maximum per head, then by sqrt(n) (scales that cancel between numerator
and denominator), so every k term stays a normal fp16 number and |v k^T q| <=
sqrt(n) * max|v|; eps becomes 1e-15 / n, raised to the dtype's smallest normal. In
fp32 that is the official function to rounding; in fp16 it stays finite without
upcasting.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from torch import Tensor, nn

from ..registry import ModelSpec, Preprocessing, register
from ..reparam import fuse
from .layers import FeatureStages


class TanhGELU(nn.GELU):
    """GELU with the tanh approximation, as the official L series uses it.

    `int8_keeps_float`: ONNX at opset 17 has no Gelu op, so it exports as seven
    elementwise ops, and quantizing each one's output (x^3 above all) loses most of the
    signal: stressed EfficientViT-L1 at 224, 13.1 dB with it quantized, 29.4 dB float.
    """

    int8_keeps_float = True

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


_ACTS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hswish": nn.Hardswish,
    "gelu": TanhGELU,
}


def _act(name: str | None) -> nn.Module | None:
    return _ACTS[name]() if name else None


class ConvLayer(nn.Module):
    """conv -> BatchNorm (optional) -> activation (optional); `fold_affine` folds the BN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool = False,
        norm: bool = True,
        act: str | None = "relu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            kernel_size // 2,
            groups=groups,
            bias=use_bias,
        )
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x

    def fold_affine(self) -> None:
        if self.norm is None:
            return
        weight, bias = fuse.fold_bn_after(self.conv.weight, self.conv.bias, self.norm)
        self.conv = fuse.conv_like(self.conv, weight, bias)
        self.norm = None


class LinearLayer(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        layer_norm: bool = False,
        act: str | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, use_bias)
        self.norm = nn.LayerNorm(out_features) if layer_norm else None
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(torch.flatten(x, 1))
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x


class IdentityLayer(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class OpSequential(nn.Module):
    """The official container (its parameters live under `op_list.N`)."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: Tensor) -> Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, main: nn.Module, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.main(x)
        return out + self.shortcut(x) if self.shortcut is not None else out


class DSConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str, fewer_norm: bool) -> None:
        super().__init__()
        self.depth_conv = ConvLayer(
            cin, cin, 3, stride, cin, use_bias=fewer_norm, norm=not fewer_norm, act=act
        )
        self.point_conv = ConvLayer(cin, cout, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, expand: float, act: str, fewer_norm: bool
    ) -> None:
        super().__init__()
        mid = round(cin * expand)
        first = {"use_bias": fewer_norm, "norm": not fewer_norm, "act": act}
        self.inverted_conv = ConvLayer(cin, mid, 1, **first)
        self.depth_conv = ConvLayer(mid, mid, 3, stride, mid, **first)
        self.point_conv = ConvLayer(mid, cout, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class FusedMBConv(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, expand: float, act: str, fewer_norm: bool
    ) -> None:
        super().__init__()
        mid = round(cin * expand)
        self.spatial_conv = ConvLayer(
            cin, mid, 3, stride, use_bias=fewer_norm, norm=not fewer_norm, act=act
        )
        self.point_conv = ConvLayer(mid, cout, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.spatial_conv(x))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str, fewer_norm: bool) -> None:
        super().__init__()
        self.conv1 = ConvLayer(
            cin, cin, 3, stride, use_bias=fewer_norm, norm=not fewer_norm, act=act
        )
        self.conv2 = ConvLayer(cin, cout, 3, act=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


def _scaled_relu_qk(q: Tensor, k: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """ReLU'd q and k over (B, heads, dim, n), q scaled per token to sum 1 and k per head
    to max 1/sqrt(n): scales that cancel in the attention ratio (module docstring).
    Two divisions, never amax * sqrt(n), which itself can pass 65504."""
    tiny = torch.finfo(q.dtype).tiny
    q = torch.relu(q)
    k = torch.relu(k)
    q = q / (q.sum(dim=2, keepdim=True) + tiny)
    k = k / (k.amax(dim=(2, 3), keepdim=True) + tiny) * (1.0 / math.sqrt(n))
    return q, k


def relu_linear_attention(qkv: Tensor, dim: int, eps: float = 1e-15) -> Tensor:
    """ReLU linear attention over (B, heads*3*dim, H, W), as LiteMLA computes it, with
    the scaling and dtype-aware eps of the module docstring."""
    b, _, h, w = qkv.shape
    n = int(h) * int(w)
    qkv = qkv.reshape(b, -1, 3 * dim, n)
    q, k = _scaled_relu_qk(qkv[:, :, :dim], qkv[:, :, dim : 2 * dim], n)
    v = nn.functional.pad(qkv[:, :, 2 * dim :], (0, 0, 0, 1), value=1.0)
    out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
    floor = max(eps / n, torch.finfo(out.dtype).tiny)
    out = out[:, :, :-1] / (out[:, :, -1:] + floor)
    return out.reshape(b, -1, h, w)


def relu_quadratic_attention(qkv: Tensor, dim: int, eps: float = 1e-15) -> Tensor:
    """What LiteMLA uses when a map has no more tokens than `dim` (small inputs): the
    (n x n) attention map, normalised per query. The choice follows the static input
    size, so a traced graph holds one branch and no data-dependent control flow."""
    b, _, h, w = qkv.shape
    n = int(h) * int(w)
    qkv = qkv.reshape(b, -1, 3 * dim, n)
    q, k = _scaled_relu_qk(qkv[:, :, :dim], qkv[:, :, dim : 2 * dim], n)
    att = torch.matmul(k.transpose(-1, -2), q)
    floor = max(eps / n, torch.finfo(att.dtype).tiny)
    att = att / (att.sum(dim=2, keepdim=True) + floor)
    return torch.matmul(qkv[:, :, 2 * dim :], att).reshape(b, -1, h, w)


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention (official names and layout).

    `int8_keeps_float`: int8 exports leave this module in float. Its ReLU-kernel
    products and their normaliser need more range than uint8 holds, and quantizing any
    part of it costs as much as all of it (stressed B1: 13.9 dB all-int8, 19.5 dB with
    this module float; no single op type's exclusion helps).
    """

    int8_keeps_float = True

    def __init__(self, channels: int, dim: int, scales: tuple[int, ...] = (5,)) -> None:
        super().__init__()
        heads = channels // dim
        total = heads * dim
        self.dim = dim
        self.qkv = ConvLayer(channels, 3 * total, 1, norm=False, act=None)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        )
        self.proj = ConvLayer(total * (1 + len(scales)), channels, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        h, w = qkv.shape[-2:]
        attend = relu_linear_attention if h * w > self.dim else relu_quadratic_attention
        return self.proj(attend(qkv, self.dim))


class EfficientViTBlock(nn.Module):
    def __init__(
        self, channels: int, dim: int, expand: float, act: str, scales: tuple[int, ...] = (5,)
    ) -> None:
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, dim, scales), IdentityLayer())
        self.local_module = ResidualBlock(
            MBConv(channels, channels, 1, expand, act, fewer_norm=True), IdentityLayer()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.local_module(self.context_module(x))


def _local_block(
    kind: str, cin: int, cout: int, stride: int, expand: float, act: str, fewer_norm: bool = False
) -> nn.Module:
    if kind == "ds":
        return DSConv(cin, cout, stride, act, fewer_norm)
    blocks = {"mb": MBConv, "fmb": FusedMBConv}
    if kind == "res":
        return ResBlock(cin, cout, stride, act, fewer_norm)
    return blocks[kind](cin, cout, stride, expand, act, fewer_norm)


class EfficientViTBackbone(nn.Module):
    """The B series: stem (conv + DSConv residuals), two MBConv stages, two attention stages."""

    def __init__(
        self, widths: list[int], depths: list[int], dim: int, expand: float = 4, act: str = "hswish"
    ) -> None:
        super().__init__()
        stem: list[nn.Module] = [ConvLayer(3, widths[0], 3, 2, act=act)]
        stem += [
            ResidualBlock(_local_block("ds", widths[0], widths[0], 1, 1, act), IdentityLayer())
            for _ in range(depths[0])
        ]
        self.input_stem = OpSequential(stem)
        cin, stages = widths[0], []
        for w, d in zip(widths[1:3], depths[1:3], strict=True):
            ops = []
            for i in range(d):
                block = _local_block("mb", cin, w, 2 if i == 0 else 1, expand, act)
                ops.append(ResidualBlock(block, None if i == 0 else IdentityLayer()))
                cin = w
            stages.append(OpSequential(ops))
        for w, d in zip(widths[3:], depths[3:], strict=True):
            ops = [ResidualBlock(_local_block("mb", cin, w, 2, expand, act, True), None)]
            cin = w
            ops += [EfficientViTBlock(w, dim, expand, act) for _ in range(d)]
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Every stage's output, stage 0 (the stem) first: the segmentation head's inputs."""
        outs = [self.input_stem(x)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[-1]


class EfficientViTLargeBackbone(nn.Module):
    """The L series: ResBlock, FusedMBConv, MBConv stages, then attention stages (GELU)."""

    def __init__(
        self, widths: list[int], depths: list[int], dim: int = 32, act: str = "gelu"
    ) -> None:
        super().__init__()
        kinds, expands = ["res", "fmb", "fmb", "mb", "att"], [1, 4, 4, 4, 6]
        fewer = [False, False, False, True, True]
        stage0: list[nn.Module] = [ConvLayer(3, widths[0], 3, 2, act=act)]
        stage0 += [
            ResidualBlock(_local_block("res", widths[0], widths[0], 1, 1, act), IdentityLayer())
            for _ in range(depths[0])
        ]
        stages, cin = [OpSequential(stage0)], widths[0]
        for s in range(1, len(widths)):
            w, kind = widths[s], kinds[s]
            down = "mb" if kind == "att" else kind
            ops: list[nn.Module] = [
                ResidualBlock(_local_block(down, cin, w, 2, expands[s] * 4, act, fewer[s]), None)
            ]
            cin = w
            for _ in range(depths[s]):
                if kind == "att":
                    ops.append(EfficientViTBlock(w, dim, expands[s], act))
                else:
                    block = _local_block(kind, w, w, 1, expands[s], act, fewer[s])
                    ops.append(ResidualBlock(block, IdentityLayer()))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[-1]


class ClsHead(OpSequential):
    """With no classes (timm's num_classes=0) only the last Linear goes, as in timm:
    the pooled, normalised `head_widths[1]` features come out."""

    def __init__(self, cin: int, widths: tuple[int, int], act: str, n_classes: int) -> None:
        ops = [
            ConvLayer(cin, widths[0], 1, act=act),
            nn.AdaptiveAvgPool2d(1),
            LinearLayer(widths[0], widths[1], False, layer_norm=True, act=act),
        ]
        super().__init__(ops + ([LinearLayer(widths[1], n_classes, True)] if n_classes else []))


class EfficientViTCls(FeatureStages, nn.Module):
    def __init__(self, backbone: nn.Module, head: ClsHead, widths: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.widths = tuple(widths)

    def stage_info(self) -> list[tuple[int, int]]:
        """timm's feature_info: stages 1-4 at strides 4, 8, 16, 32 (the stem is not one)."""
        return [(2 ** (i + 2), w) for i, w in enumerate(self.widths[1:])]

    def forward_stages(self, x: Tensor, last: int) -> list[Tensor]:
        return self.backbone.forward_stages(x)[1 : last + 2]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.features is not None:
            return self.feature_outputs(x)
        return self.head(self.backbone(x))


# variant: (series, widths, depths, attention dim, head in, head widths)
CONFIGS = {
    "b0": ("b", [8, 16, 32, 64, 128], [1, 2, 2, 2, 2], 16, (1024, 1280)),
    "b1": ("b", [16, 32, 64, 128, 256], [1, 2, 3, 3, 4], 16, (1536, 1600)),
    "b2": ("b", [24, 48, 96, 192, 384], [1, 3, 4, 4, 6], 32, (2304, 2560)),
    "b3": ("b", [32, 64, 128, 256, 512], [1, 4, 6, 6, 9], 32, (2304, 2560)),
    "l1": ("l", [32, 64, 128, 256, 512], [1, 1, 1, 6, 6], 32, (3072, 3200)),
    "l2": ("l", [32, 64, 128, 256, 512], [1, 2, 2, 8, 8], 32, (3072, 3200)),
    "l3": ("l", [64, 128, 256, 512, 1024], [1, 2, 2, 8, 8], 32, (6144, 6400)),
}
L_SERIES_EPS = 1e-7


def set_norm_eps(model: nn.Module, eps: float) -> None:
    """What the official model zoo does to the L models (BatchNorm and LayerNorm)."""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            m.eps = eps


def build_efficientvit(variant: str, num_classes: int = 1000) -> EfficientViTCls:
    series, widths, depths, dim, head = CONFIGS[variant]
    if series == "b":
        backbone: nn.Module = EfficientViTBackbone(widths, depths, dim)
        model = EfficientViTCls(backbone, ClsHead(widths[-1], head, "hswish", num_classes), widths)
    else:
        backbone = EfficientViTLargeBackbone(widths, depths, dim)
        model = EfficientViTCls(backbone, ClsHead(widths[-1], head, "gelu", num_classes), widths)
        set_norm_eps(model, L_SERIES_EPS)
    return model


_RESOLUTIONS = {
    "b0": "224",
    "b1": "224/256/288",
    "b2": "224/256/288",
    "b3": "224/256/288",
    "l1": "224",
    "l2": "224-384",
    "l3": "224-384",
}

# timm's ClassifierHead: in_conv, pool, classifier = Sequential(Linear, LayerNorm, act,
# Dropout, Linear); ours is op_list = [ConvLayer, pool, LinearLayer(+norm), LinearLayer].
_TIMM_HEAD = {
    "head.in_conv.": "head.op_list.0.",
    "head.classifier.0.": "head.op_list.2.linear.",
    "head.classifier.1.": "head.op_list.2.norm.",
    "head.classifier.4.": "head.op_list.3.linear.",
}


def is_timm_layout(state_dict: dict) -> bool:
    keys = list(state_dict)
    return not any(k.startswith("backbone.") for k in keys) and any(
        k.startswith(("stem.", "stages.")) for k in keys
    )


def remap_timm(state_dict: dict) -> dict:
    """timm's `efficientvit_b*`/`efficientvit_l*` names -> the official ones used here.

    timm (timm/models/efficientvit_mit.py) builds the same modules with the same shapes
    and the same names inside every block (`main`, `qkv`, `aggreg`, `proj`, ...), but
    different containers, which is all this renames:
      stem.in_conv, stem.res{i}      -> input_stem.op_list.0, .{i+1}  (B series)
                                     -> stages.0.op_list.0, .{i+1}    (L series: the stem
                                        is the official backbone's stage 0)
      stages.{s}.blocks.{j}          -> stages.{s}.op_list.{j} (B), stages.{s+1}... (L);
                                        blocks.0 is the downsampling block in both
      head.in_conv, head.classifier.{0,1,4} -> head.op_list.0, .2.linear, .2.norm, .3.linear
    The L series is told apart by its ResBlocks and FusedMBConvs (`main.conv1`,
    `main.spatial_conv`), which B never has.
    A dict already in the official layout is returned unchanged; keys matching nothing
    keep their names, so the strict load reports them as unexpected.
    """
    if not is_timm_layout(state_dict):
        return state_dict
    large = any(re.search(r"\.main\.(conv1|spatial_conv)\.", k) for k in state_dict)
    stem = "backbone.stages.0.op_list" if large else "backbone.input_stem.op_list"
    shift = 1 if large else 0
    out = {}
    for key, value in state_dict.items():
        new = None
        if m := re.fullmatch(r"stem\.in_conv\.(.+)", key):
            new = f"{stem}.0.{m[1]}"
        elif m := re.fullmatch(r"stem\.res(\d+)\.(.+)", key):
            new = f"{stem}.{int(m[1]) + 1}.{m[2]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            new = f"backbone.stages.{int(m[1]) + shift}.op_list.{m[2]}.{m[3]}"
        else:
            for old, ours in _TIMM_HEAD.items():
                if key.startswith(old):
                    new = ours + key[len(old) :]
        out[new if new is not None else key] = value
    return out


for _variant in CONFIGS:
    register(
        ModelSpec(
            name=f"efficientvit_{_variant}",
            family="efficientvit",
            builder=partial(build_efficientvit, _variant),
            input_size=224,
            preprocessing=Preprocessing(crop_pct=1.0, interpolation="bicubic"),  # timm cfg
            remap_state_dict=remap_timm,
            head_key="head.op_list.3.linear.weight",
            description=(
                f"EfficientViT-{_variant.upper()} (MIT Han Lab, ICCV 2023), ImageNet-1k; "
                f"official checkpoints (mit-han-lab README; load with --weights) at "
                f"{_RESOLUTIONS[_variant]} px (--image-size)"
            ),
        )
    )
