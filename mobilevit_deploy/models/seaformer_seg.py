"""SeaFormer segmenters (ADE20K): the official mmseg EncoderDecoder of the SeaFormer
backbone (models/seaformer.py) and the light segmentation head `LightHead`.

Facts from fudan-zvg/SeaFormer `seaformer-seg/`: `mmseg/models/decode_heads/light_head.py`
and `local_configs/seaformer/seaformer_<size>.py` (head widths, 150 classes, SyncBN,
ImageNet mean/std, 512x512 crops). The model has `backbone` and `decode_head` children
named as mmseg names them, so an mmseg checkpoint's keys are this model's keys.

Output: logits at the head's resolution, 1/8 of the input, which is what
`LightHead.forward` returns; mmseg's `EncoderDecoder.encode_decode` then upsamples them
bilinearly (align_corners=False) to the image size, and that step is left to the caller
(64x fewer output values; the argmax after upsampling needs the logits anyway).

Deploy form: the head's ConvModules are Conv->BN Sequentials the engine folds; the
backbone folds as described in models/seaformer.py. The only interpolation left in the
fused graph resizes the fusion gates, which are activations, not parameters.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import ModelSpec, Preprocessing, register
from .seaformer import HSigmoid, SeaFormer
from .seaformer_zoo import CONFIGS, NAMES, hw, remap_official

SEG_SIZE = 512


class ConvModule(nn.Sequential):
    """mmcv's ConvModule as configured by LightHead: 1x1 conv (no bias), `bn`, and an
    optional ReLU `activate`. A Sequential, so the generic pass folds conv and bn."""

    def __init__(self, inp: int, oup: int, groups: int = 1, act: bool = False) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(inp, oup, 1, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(oup))
        if act:
            self.add_module("activate", nn.ReLU())


class FusionBlock(nn.Module):
    """The official `Fusion_block`: 1x1-embedded detail features gated by upsampled,
    h-sigmoid-activated semantic features."""

    def __init__(self, inp: int, oup: int, embed_dim: int) -> None:
        super().__init__()
        self.local_embedding = ConvModule(inp, embed_dim)
        self.global_act = ConvModule(oup, embed_dim)
        self.act = HSigmoid()

    def forward(self, x_l: Tensor, x_g: Tensor) -> Tensor:
        gate = F.interpolate(
            self.act(self.global_act(x_g)),
            size=x_l.shape[2:],
            mode="bilinear",
            align_corners=False,
        )
        return self.local_embedding(x_l) * gate


class LightHead(nn.Module):
    """The official `LightHead` (an mmseg BaseDecodeHead): fusion blocks from the 1/8
    map through each deeper feature, a depthwise 1x1 ConvModule, dropout, `conv_seg`."""

    def __init__(
        self,
        in_channels: list[int],
        channels: int,
        embed_dims: list[int],
        num_classes: int = 150,
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.linear_fuse = ConvModule(channels, channels, groups=channels, act=True)
        self.num_fuse = len(embed_dims)
        for i, dim in enumerate(embed_dims):
            inp = in_channels[0] if i == 0 else embed_dims[i - 1]
            setattr(self, f"fuse{i + 1}", FusionBlock(inp, in_channels[i + 1], dim))

    def forward(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        for i in range(self.num_fuse):
            x = getattr(self, f"fuse{i + 1}")(x, inputs[i + 1])
        return self.conv_seg(self.dropout(self.linear_fuse(x)))


class SeaFormerSeg(nn.Module):
    """mmseg's EncoderDecoder for SeaFormer: logits at 1/8 of the input (see the module
    docstring for why the final upsampling is left out)."""

    def __init__(self, backbone: SeaFormer, decode_head: LightHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_head(self.backbone.forward_features(x))

    def set_export_resolution(self, height: int, width: int) -> None:
        self.backbone.set_export_resolution(height, width)

    @property
    def export_size(self) -> tuple[int, int]:
        return self.backbone.export_size


# LightHead of the ADE20K configs (local_configs/seaformer/seaformer_<size>.py).
_HEADS = {
    "tiny": dict(in_channels=[32, 128, 160], channels=96, embed_dims=[64, 96]),
    "small": dict(in_channels=[48, 160, 192], channels=128, embed_dims=[96, 128]),
    "base": dict(in_channels=[64, 192, 256], channels=160, embed_dims=[128, 160]),
    "large": dict(in_channels=[128, 192, 256, 320], channels=192, embed_dims=[128, 160, 192]),
}


def build_seaformer_seg(
    variant: str, num_classes: int = 150, image_size: int | tuple[int, int] = SEG_SIZE
) -> SeaFormerSeg:
    """An ADE20K segmenter, fused (when reparameterized) for `image_size`."""
    backbone = SeaFormer(
        num_classes=None, drop_path_rate=0.1, export_size=hw(image_size), **CONFIGS[variant]
    )
    return SeaFormerSeg(backbone, LightHead(num_classes=num_classes, **_HEADS[variant]))


for _variant in CONFIGS:
    register(
        ModelSpec(
            name=f"seaformer_seg_{_variant}_ade20k",
            family="seaformer",
            builder=partial(build_seaformer_seg, _variant),
            input_size=SEG_SIZE,
            task="segmentation",
            num_classes=150,
            labels="ade20k-150",
            preprocessing=Preprocessing(crop_pct=1.0, interpolation="bilinear"),
            remap_state_dict=remap_official,
            size_multiple=32,
            head_key="decode_head.conv_seg.weight",
            headless_ok=False,
            description=(
                f"SeaFormer-{NAMES[_variant]} + LightHead (ICLR 2023), ADE20K, "
                "logits at 1/8 of the input"
            ),
        )
    )
