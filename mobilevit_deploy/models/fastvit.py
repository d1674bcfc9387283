"""FastViT (Apple, ICCV 2023) in its train-time form, named like timm's `fastvit`.

Configs are the official ones (apple/ml-fastvit, models/fastvit.py). Beyond the
official reparameterization (MobileOne, large-kernel, RepMixer, RepCPE), the blocks
here also fold what Apple and timm leave at inference: the BatchNorm in front of
attention goes into qkv, layer scales go into the layer that feeds them. The BN
inside the ConvMlp is a Conv->BN Sequential that the engine's generic pass folds.
"""

from __future__ import annotations

import re
from functools import partial

from torch import Tensor, nn

from ..registry import ModelSpec, Preprocessing, WeightSource, register
from ..reparam import fuse
from .layers import (
    ClassifierHead,
    FeatureStages,
    LayerScale2d,
    MobileOneBlock,
    ReparamLargeKernelConv,
    RepConditionalPosEnc,
    conv_bn,
    deploy_conv,
)


class RepMixer(nn.Module):
    """x + layer_scale * (mixer(x) - norm(x)); deploy form: one depthwise conv."""

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.reparam_conv: nn.Conv2d | None = None
        self.norm = MobileOneBlock(
            dim,
            dim,
            kernel_size,
            groups=dim,
            use_act=False,
            use_scale_branch=False,
            num_conv_branches=0,
        )
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False)
        self.layer_scale = LayerScale2d(dim, layer_scale_init)

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w_mix, b_mix = self.mixer.fused_kernel_bias()
        w_norm, b_norm = self.norm.fused_kernel_bias()
        gamma = self.layer_scale.gamma.to(fuse.F64).reshape(-1)
        eye = fuse.identity_kernel(self.dim, self.dim, self.kernel_size)
        weight = eye + gamma.reshape(-1, 1, 1, 1) * (w_mix - w_norm)
        self.reparam_conv = deploy_conv(weight, gamma * (b_mix - b_norm), 1, self.dim, self)
        self.norm = self.mixer = self.layer_scale = None


class ConvMlp(nn.Module):
    """Depthwise 7x7 conv-BN, then a 1x1 expand / GELU / 1x1 project."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = conv_bn(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))

    def scale_output(self, layer_scale: LayerScale2d) -> None:
        """Fold a layer scale applied to this MLP's output into fc2 (exact)."""
        w, b = fuse.scale_output(self.fc2.weight, self.fc2.bias, layer_scale.gamma)
        fuse.assign(self.fc2, w, b)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens of a NCHW map (head_dim 32)."""

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        # (b, 3*heads, n, head_dim): rank 4, the most mobile delegates take (timm: rank 5).
        qkv = self.qkv(tokens).reshape(b, h * w, 3 * self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=1)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = 3) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))

    def fold_affine(self) -> None:
        if isinstance(self.layer_scale, LayerScale2d):
            self.mlp.scale_output(self.layer_scale)
            self.layer_scale = nn.Identity()


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim)
        self.layer_scale_1 = LayerScale2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = LayerScale2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))

    def fold_affine(self) -> None:
        """BN -> qkv (a Linear over channels: exact), layer scales -> proj and fc2."""
        if isinstance(self.norm, nn.BatchNorm2d):
            qkv = self.token_mixer.qkv
            w, b = fuse.fold_affine_before(qkv.weight, qkv.bias, *fuse.bn_affine(self.norm))
            self.token_mixer.qkv = fuse.linear_like(qkv, w, b)
            self.norm = nn.Identity()
        if isinstance(self.layer_scale_1, LayerScale2d):
            proj = self.token_mixer.proj
            w, b = fuse.scale_output(proj.weight, proj.bias, self.layer_scale_1.gamma)
            fuse.assign(proj, w, b)
            self.layer_scale_1 = nn.Identity()
        if isinstance(self.layer_scale_2, LayerScale2d):
            self.mlp.scale_output(self.layer_scale_2)
            self.layer_scale_2 = nn.Identity()


class PatchEmbed(nn.Module):
    """Stride-2 large-kernel conv then a 1x1 MobileOne block (between stages)."""

    def __init__(self, in_chs: int, embed_dim: int, patch_size: int = 7, stride: int = 2) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_chs, embed_dim, patch_size, stride, groups=in_chs),
            MobileOneBlock(embed_dim, embed_dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class FastVitStage(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        depth: int,
        mixer: str,
        mlp_ratio: float,
        downsample: bool,
        pos_emb: bool,
    ) -> None:
        super().__init__()
        self.downsample = PatchEmbed(dim, dim_out) if downsample else nn.Identity()
        self.pos_emb = RepConditionalPosEnc(dim_out) if pos_emb else nn.Identity()
        block = RepMixerBlock if mixer == "repmixer" else AttentionBlock
        self.blocks = nn.Sequential(*(block(dim_out, mlp_ratio) for _ in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pos_emb(self.downsample(x)))


class FastVit(FeatureStages, nn.Module):
    def __init__(
        self,
        layers: tuple[int, ...],
        embed_dims: tuple[int, ...],
        mlp_ratios: tuple[float, ...],
        token_mixers: tuple[str, ...] = ("repmixer",) * 4,
        pos_embs: tuple[bool, ...] = (False,) * 4,
        num_classes: int = 1000,
        cls_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        d0 = embed_dims[0]
        self.stem = nn.Sequential(
            MobileOneBlock(3, d0, 3, stride=2),
            MobileOneBlock(d0, d0, 3, stride=2, groups=d0),
            MobileOneBlock(d0, d0, 1),
        )
        stages, prev = [], d0
        for i, dim in enumerate(embed_dims):
            stages.append(
                FastVitStage(
                    prev,
                    dim,
                    layers[i],
                    token_mixers[i],
                    mlp_ratios[i],
                    downsample=i > 0 or prev != dim,
                    pos_emb=pos_embs[i],
                )
            )
            prev = dim
        self.stages = nn.Sequential(*stages)
        final = int(embed_dims[-1] * cls_ratio)
        self.final_conv = MobileOneBlock(
            embed_dims[-1], final, 3, groups=embed_dims[-1], use_se=True
        )
        self.head = ClassifierHead(final, num_classes)
        self.embed_dims = tuple(embed_dims)

    def stage_info(self) -> list[tuple[int, int]]:
        """timm's feature_info: the four stages at strides 4, 8, 16, 32."""
        return [(4 * 2**i, dim) for i, dim in enumerate(self.embed_dims)]

    def forward_stages(self, x: Tensor, last: int) -> list[Tensor]:
        outs, x = [], self.stem(x)
        for stage in self.stages[: last + 1]:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.features is not None:
            return self.feature_outputs(x)
        return self.head(self.final_conv(self.stages(self.stem(x))))


