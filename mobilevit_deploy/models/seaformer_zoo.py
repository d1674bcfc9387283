"""SeaFormer's official configs and its ImageNet classifiers' zoo entries, and the
mapping of official checkpoints onto this model's keys. The network is seaformer.py.
"""

from __future__ import annotations

from functools import partial

from ..registry import ModelSpec, register
from .seaformer import SeaFormer

# k, t (expansion), c (channels), s (stride) per MobileNetV2 block, official configs.
CONFIGS = {
    "tiny": dict(
        cfgs=[
            [[3, 1, 16, 1], [3, 4, 16, 2], [3, 3, 16, 1]],
            [[5, 3, 32, 2], [5, 3, 32, 1]],
            [[3, 3, 64, 2], [3, 3, 64, 1]],
            [[5, 3, 128, 2]],
            [[3, 6, 160, 2]],
        ],
        channels=[16, 16, 32, 64, 128, 160],
        num_heads=4,
        depths=[2, 2],
        emb_dims=[128, 160],
        key_dims=[16, 24],
        mlp_ratios=(2, 4),
    ),
    "small": dict(
        cfgs=[
            [[3, 1, 16, 1], [3, 4, 24, 2], [3, 3, 24, 1]],
            [[5, 3, 48, 2], [5, 3, 48, 1]],
            [[3, 3, 96, 2], [3, 3, 96, 1]],
            [[5, 4, 160, 2]],
            [[3, 6, 192, 2]],
        ],
        channels=[16, 24, 48, 96, 160, 192],
        num_heads=6,
        depths=[3, 3],
        emb_dims=[160, 192],
        key_dims=[16, 24],
        mlp_ratios=(2, 4),
    ),
    "base": dict(
        cfgs=[
            [[3, 1, 16, 1], [3, 4, 32, 2], [3, 3, 32, 1]],
            [[5, 3, 64, 2], [5, 3, 64, 1]],
            [[3, 3, 128, 2], [3, 3, 128, 1]],
            [[5, 4, 192, 2]],
            [[3, 6, 256, 2]],
        ],
        channels=[16, 32, 64, 128, 192, 256],
        num_heads=8,
        depths=[4, 4],
        emb_dims=[192, 256],
        key_dims=[16, 24],
        mlp_ratios=(2, 4),
    ),
    "large": dict(
        cfgs=[
            [[3, 3, 32, 1], [3, 4, 64, 2], [3, 4, 64, 1]],
            [[5, 4, 128, 2], [5, 4, 128, 1]],
            [[3, 4, 192, 2], [3, 4, 192, 1]],
            [[5, 4, 256, 2]],
            [[3, 6, 320, 2]],
        ],
        channels=[32, 64, 128, 192, 256, 320],
        num_heads=8,
        depths=[3, 3, 3],
        emb_dims=[192, 256, 320],
        key_dims=[16, 20, 24],
        mlp_ratios=(2, 4, 6),
    ),
}

CLS_SIZE = 224


def hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def build_seaformer(
    variant: str, num_classes: int = 1000, image_size: int | tuple[int, int] = CLS_SIZE
) -> SeaFormer:
    """An ImageNet classifier, fused (when reparameterized) for `image_size`."""
    return SeaFormer(
        num_classes=num_classes,
        drop_path_rate=0.1,
        export_size=hw(image_size),
        **CONFIGS[variant],
    )


# mmseg-only entries of an official segmentation checkpoint that this model has no use for.
_MMSEG_EXTRAS = ("auxiliary_head.",)


def remap_official(state_dict: dict) -> dict:
    """Official checkpoints onto this model's keys.

    Classification (`.pth.tar` of the timm trainer): the keys are already ours; weights.py
    picks `state_dict_ema` first and strips a `module.` prefix. Segmentation (mmseg,
    `state_dict` with `backbone.` and `decode_head.` prefixes, SyncBN keys): the keys are
    ours too, since the model is an EncoderDecoder; an `auxiliary_head` (none of the
    SeaFormer configs has one, but a fine-tuning config may) is dropped.
    """
    return {k: v for k, v in state_dict.items() if not k.startswith(_MMSEG_EXTRAS)}


NAMES = {"tiny": "T", "small": "S", "base": "B", "large": "L"}

for _variant in CONFIGS:
    register(
        ModelSpec(
            name=f"seaformer_{_variant}",
            family="seaformer",
            builder=partial(build_seaformer, _variant),
            input_size=CLS_SIZE,
            remap_state_dict=remap_official,
            # Five stride-2 stages plus the stem make 64, but the convs pad, so any size
            # works; 32 keeps the official 224 (7 x 32) acceptable.
            size_multiple=32,
            head_key="linear.weight",
            description=f"SeaFormer-{NAMES[_variant]} (ICLR 2023), ImageNet-1k",
        )
    )
