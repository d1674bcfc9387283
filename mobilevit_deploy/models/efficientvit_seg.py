"""EfficientViT (MIT) semantic segmenters: Cityscapes (19 classes, 1024x2048) and
ADE20K (150 classes, 512x512), B0-B3 and L1-L2, as `models/efficientvit/seg.py` of
mit-han-lab/efficientvit builds them.

The head (the official SegHead, a DAGBlock) projects stages 4, 3 and 2 to one width,
upsamples the coarser two to stride 8 and adds them, runs MBConv (B) or FusedMBConv
(L) blocks, and predicts classes at stride 8: the official model returns that stride-8
map, and so does this one (callers resize to the image).

Upsampling is bicubic in the official head. Some mobile runtimes lack bicubic resize,
so `set_upsample("bilinear")` swaps it; tests/test_efficientvit_seg.py measures what
that costs against the bicubic original.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ..registry import ModelSpec, Preprocessing, register
from .efficientvit import (
    CONFIGS,
    L_SERIES_EPS,
    ConvLayer,
    EfficientViTBackbone,
    EfficientViTLargeBackbone,
    FusedMBConv,
    IdentityLayer,
    MBConv,
    OpSequential,
    ResidualBlock,
    set_norm_eps,
)

UPSAMPLE_MODES = ("bicubic", "bilinear")


class UpSampleLayer(nn.Module):
    def __init__(self, factor: int, mode: str = "bicubic") -> None:
        super().__init__()
        self.factor = factor
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.interpolate(
            x, scale_factor=self.factor, mode=self.mode, align_corners=False
        )


class SegHead(nn.Module):
    """The official DAGBlock layout: `input_ops`, `middle`, `output_ops` (summed inputs)."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        width: int,
        depth: int,
        expand: float,
        middle_op: str,
        final_expand: int | None,
        n_classes: int,
        act: str,
        upsample: str,
    ) -> None:
        super().__init__()
        inputs: list[nn.Module] = []
        for cin, stride in zip(in_channels, strides, strict=True):
            conv = ConvLayer(cin, width, 1, act=None)
            factor = stride // 8
            inputs.append(
                conv if factor == 1 else OpSequential([conv, UpSampleLayer(factor, upsample)])
            )
        self.input_ops = nn.ModuleList(inputs)
        blocks = []
        for _ in range(depth):
            if middle_op == "mbconv":
                block: nn.Module = MBConv(width, width, 1, expand, act, fewer_norm=False)
            else:
                block = FusedMBConv(width, width, 1, expand, act, fewer_norm=False)
            blocks.append(ResidualBlock(block, IdentityLayer()))
        self.middle = OpSequential(blocks)
        out: list[nn.Module] = []
        if final_expand is not None:
            out.append(ConvLayer(width, width * final_expand, 1, act=act))
        out.append(
            ConvLayer(
                width * (final_expand or 1), n_classes, 1, use_bias=True, norm=False, act=None
            )
        )
        self.output_ops = nn.ModuleList([OpSequential(out)])

    def forward(self, features: list[Tensor]) -> Tensor:
        x = sum(op(f) for op, f in zip(self.input_ops, features, strict=True))
        return self.output_ops[0](self.middle(x))


class EfficientViTSeg(nn.Module):
    def __init__(self, backbone: nn.Module, head: SegHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        stages = self.backbone.forward_stages(x)
        return self.head([stages[4], stages[3], stages[2]])

    def set_upsample(self, mode: str) -> None:
        """bicubic (the official) or bilinear (for runtimes without bicubic resize)."""
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, UpSampleLayer):
                m.mode = mode


# variant -> dataset -> (head width, depth, expand, middle op, final expand)
_HEADS = {
    "b0": {"cityscapes": (32, 1, 4, "mbconv", 4)},
    "b1": {"cityscapes": (64, 3, 4, "mbconv", 4), "ade20k": (64, 3, 4, "mbconv", None)},
    "b2": {"cityscapes": (96, 3, 4, "mbconv", 4), "ade20k": (96, 3, 4, "mbconv", None)},
    "b3": {"cityscapes": (128, 3, 4, "mbconv", 4), "ade20k": (128, 3, 4, "mbconv", None)},
    "l1": {"cityscapes": (256, 3, 1, "fmbconv", None), "ade20k": (128, 3, 4, "fmbconv", 8)},
    "l2": {"cityscapes": (256, 5, 1, "fmbconv", None), "ade20k": (128, 3, 4, "fmbconv", 8)},
}
_DATASETS = {"cityscapes": (19, (1024, 2048)), "ade20k": (150, (512, 512))}


def build_efficientvit_seg(
    variant: str, dataset: str, upsample: str = "bicubic", num_classes: int | None = None
) -> EfficientViTSeg:
    """The official segmenter; `num_classes` other than the dataset's for fine-tunes."""
    series, widths, depths, dim, _ = CONFIGS[variant]
    width, depth, expand, middle_op, final_expand = _HEADS[variant][dataset]
    if series == "b":
        backbone: nn.Module = EfficientViTBackbone(widths, depths, dim)
        act = "hswish"
    else:
        backbone = EfficientViTLargeBackbone(widths, depths, dim)
        act = "gelu"
    head = SegHead(
        [widths[4], widths[3], widths[2]],
        [32, 16, 8],
        width,
        depth,
        expand,
        middle_op,
        final_expand,
        num_classes or _DATASETS[dataset][0],
        act,
        upsample,
    )
    model = EfficientViTSeg(backbone, head)
    if series == "l":
        set_norm_eps(model, L_SERIES_EPS)
    return model


for _variant, _heads in _HEADS.items():
    for _dataset in _heads:
        _classes, _size = _DATASETS[_dataset]
        register(
            ModelSpec(
                name=f"efficientvit_seg_{_variant}_{_dataset}",
                family="efficientvit",
                builder=partial(build_efficientvit_seg, _variant, _dataset),
                input_size=_size,
                task="segmentation",
                num_classes=_classes,
                labels=_dataset,
                preprocessing=Preprocessing(crop_pct=1.0, interpolation="bilinear"),
                # The classifier conv closes the head's last OpSequential (index 1 after
                # an expanding ConvLayer).
                head_key=f"head.output_ops.0.op_list.{int(_heads[_dataset][4] is not None)}"
                ".conv.weight",
                headless_ok=False,
                description=(
                    f"EfficientViT-{_variant.upper()} segmentation (MIT Han Lab), "
                    f"{_dataset}, {_size[0]}x{_size[1]}; class map at stride 8"
                ),
            )
        )
