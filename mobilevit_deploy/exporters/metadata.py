"""The metadata record every artifact carries (embedded where possible + sidecar).

An exported file without its preprocessing is a trap: the app feeding it must know
the input size, mean/std and label set. The record holds no timestamp, so the same
export twice gives byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib import metadata as importlib_metadata

from torch import nn

from ..registry import ModelSpec
from ..weights import Provenance

_TOOLS = ("mobilevit_deploy", "torch", "onnx", "onnxruntime", "onnxslim")


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in (*_TOOLS, *extra):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


# The seed a model without weights is built with (api.load_model), so that the same
# command exports the same file and a file's reference can be built again.
INIT_SEED = 0

# A module the caller built and passed in: its weights' origin is theirs to know.
CALLER_MODULE = Provenance("the caller's module (weights not recorded)", None, "unknown")


def output_names(spec: ModelSpec) -> list[str]:
    """The graph's output names: one `output`, or `stage<i>` per feature map."""
    if spec.features is None:
        return ["output"]
    return [f"stage{i}" for i in spec.features]


def describe_outputs(spec: ModelSpec, model: nn.Module | None) -> list[dict]:
    """Each output's name and meaning; feature maps with their stride and channels."""
    names = output_names(spec)
    if spec.features is None:
        kind = {"classification": "logits", "segmentation": "logits map at stride 8"}
        meaning = "pooled features" if spec.num_classes == 0 else kind.get(spec.task, "")
        return [{"name": names[0], "meaning": meaning}]
    info = model.stage_info()
    return [
        {"name": name, "stage": i, "stride": info[i][0], "channels": info[i][1]}
        for name, i in zip(names, spec.features, strict=True)
    ]


@dataclass
class ArtifactMetadata:
    """The record (docs/architecture.md: contracts). The shared fields are typed; what one
    format alone finds or chooses (its op list, a delegation report, a deployment
    target) goes in `details`, flattened beside them when written."""

    model: str
    family: str
    task: str
    format: str
    precision: str
    reparameterized: bool
    input_shape: list
    mean: list
    std: list
    crop_pct: float
    interpolation: str
    num_classes: int
    labels: str
    output_names: list[str]
    outputs: list[dict]
    weights: str
    weights_sha256: str | None
    weights_form: str | None
    tool_versions: dict[str, str | None]
    input_name: str = "input"
    input_layout: str = "NCHW"
    input_range: str = "RGB in [0, 1], then (x - mean) / std"
    class_labels: list[str] | None = None
    adaptations: list[str] | None = None
    upsample: str | None = None
    upsample_note: str | None = None
    int8_float_modules: list[str] | None = None
    # The PSNR an int8 file was searched to meet; verify holds it to that.
    int8_target_db: float | None = None
    calibration: str | None = None  # what int8 calibrated on
    # What the file's delegates leave to slower kernels, in words (TFLite: ops mobile
    # GPU/NNAPI delegates lack; ExecuTorch: the share XNNPACK runs, the ops it does not).
    delegate_report: list[str] | None = None
    # The stages whose maps a features model returns (ModelSpec.features), and the seed
    # a model without weights was built with: with the rest of the record, what builds
    # the file's reference again.
    features: list[int] | None = None
    init_seed: int | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The record as written: optional fields only when set, details beside."""
        record = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "details" and (f.default is not None or getattr(self, f.name) is not None)
        }
        return {**record, **self.details}


def artifact_metadata(
    spec: ModelSpec,
    *,
    model: nn.Module | None = None,
    provenance: Provenance | None,
    image_size: tuple[int, int],
    batch: int | str,
    reparameterized: bool,
    precision: str,
    fmt: str,
    extra_tools: tuple[str, ...] = (),
) -> ArtifactMetadata:
    pre = spec.preprocessing
    return ArtifactMetadata(
        model=spec.name,
        family=spec.family,
        task=spec.output_kind,
        format=fmt,
        precision=precision,
        reparameterized=reparameterized,
        input_shape=[batch, 3, *image_size],
        mean=list(pre.mean),
        std=list(pre.std),
        crop_pct=pre.crop_pct,
        interpolation=pre.interpolation,
        num_classes=spec.num_classes,
        labels=spec.labels,
        output_names=output_names(spec),
        outputs=describe_outputs(spec, model),
        weights=provenance.source if provenance else "random initialisation (no weights)",
        weights_sha256=provenance.sha256 if provenance else None,
        weights_form=provenance.form if provenance else None,
        tool_versions=tool_versions(extra_tools),
        class_labels=list(spec.class_names) if spec.class_names is not None else None,
        adaptations=list(spec.adaptations) if spec.adaptations else None,
        features=list(spec.features) if spec.features is not None else None,
        init_seed=INIT_SEED if provenance is None else None,
    )
