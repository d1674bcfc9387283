"""CoreML export: torch -> ML Program `.mlpackage` with metadata, labels and image input.

Goes through `torch.export` (an ATen graph), not `torch.jit.trace`: with torch 2.13
and numpy >= 2.3, coremltools 9.0's TorchScript frontend fails on shape arithmetic
("only 0-dimensional arrays can be converted to Python scalars"); the ExportedProgram
frontend has no such casts. The models are written rank <= 4 for the same reason
(CoreML stops at rank 5).

With `image_input`, CoreML feeds pixels in [0, 255] through one scalar scale and a
per-channel bias, so (x/255 - mean)/std cannot be expressed; the bias takes the mean
and the 1/std is folded into the first convolution's weights (exact, zero padding
included; a model whose input meets something else first multiplies it in), instead of
approximating std by one number. It is the default: Vision (VNCoreMLModel) and Xcode's
preview take an image input; `image_input=False` keeps the normalised tensor.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import warnings

import numpy as np
import torch
from torch import nn

from ..files import atomic_artifact
from ..registry import ModelSpec
from ..runtimes.coreml import import_coremltools
from . import ExportJob
from .metadata import ArtifactMetadata, output_names

# coremltools stamps the conversion date; the metadata record holds no timestamp
# (docs/architecture.md).
_DATED_KEY = "com.github.apple.coremltools.conversion_date"


def first_conv(model: nn.Module, example: torch.Tensor) -> nn.Conv2d | None:
    """The Conv2d that consumes the model's input tensor itself (found by running it),
    where it is one that 1/std folds into exactly: ungrouped, zero-padded."""
    found: list[nn.Module] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if not found and args and args[0] is example:
            found.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    conv = found[0] if found else None
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    return conv


class _ScaledInput(nn.Module):
    """Multiplies the input by 1/std per channel: the image input's last step, for a
    model whose input does not first meet a plain convolution to fold it into."""

    def __init__(self, model: nn.Module, std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        inv = (1 / torch.tensor(std, dtype=torch.float64)).float().reshape(1, -1, 1, 1)
        self.register_buffer("inv_std", inv)

    def forward(self, x: torch.Tensor):
        return self.model(x * self.inv_std)


def fold_input_std(model: nn.Module, example: torch.Tensor, std: tuple[float, ...]) -> nn.Module:
    """A copy that takes (x - mean) instead of (x - mean) / std: 1/std folded into the
    first conv's weights, or where there is none to fold into, multiplied in first."""
    model = copy.deepcopy(model)
    conv = first_conv(model, example)
    if conv is None:
        return _ScaledInput(model, std)
    scale = torch.tensor([1.0 / s for s in std], dtype=torch.float64).reshape(1, -1, 1, 1)
    with torch.no_grad():
        conv.weight.copy_((conv.weight.double() * scale).to(conv.weight.dtype))
    return model


class _WithSoftmax(nn.Module):
    """CoreML classifiers report probabilities; the zoo's heads give logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=-1)


def class_labels(spec: ModelSpec) -> list:
    """The classifier's labels: the names the model carries (a checkpoint's, a hub
    config's, --labels), or the class indices (no names ship offline)."""
    if spec.class_names is not None:
        return list(spec.class_names)
    return list(range(spec.num_classes))


def _convert(model, example, spec: ModelSpec, precision, min_target, image_input, labels):
    ct = import_coremltools()

    x = torch.from_numpy(example)
    if image_input:
        model = fold_input_std(model, x, spec.preprocessing.std)
        inputs = [
            ct.ImageType(
                name="input",
                shape=x.shape,
                scale=1 / 255,
                bias=[-m for m in spec.preprocessing.mean],
                color_layout=ct.colorlayout.RGB,
            )
        ]
    else:
        inputs = [ct.TensorType(name="input", shape=x.shape, dtype=np.float32)]
    classifier = None
    if labels is not None:
        model = _WithSoftmax(model)
        classifier = ct.ClassifierConfig(labels)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (x,)).run_decompositions({})
    return ct.convert(
        program,
        inputs=inputs,
        outputs=None if classifier else [ct.TensorType(name=n) for n in output_names(spec)],
        classifier_config=classifier,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, min_target),
    )


def _compress(mlmodel, compress: str):
    from coremltools.optimize import coreml as cto

    if compress == "palettize8":
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=8)
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def export_coreml(job: ExportJob) -> ArtifactMetadata:
    """Write the `.mlpackage` directory `job.output` (+ `.json`). A classifier is
    packaged with a ClassifierConfig of its labels and a softmax (its outputs are then
    probabilities); feature maps and pooled features are plain named tensor outputs."""
    spec, precision, options = job.spec, job.precision, job.options
    label_list = class_labels(spec) if spec.output_kind == "classification" else None
    changes: dict = {}
    if options.image_input:
        changes["input_range"] = "RGB pixels in [0, 255]; preprocessing is inside the model"
    if label_list is not None:
        changes["output_names"] = ["classLabel", "classLabel_probs"]
        changes["outputs"] = [
            {"name": "classLabel", "meaning": "the top class's label"},
            {"name": "classLabel_probs", "meaning": "softmax probability of every label"},
        ]
    details = {
        "min_target": options.min_target,
        "compress": options.compress,
        "input_type": "image, RGB" if options.image_input else "tensor",
        "probabilities": label_list is not None,
    }
    metadata = dataclasses.replace(
        job.metadata, **changes, details={**job.metadata.details, **details}
    )
    # coremltools draws progress bars and warns about the untested torch on stderr;
    # the CLI shows its own status, and verify proves the result.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        mlmodel = _convert(
            job.model.eval(),
            job.example,
            spec,
            precision,
            options.min_target,
            options.image_input,
            label_list,
        )
        if options.compress is not None:
            mlmodel = _compress(mlmodel, options.compress)
    record = metadata.to_dict()
    mlmodel.user_defined_metadata.pop(_DATED_KEY, None)
    for key, value in sorted(record.items()):
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        mlmodel.user_defined_metadata[f"mvd.{key}"] = text
    mlmodel.author = "mobilevit_deploy"
    form = "fused" if metadata.reparameterized else "unfused"
    mlmodel.short_description = (
        f"{spec.name} ({spec.family}, {spec.output_kind}), {form}, {precision}; "
        f"weights: {metadata.weights}"
    )
    mlmodel.version = metadata.tool_versions.get("mobilevit_deploy") or "unknown"
    with atomic_artifact(job.output, package=True) as staged:
        mlmodel.save(str(staged.path))
        staged.record = record
    return metadata
