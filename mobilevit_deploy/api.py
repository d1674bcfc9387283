"""The Python API. Every CLI command is one call of a function here.

load_model("fastvit_sa12", weights="ckpt.pth.tar")   # train-time (or deploy) form
reparameterize(model)                               # fused copy
export("fastvit_sa12", "onnx", output="m.onnx")     # Artifact
verify("fastvit_sa12", formats=("onnx",))           # VerifyReport
verify_files(["m.onnx"], weights="ckpt.pth.tar")    # VerifyReport of files you have
benchmark("fastvit_sa12")                           # BenchReport
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import limits
from .configure import Features, configure, with_labels
from .errors import BadInput
from .exporters import Artifact, ExportJob, float_modules
from .exporters.formats import FORMATS, Format, check_format, check_options
from .exporters.int8_search import describe as describe_int8
from .exporters.int8_search import search_int8
from .exporters.metadata import CALLER_MODULE, artifact_metadata
from .files import check_output_file, resolve_artifact_path
from .hub import is_hub_folder, read_hub_folder
from .images import natural_images, to_model_input
from .judge import DEFAULT_INT8_TARGET_DB
from .registry import ModelSpec
from .reparam import reparameterize
from .request import ImageSize, Request, parse_image_size
from .user_images import load_images
from .weights import load_into_spec
from .zoo import get_spec


def resolve_pretrained(spec: ModelSpec, tag: str | bool) -> tuple[str, str | None]:
    """URL and checksum of a published checkpoint; `True` means the first listed."""
    if not spec.weight_sources:
        raise BadInput(f"{spec.name} has no published weights; pass --weights PATH")
    if tag is True:
        return spec.weight_sources[0].url, spec.weight_sources[0].sha256
    for source in spec.weight_sources:
        if source.tag == tag:
            return source.url, source.sha256
    tags = ", ".join(s.tag for s in spec.weight_sources)
    raise BadInput(f"{spec.name} has no weights tagged {tag!r}; available: {tags}")


def load_model(
    name: str,
    weights: str | Path | None = None,
    *,
    pretrained: bool | str = False,
    progress: bool = True,
    num_classes: int | None = None,
    image_size: ImageSize = None,
    labels: Path | Sequence[str] | None = None,
    features: Features = None,
) -> nn.Module:
    """The model in the form its weights hold (train, deploy or fused), in eval mode.

    `weights` is a path, a local hub folder (config.json beside model.safetensors or
    pytorch_model.bin) or an http(s) URL (downloaded once into the cache);
    `pretrained` picks a published checkpoint by tag. Without either, the model is
    randomly initialised (seeded: the same every time).

    The checkpoint sizes the model (configure.py): its head's classes (or none), a
    LeViT's token grid, the class names it carries. `num_classes` builds a fresh model
    of that size or checks a checkpoint against it; `image_size` other than a LeViT
    checkpoint's resizes its bias tables; `labels` (a file or names) must match the
    head; `features` (True or stage indices) makes the model return feature maps.
    The spec of what was built is `model.mvd_spec`.
    """
    spec = get_spec(name)
    if weights is not None and pretrained:
        raise BadInput("give either --weights or --pretrained, not both")
    asked_size = check_image_size(spec, image_size) if image_size is not None else None
    config = dict(num_classes=num_classes, image_size=asked_size, labels=labels, features=features)
    source, sha = None, None
    if pretrained:
        source, sha = resolve_pretrained(spec, pretrained)
    elif weights is not None and str(weights).startswith(("http://", "https://")):
        source = str(weights)
    if source is not None:
        from .download import download

        weights = download(source, sha256=sha, progress=progress)
    if weights is None:
        derived, _ = configure(spec, None, **config)
        # Seeded, so the same command exports the same file (CI caches, reviews).
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = derived.build().eval()
        model.mvd_provenance = None
        model.mvd_spec = derived
        return model
    path, carried = Path(weights), None
    if is_hub_folder(path):
        path, carried = read_hub_folder(path, spec)
    model = load_into_spec(spec, path, source, carried=carried, **config)
    check_image_size(spec, model.mvd_spec.input_hw)  # a hub config's size must fit too
    return model


def spec_of(model: nn.Module, name: str) -> ModelSpec:
    """The spec a loaded model was built from; for a caller's own module, the zoo's
    sized by the module's own tensors, as a checkpoint's would size it (its head, a
    LeViT's grid)."""
    spec = getattr(model, "mvd_spec", None)
    if spec is not None:
        return spec
    derived, _ = configure(get_spec(name), model.state_dict())
    return dataclasses.replace(derived, features=getattr(model, "features", None))


def check_image_size(spec: ModelSpec, image_size: ImageSize) -> tuple[int, int]:
    """The (height, width) to use; BadInput if the network cannot take it."""
    hw = parse_image_size(image_size) or spec.input_hw
    multiple = spec.size_multiple
    if any(side < multiple or side % multiple for side in hw):
        raise BadInput(
            f"image size {hw[0]}x{hw[1]} does not fit {spec.name}: height and width must be "
            f"positive multiples of {multiple} (the network's total stride); default "
            f"{spec.input_hw[0]}x{spec.input_hw[1]}"
        )
    return hw


CALIBRATION_SEED = 7_000
HELD_OUT_SEED = 8_000
# Four times verify's default count: the int8 search judges the PSNR that most sets
# of 8 of them reach (exporters/int8_search.py), as a PSNR over 8 images is the set's.
HELD_OUT_IMAGES = 32
# A static batch beyond this is no phone's: it only multiplies export time and memory.
MAX_BATCH = 256


def int8_images(
    spec: ModelSpec, size: tuple[int, int], source: int | str | Path
) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration images, held-out images (the int8 search's judge, never calibrated
    on) and their description. A count draws natural-looking images with seeds apart
    from verify's and bench's; a directory is the user's own, every fourth held out."""
    if isinstance(source, int) or str(source).isdigit():
        count = int(source)
        if count < 1:
            raise BadInput(f"int8 needs calibration images, got {count}")
        calibration = example_input(spec, size, count, seed=CALIBRATION_SEED)
        held_out = example_input(spec, size, HELD_OUT_IMAGES, seed=HELD_OUT_SEED)
        return calibration, held_out, f"{count} natural-looking images"
    pictures = load_images(Path(source), spec, size, flag="--calibration-images")
    images = to_model_input(pictures, spec)
    if len(images) < 2:
        raise BadInput(
            f"--calibration-images {source}: int8 needs at least 2 images "
            "(some calibrate, some are held out to judge the result)"
        )
    held = np.arange(len(images)) % 4 == 3 if len(images) >= 4 else np.arange(len(images)) == 0
    return (
        images[~held],
        images[held],
        f"{int((~held).sum())} images from {source} ({int(held.sum())} more held out)",
    )


def example_input(
    spec: ModelSpec, image_size: tuple[int, int], batch: int = 1, seed: int = 0
) -> np.ndarray:
    return to_model_input(natural_images(batch, image_size, seed), spec)


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export decided before any work: the format and precision, the
    typed options, where the file goes and what the user should hear about it."""

    name: str
    fmt: Format
    precision: str
    options: Any
    output: Path
    batch: int
    reparam: bool
    upsample: str | None
    request: Request
    image_size: tuple[int, int]
    notes: tuple[str, ...] = ()


def plan_export(
    name: str,
    format: str,
    *,
    spec: ModelSpec,
    output: str | Path | None,
    batch: int,
    reparam: bool,
    precision: str | None,
    upsample: str | None,
    request: Request,
) -> ExportPlan:
    """Check an export before any work: format, precision, options, bounds, the path."""
    fmt = check_format(format, precision)
    precision = precision or fmt.default_precision
    if request.precisions:
        raise BadInput("export writes one file: give its precision with --precision")
    typed_options = check_options(fmt, dict(request.format_options))
    limits.check_count("--batch", batch, 1, MAX_BATCH)
    if request.int8_target is not None and precision != "int8":
        raise BadInput(f"--int8-target applies to int8, not {precision}")
    if upsample is not None and upsample not in ("bicubic", "bilinear"):
        raise BadInput(f"--upsample takes bicubic or bilinear, not {upsample!r}")
    if upsample == "bicubic" and not fmt.has_bicubic:
        raise BadInput(
            f"{format} has no bicubic resize; "
            "use --upsample bilinear, whose cost `mvd verify` reports"
        )
    others = {f.suffix: f.name for f in FORMATS.values() if f.name != format}
    out, path_note = resolve_artifact_path(output, spec.name, fmt.suffix, others)
    check_output_file(out, package=fmt.package)
    return ExportPlan(
        name,
        fmt,
        precision,
        typed_options,
        out,
        batch,
        reparam,
        upsample,
        request,
        check_image_size(spec, request.image_size),
        (path_note,) if path_note else (),
    )


def _upsample_choice(plan: ExportPlan, model: nn.Module) -> tuple[str | None, str | None]:
    """The resize mode a segmenter exports with, and a note when the format chose it."""
    switchable = callable(getattr(model, "set_upsample", None))
    if plan.upsample is not None and not switchable:
        raise BadInput(f"{plan.name} has no upsampling to choose (--upsample is for segmenters)")
    if plan.upsample is None and not plan.fmt.has_bicubic and switchable:
        return "bilinear", (
            f"{plan.fmt.name} has no bicubic resize, so this segmenter upsamples bilinear; "
            "`mvd verify` reports what that costs against the bicubic original"
        )
    return plan.upsample, None


def make_job(
    plan: ExportPlan, model: nn.Module, spec: ModelSpec
) -> tuple[ExportJob, list[str], np.ndarray | None]:
    """The deployable module (fused unless asked otherwise, its resize mode chosen), its
    record so far, the notes for the user, and int8's held-out images (else None)."""
    size = plan.image_size
    provenance = getattr(model, "mvd_provenance", CALLER_MODULE)
    deployable = reparameterize(model, image_size=size) if plan.reparam else model.eval()
    dynamic = getattr(plan.options, "dynamic_batch", False)
    meta = artifact_metadata(
        spec,
        model=deployable,
        provenance=provenance,
        image_size=size,
        batch="batch" if dynamic else plan.batch,
        reparameterized=plan.reparam,
        precision=plan.precision,
        fmt=plan.fmt.name,
        extra_tools=plan.fmt.dists,
    )
    notes = [*plan.notes, *spec.adaptations, *plan.fmt.default_notes(plan.options)]
    upsample, chosen = _upsample_choice(plan, model)
    if chosen:
        notes.append(chosen)
        meta.upsample_note = chosen
    if upsample is not None:
        deployable.set_upsample(upsample)  # a copy (reparameterize) or the eval model
        meta.upsample = upsample
    calibration = held_out = None
    if plan.precision == "int8":
        meta.int8_float_modules = [path for path, _ in float_modules(deployable)]
        calibration, held_out, meta.calibration = int8_images(
            spec, size, plan.request.calibration_images
        )
    example = example_input(spec, size, plan.batch)
    job = ExportJob(
        deployable, plan.output, example, plan.precision, plan.options, meta, spec, calibration
    )
    return job, notes, held_out


def run_job(
    plan: ExportPlan,
    job: ExportJob,
    notes: list[str],
    held_out: np.ndarray | None,
    progress: Callable[[str], None],
) -> Artifact:
    """Write the file: the format's exporter, or the int8 accuracy search around it."""
    if plan.precision != "int8":
        record = plan.fmt.load("exporter")(job)
    else:
        target = plan.request.int8_target
        target = DEFAULT_INT8_TARGET_DB if target is None else target
        record = search_int8(plan.fmt, job, target, held_out, progress)
        notes.append(describe_int8(record.details["int8_search"]))
    notes += record.delegate_report or []
    return Artifact(plan.output, plan.fmt.name, plan.precision, record, tuple(notes))


def export(
    name: str,
    format: str = "onnx",
    *,
    model: nn.Module | None = None,
    output: str | Path | None = None,
    batch: int = 1,
    reparam: bool = True,
    precision: str | None = None,
    upsample: str | None = None,
    request: Request | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    **options,
) -> Artifact:
    """Export `name` (or an already loaded `model` of that name) to one artifact.

    `request` (or `options`: its fields and the format's own options, request.py) says
    how the model is built and the file made: weights, size, head, labels, features,
    the int8 target and calibration images, the format's options (exporters/formats.py;
    another format's option is refused). `precision` defaults to the format's own
    (CoreML: fp16, as on device; others: fp32). int8 calibrates on natural-looking
    images drawn apart from verify's and bench's, or on a folder of the user's own (a
    quarter held out), then keeps the most sensitive modules float until the int8 target
    holds on held-out images (int8_search.py). `upsample` ("bicubic" or "bilinear")
    picks a segmenter's resize mode. `output` may be a directory (`DIR/<model><suffix>`)
    or a name without the suffix (which is added; the artifact's notes say so).
    """
    request = Request.of(request, **options)
    if model is not None and request.configures_model:
        raise BadInput(
            "num_classes and features configure a model being loaded; "
            "pass them to load_model, not with model="
        )
    spec = spec_of(model, name) if model is not None else get_spec(name)
    if model is not None and request.labels is not None:
        spec = with_labels(spec, request.labels)
    plan = plan_export(
        name,
        format,
        spec=spec,
        output=output,
        batch=batch,
        reparam=reparam,
        precision=precision,
        upsample=upsample,
        request=request,
    )
    if model is None:
        model = load_model(name, request.weights, **request.model_options)
        spec = model.mvd_spec
        plan = dataclasses.replace(plan, image_size=spec.input_hw)
    job, notes, held_out = make_job(plan, model, spec)
    return run_job(plan, job, notes, held_out, progress)
