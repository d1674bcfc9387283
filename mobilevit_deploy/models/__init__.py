"""One module per family (and its segmenters); importing them registers their specs."""

from . import (
    efficientvit,
    efficientvit_seg,
    fastvit,
    levit,
    levit_zoo,
    seaformer,
    seaformer_seg,
    seaformer_zoo,
    sepvit,
)

__all__ = [
    "efficientvit",
    "efficientvit_seg",
    "fastvit",
    "levit",
    "levit_zoo",
    "seaformer",
    "seaformer_seg",
    "seaformer_zoo",
    "sepvit",
]
