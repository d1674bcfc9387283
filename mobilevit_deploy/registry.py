"""The model zoo's types and table: one ModelSpec per name, registered by the family
modules (zoo.py imports them all and answers lookups, so this module imports none).

A spec holds everything a downstream step needs to know about a model without
building it: input size, preprocessing, labels, weight sources and tolerances. The
exporters copy the preprocessing into every artifact, so it lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class WeightSource:
    """A published checkpoint. `sha256` is None where the publisher gives no hash."""

    tag: str
    url: str
    sha256: str | None = None
    fused: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    # Height x width the model was trained at; an int means square.
    input_size: int | tuple[int, int]
    task: str = "classification"
    num_classes: int = 1000
    labels: str = "imagenet-1k"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weight_sources: tuple[WeightSource, ...] = ()
    # Maps a foreign checkpoint layout (official repo) onto this project's key names.
    remap_state_dict: Callable[[dict], dict] | None = None
    # Input height and width must be multiples of this (the network's total stride).
    size_multiple: int = 32
    # Per-precision bounds that tighten the defaults in verify.py.
    tolerances: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    # The state-dict key (this project's names, after remapping) whose first dimension
    # is the number of classes: how a checkpoint tells its head size. A checkpoint
    # without it is headless (timm's num_classes=0) where `headless_ok`.
    head_key: str | None = None
    headless_ok: bool = True
    # Models whose weights' shapes depend on the input size (LeViT's attention-bias
    # tables): the builder takes `image_size`, `checkpoint_size` reads the size a state
    # dict was trained at, and `resize_state` resamples a state dict to another size.
    sized_by_input: bool = False
    # checkpoint_size(state, size a hub config declares, size asked for) -> trained size
    checkpoint_size: (
        Callable[[dict, tuple[int, int] | None, tuple[int, int] | None], tuple[int, int]] | None
    ) = None
    resize_state: Callable[[dict, tuple[int, int], tuple[int, int]], dict] | None = None
    # What a user's checkpoint or flags decided (configure.py): class names, and
    # the stages exported as feature maps instead of the head.
    class_names: tuple[str, ...] | None = None
    features: tuple[int, ...] | None = None
    # Notes on how this model differs from the checkpoint's own function (a resized
    # bias table); they go into every artifact's metadata.
    adaptations: tuple[str, ...] = ()
    # Where each of those choices came from, in words (`mvd info --weights` shows it).
    configured_by: tuple[str, ...] = ()

    @property
    def input_hw(self) -> tuple[int, int]:
        size = self.input_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def output_kind(self) -> str:
        """What the exported graph returns: the task's output, or feature maps or
        pooled features (a headless model)."""
        if self.features is not None or self.num_classes == 0:
            return "features"
        return self.task

    def build(self) -> nn.Module:
        """A fresh train-time module of this spec's configuration."""
        kwargs: dict = {"num_classes": self.num_classes}
        if self.sized_by_input:
            kwargs["image_size"] = self.input_hw
        model = self.builder(**kwargs)
        if self.features is not None:
            model.select_features(self.features)
        return model


SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in SPECS:
        raise ValueError(f"model {spec.name!r} registered twice")
    SPECS[spec.name] = spec
    return spec
