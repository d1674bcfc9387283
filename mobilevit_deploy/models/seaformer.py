"""SeaFormer (Wan et al., ICLR 2023, "Squeeze-enhanced Axial Transformer") in its
train-time form: ImageNet classifiers and the ADE20K segmenters, Tiny to Large.

Facts come from fudan-zvg/SeaFormer: `seaformer-cls/seaformer.py` (trained with a timm
trainer, so checkpoints hold `state_dict_ema`/`state_dict`) and `seaformer-seg/`, an
mmsegmentation project (backbone `SeaFormer`, head `LightHead`, configs under
`local_configs/seaformer/`). Module names are the official ones, so an official
classification checkpoint loads as it is; the segmenter is built as mmseg's
EncoderDecoder is, with `backbone` and `decode_head` children, so an mmseg checkpoint
loads after `remap_official` drops the mmseg-only `auxiliary_head.*` entries. SyncBN
keys are BatchNorm keys (weight, bias, running stats, num_batches_tracked): they load
into the plain BatchNorm2d used here.

Deploy forms (reparam/engine.py protocol). SeaFormer has no official reparameterization,
so `reparameterize(model, fold_affine=False)` is the train-time form. `fold_affine` goes
further, all exact in eval mode:
  * every Conv->BN (the official `Conv2d_BN`, here `Conv2dBN`, and mmcv's `ConvModule`
    are Sequentials, so the engine's generic pass folds them: stem, MobileNetV2 blocks,
    projections, the detail-enhancement depthwise kernel, MLP, head);
  * `to_q`, `to_k`, `to_v` (three 1x1 conv-BNs reading the same input) become one 1x1
    conv `to_qkv`; the official forward concatenates q, k and v for the detail branch
    anyway, so a concat disappears too;
  * the squeeze-axial positional embeddings, which the official code resamples from 16
    to the squeezed length with a 1-D linear interpolation on every call, are resampled
    once (float64) into constant buffers.

Export resolution. The last fold ties the fused model to one input size. Each model
records an export size (`set_export_resolution(h, w)`; the builders set the spec's input
size) and every attention learns its feature-map size from it, by walking the strided
convs in front of it. A fused model run at another size raises BadInput instead of
broadcasting silently (a length-1 table would). The train-time form takes any size.

The official configs and the zoo entries of the classifiers are in
models/seaformer_zoo.py; the segmenters (backbone + LightHead) in models/seaformer_seg.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import BadInput
from ..reparam import fuse
from .layers import FeatureStages


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Channels rounded to a multiple of `divisor`, never more than 10% below `v`."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class DropPath(nn.Module):
    """Stochastic depth per sample (training only; the identity in eval)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class HSigmoid(nn.Module):
    """The official `h_sigmoid`: relu6(x + 3) / 6."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + 3) / 6


class Conv2dBN(nn.Sequential):
    """The official `Conv2d_BN`: conv (no bias) `c` then BatchNorm `bn`.

    A Sequential, so the engine's generic pass folds it; `bn_weight_init=0` starts the
    attention's residual projections at zero, as the official code does.
    """

    def __init__(
        self,
        a: int,
        b: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


def _conv_bn_weights(seq: Conv2dBN) -> tuple[Tensor, Tensor]:
    """The float64 kernel and bias of a Conv2dBN, whether or not its BN is folded yet."""
    if isinstance(seq.bn, nn.BatchNorm2d):
        return fuse.fold_bn_after(seq.c.weight, seq.c.bias, seq.bn)
    return fuse.scale_output(seq.c.weight, seq.c.bias, torch.ones(seq.c.out_channels))


class Mlp(nn.Module):
    """1x1 conv-BN, 3x3 depthwise conv (with bias), activation, 1x1 conv-BN."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        self.fc1 = Conv2dBN(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = act_layer()
        self.fc2 = Conv2dBN(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x))))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand-BN-ReLU] kxk depthwise-BN-ReLU 1x1 project-BN."""

    def __init__(
        self, inp: int, oup: int, ks: int, stride: int, expand_ratio: float, act: type[nn.Module]
    ) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [Conv2dBN(inp, hidden), act()]
        layers += [
            Conv2dBN(hidden, hidden, ks, stride, ks // 2, groups=hidden),
            act(),
            Conv2dBN(hidden, oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _conv_out(n: int, conv: nn.Conv2d, axis: int) -> int:
    k, s, p, d = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis], conv.dilation[axis]
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class StackedMV2Block(nn.Module):
    """A stage of MobileNetV2 blocks `layer1..layerN`, the first stage with `stem_block`."""

    def __init__(
        self,
        cfgs: list[list[int]],
        stem: bool,
        inp_channel: int,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.stem = stem
        if stem:
            self.stem_block = nn.Sequential(Conv2dBN(3, inp_channel, 3, 2, 1), activation())
        self.layer_names = []
        for i, (k, t, c, s) in enumerate(cfgs):
            out = _make_divisible(c, 8)
            name = f"layer{i + 1}"
            self.add_module(name, InvertedResidual(inp_channel, out, k, s, t, activation))
            self.layer_names.append(name)
            inp_channel = out

    def forward(self, x: Tensor) -> Tensor:
        if self.stem:
            x = self.stem_block(x)
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return x

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The feature-map size this stage makes of an h x w input (convs in call order)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                h, w = _conv_out(h, m, 0), _conv_out(w, m, 1)
        return h, w


class SqueezeAxialPositionalEmbedding(nn.Module):
    """x (B, C, N) + the (1, C, 16) table linearly resampled to N.

    `fold_affine` replaces the table by `pos_embed_fixed`, resampled once to `length`
    (set by the attention from the export resolution): no interpolation of a parameter
    is left in the deployed graph.
    """

    def __init__(self, dim: int, shape: int) -> None:
        super().__init__()
        self.pos_embed: nn.Parameter | None = nn.Parameter(torch.randn(1, dim, shape))
        self.register_buffer("pos_embed_fixed", None)
        self.length: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[-1]
        if self.pos_embed_fixed is not None:
            fixed = self.pos_embed_fixed.shape[-1]
            if n != fixed:
                raise BadInput(
                    f"this fused SeaFormer was made for a squeezed length of {fixed}, not {n}; "
                    "reparameterize the train-time model after set_export_resolution(h, w) "
                    "with the size you will run"
                )
            return x + self.pos_embed_fixed
        return x + F.interpolate(self.pos_embed, size=n, mode="linear", align_corners=False)

    def set_length(self, length: int) -> None:
        if self.pos_embed_fixed is not None and self.pos_embed_fixed.shape[-1] != length:
            raise BadInput(
                f"positional embedding already fixed for length {self.pos_embed_fixed.shape[-1]}"
                f", cannot change it to {length}; start from the train-time model"
            )
        self.length = length

    def fold_affine(self) -> None:
        if self.pos_embed is None or self.length is None:
            return
        table = fuse.resample_linear_1d(self.pos_embed, self.length)
        dtype = self.pos_embed.dtype
        self.pos_embed = None
        self.pos_embed_fixed = table.to(dtype)


class SeaAttention(nn.Module):
    """The official `Sea_Attention`: squeeze-axial attention plus detail enhancement.

    Rows: q, k, v averaged over the width, attention over the H positions; columns
    likewise over W; both broadcast back, added to v, projected, and used as an
    h-sigmoid gate on the detail branch (depthwise 3x3 + 1x1 over concat(q, k, v)).
    The official segmentation copy sizes the depthwise conv as 2*dh, the classification
    copy as dh + 2*nh_kd: equal for attn_ratio 2, the only value any config uses.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float = 2,
        activation: type[nn.Module] = nn.ReLU6,
    ) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim**-0.5
        self.nh_kd = nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = dh = self.d * num_heads
        self.to_q: Conv2dBN | None = Conv2dBN(dim, nh_kd)
        self.to_k: Conv2dBN | None = Conv2dBN(dim, nh_kd)
        self.to_v: Conv2dBN | None = Conv2dBN(dim, dh)
        self.to_qkv: nn.Conv2d | None = None
        self.proj = nn.Sequential(activation(), Conv2dBN(dh, dim, bn_weight_init=0))
        self.proj_encode_row = nn.Sequential(activation(), Conv2dBN(dh, dh, bn_weight_init=0))
        self.pos_emb_rowq = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.pos_emb_rowk = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.proj_encode_column = nn.Sequential(activation(), Conv2dBN(dh, dh, bn_weight_init=0))
        self.pos_emb_columnq = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.pos_emb_columnk = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        total = 2 * nh_kd + dh
        self.dwconv = Conv2dBN(total, total, 3, 1, 1, groups=total)
        self.act = activation()
        self.pwconv = Conv2dBN(total, dim)
        self.sigmoid = HSigmoid()

    def set_resolution(self, h: int, w: int) -> None:
        """The feature-map size at export: the row tables get H, the column tables W."""
        for pos, n in (
            (self.pos_emb_rowq, h),
            (self.pos_emb_rowk, h),
            (self.pos_emb_columnq, w),
            (self.pos_emb_columnk, w),
        ):
            pos.set_length(n)

    def _axial(self, q: Tensor, k: Tensor, v: Tensor, pos_q: nn.Module, pos_k: nn.Module) -> Tensor:
        """Attention over one squeezed axis: q, k, v are (B, C, N); returns (B, dh, N)."""
        b, _, n = q.shape
        q = pos_q(q).reshape(b, self.num_heads, -1, n).permute(0, 1, 3, 2)
        k = pos_k(k).reshape(b, self.num_heads, -1, n)
        v = v.reshape(b, self.num_heads, -1, n).permute(0, 1, 3, 2)
        attn = (torch.matmul(q, k) * self.scale).softmax(dim=-1)
        return torch.matmul(attn, v).permute(0, 1, 3, 2).reshape(b, self.dh, n)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if self.to_qkv is not None:
            qkv = self.to_qkv(x)
            q, k, v = qkv.split([self.nh_kd, self.nh_kd, self.dh], dim=1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
            qkv = torch.cat([q, k, v], dim=1)
        detail = self.pwconv(self.act(self.dwconv(qkv)))
        row = self._axial(q.mean(-1), k.mean(-1), v.mean(-1), self.pos_emb_rowq, self.pos_emb_rowk)
        row = self.proj_encode_row(row.reshape(b, self.dh, h, 1))
        col = self._axial(
            q.mean(-2), k.mean(-2), v.mean(-2), self.pos_emb_columnq, self.pos_emb_columnk
        )
        col = self.proj_encode_column(col.reshape(b, self.dh, 1, w))
        xx = self.proj(v + (row + col))
        return self.sigmoid(xx) * detail

    def fold_affine(self) -> None:
        """to_q, to_k, to_v -> one 1x1 conv with bias, output channels [q | k | v]."""
        if self.to_qkv is not None:
            return
        template = self.to_q.c
        parts = [_conv_bn_weights(s) for s in (self.to_q, self.to_k, self.to_v)]
        weight, bias = fuse.concat_output_channels(parts)
        conv = nn.Conv2d(
            template.in_channels,
            weight.shape[0],
            1,
            device=template.weight.device,
            dtype=template.weight.dtype,
        )
        self.to_qkv = fuse.assign(conv, weight, bias)
        self.to_q = self.to_k = self.to_v = None


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        mlp_ratio: float,
        attn_ratio: float,
        drop_path: float,
        act_layer: type[nn.Module],
    ) -> None:
        super().__init__()
        self.attn = SeaAttention(dim, key_dim, num_heads, attn_ratio, act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    def __init__(
        self,
        depth: int,
        dim: int,
        key_dim: int,
        num_heads: int,
        mlp_ratio: float,
        attn_ratio: float,
        drop_path: list[float],
        act_layer: type[nn.Module],
    ) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            Block(dim, key_dim, num_heads, mlp_ratio, attn_ratio, drop_path[i], act_layer)
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.transformer_blocks:
            x = block(x)
        return x

    def set_resolution(self, h: int, w: int) -> None:
        for block in self.transformer_blocks:
            block.attn.set_resolution(h, w)


class SeaFormer(FeatureStages, nn.Module):
    """The official `SeaFormer`: MobileNetV2 stages `smb1..smb5`, the last ones each
    followed by a transformer stage `trans1..`; a classifier (`avgpool`, `linear`) unless
    `num_classes` is None, which gives the segmentation backbone. With 0 classes
    (a headless backbone) the pooled features come out.
    """

    def __init__(
        self,
        cfgs: list[list[list[int]]],
        channels: list[int],
        emb_dims: list[int],
        key_dims: list[int],
        depths: list[int],
        num_heads: int,
        attn_ratios: float = 2,
        mlp_ratios: tuple[float, ...] = (2, 4),
        drop_path_rate: float = 0.0,
        num_classes: int | None = 1000,
        export_size: tuple[int, int] = (224, 224),
        act_layer: type[nn.Module] = nn.ReLU6,
    ) -> None:
        super().__init__()
        self.num_smb, self.num_trans = len(cfgs), len(depths)
        for i, cfg in enumerate(cfgs):
            setattr(self, f"smb{i + 1}", StackedMV2Block(cfg, i == 0, channels[i]))
        for i, depth in enumerate(depths):
            dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
            layer = BasicLayer(
                depth,
                emb_dims[i],
                key_dims[i],
                num_heads,
                mlp_ratios[i],
                attn_ratios,
                dpr,
                act_layer,
            )
            setattr(self, f"trans{i + 1}", layer)
        self.num_classes = num_classes
        if num_classes is not None:
            self.linear = nn.Linear(channels[-1], num_classes) if num_classes else nn.Identity()
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        strides, stride = [], 1
        for i, cfg in enumerate(cfgs):
            stride *= (2 if i == 0 else 1) * math.prod(c[3] for c in cfg)
            strides.append(stride)
        self.stages = list(zip(strides, channels[1:], strict=True))
        self.set_export_resolution(*export_size)

    def stage_info(self) -> list[tuple[int, int]]:
        """Each MobileNetV2 stage with the transformer stage that follows it, if any
        (strides 4 to 64; SeaFormer is not in timm, so this is the natural split)."""
        return self.stages

    def forward_stages(self, x: Tensor, last: int) -> list[Tensor]:
        outs = []
        for i in range(last + 1):
            x = getattr(self, f"smb{i + 1}")(x)
            trans = self._trans_after(i)
            outs.append(x if trans is None else trans(x))
            x = outs[-1]
        return outs

    def _trans_after(self, i: int) -> BasicLayer | None:
        """The transformer stage that follows MobileNetV2 stage i (0-based), if any."""
        j = i + self.num_trans - self.num_smb
        return getattr(self, f"trans{j + 1}") if j >= 0 else None

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The official segmentation outputs: the 1/8 map after smb2, then each
        transformer stage's output (the last one is what the classifier pools)."""
        outputs = []
        for i in range(self.num_smb):
            x = getattr(self, f"smb{i + 1}")(x)
            if i == 1:
                outputs.append(x)
            trans = self._trans_after(i)
            if trans is not None:
                x = trans(x)
                outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> Tensor | list[Tensor] | tuple[Tensor, ...]:
        if self.features is not None:
            return self.feature_outputs(x)
        features = self.forward_features(x)
        if self.num_classes is None:
            return features
        return self.linear(self.avgpool(features[-1]).flatten(1))

    def set_export_resolution(self, height: int, width: int) -> None:
        """Tell every attention its feature-map size for an height x width input.

        Only the fused form uses it (its positional tables are resampled for it).
        """
        h, w = height, width
        for i in range(self.num_smb):
            h, w = getattr(self, f"smb{i + 1}").output_size(h, w)
            trans = self._trans_after(i)
            if trans is not None:
                trans.set_resolution(h, w)
        self.export_size = (height, width)