_CONFIGS = {
    "t8": dict(layers=(2, 2, 4, 2), embed_dims=(48, 96, 192, 384), mlp_ratios=(3,) * 4),
    "t12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(3,) * 4),
    "s12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4),
    "sa12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4),
    "sa24": dict(layers=(4, 4, 12, 4), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4),
    "sa36": dict(layers=(6, 6, 18, 6), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4),
    "ma36": dict(layers=(6, 6, 18, 6), embed_dims=(76, 152, 304, 608), mlp_ratios=(4,) * 4),
}
_HYBRID = dict(token_mixers=("repmixer",) * 3 + ("attention",), pos_embs=(False,) * 3 + (True,))


def build_fastvit(variant: str, num_classes: int = 1000) -> FastVit:
    cfg = dict(_CONFIGS[variant])
    if variant.startswith(("sa", "ma")):
        cfg.update(_HYBRID)
    return FastVit(num_classes=num_classes, **cfg)


# --- Apple ml-fastvit checkpoint layout -> timm names -------------------------------
_APPLE_RENAMES = [
    (r"^patch_embed\.", "stem."),
    (r"\.rbr_conv\.", ".conv_kxk."),
    (r"\.rbr_scale\.", ".conv_scale."),
    (r"\.rbr_skip\.", ".identity."),
    (r"\.lkb_origin\.", ".large_conv."),
    (r"\.lkb_reparam\.", ".reparam_conv."),
    (r"^conv_exp\.", "final_conv."),
    (r"\.convffn\.", ".mlp."),
    (r"\.se\.reduce\.", ".se.fc1."),
    (r"\.se\.expand\.", ".se.fc2."),
    (r"(layer_scale(_[12])?)$", r"\1.gamma"),
    (r"^head\.", "head.fc."),
]


def is_apple_layout(state_dict: dict) -> bool:
    return any(k.startswith(("network.", "patch_embed.")) for k in state_dict)


def remap_apple(state_dict: dict) -> dict:
    """Apple's flat `network.N` list -> timm's `stages.S.{downsample,pos_emb,blocks}`.

    In Apple's list each stage's blocks are one entry, a PatchEmbed (`network.N.proj`)
    follows every stage but the last, and a RepCPE (`network.N.pe` or, fused,
    `network.N.reparam_conv`) precedes the stage it encodes. Names of unfused and
    `_reparam` checkpoints are handled alike.
    """
    if not is_apple_layout(state_dict):
        return state_dict
    stage_of: dict[int, int] = {}
    stage = 0
    indices = sorted(
        {int(m.group(1)) for k in state_dict if (m := re.match(r"network\.(\d+)\.", k))}
    )
    for n in indices:
        if any(k.startswith(f"network.{n}.proj.") for k in state_dict):
            stage += 1
        stage_of[n] = stage
    out = {}
    for key, value in state_dict.items():
        k = key
        for pattern, replacement in _APPLE_RENAMES:
            k = re.sub(pattern, replacement, k)
        m = re.match(r"network\.(\d+)\.(.*)", k)
        if m:
            s, rest = stage_of[int(m.group(1))], m.group(2)
            if rest.startswith("proj."):
                k = f"stages.{s}.downsample.{rest}"
            elif rest.startswith("pe."):
                k = f"stages.{s}.pos_emb.pos_enc.{rest[3:]}"
            elif rest.startswith("reparam_conv."):
                k = f"stages.{s}.pos_emb.{rest}"
            else:
                k = f"stages.{s}.blocks.{rest}"
        out[k] = value
    return out


_APPLE_URL = "https://docs-assets.developer.apple.com/ml-research/models/fastvit"


def _sources(variant: str) -> tuple[WeightSource, ...]:
    out = []
    for tag, folder in (
        ("in1k", "image_classification_models"),
        ("dist_in1k", "image_classification_distilled_models"),
    ):
        out.append(WeightSource(tag, f"{_APPLE_URL}/{folder}/fastvit_{variant}.pth.tar"))
        out.append(
            WeightSource(
                f"{tag}_reparam",
                f"{_APPLE_URL}/{folder}/fastvit_{variant}_reparam.pth.tar",
                fused=True,
            )
        )
    return tuple(out)


for _variant in _CONFIGS:
    register(
        ModelSpec(
            name=f"fastvit_{_variant}",
            family="fastvit",
            builder=partial(build_fastvit, _variant),
            input_size=256,
            preprocessing=Preprocessing(crop_pct=0.95 if _variant == "ma36" else 0.9),
            weight_sources=_sources(_variant),
            remap_state_dict=remap_apple,
            description=f"FastViT-{_variant.upper()} (Apple, ICCV 2023), ImageNet-1k",
            head_key="head.fc.weight",
        )
    )
