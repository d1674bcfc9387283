"""`mvd eval`: accuracy on the user's own labelled images, for the model as loaded and
for each exported artifact, and what each artifact loses against it.

verify proves an artifact computes the original's function on made-up inputs; this says
what that is worth on the user's task: top-1 / top-5 of a classifier, mIoU and pixel
accuracy of a segmenter, and the drop of each artifact in points. A fused fp32 file
should lose nothing; fp16 next to nothing; int8 shows its real cost only here, on real
images and real weights.

The reference row "torch" is the model exactly as loaded (its train or deploy form,
fp32). Each artifact is exported from that model (`api.export`, fused, each format at
each precision asked) and run by its format's runner one image at a time, its static
batch. A format that cannot run here (CoreML off macOS) is skipped with a note.

Segmentation is scored as the families' official evaluations score it: the image
resized whole to the model's input (eval_data.py), the logits resized to each mask's
full size before the argmax (EfficientViT's eval_seg_model.py: bicubic; mmseg, which
SeaFormer uses: bilinear; align_corners=False for both), so the score is at the
annotation's resolution. Resizing logits rather than the argmax map (nearest) keeps
boundaries between the stride-8 cells where the logits cross, not on the cell grid,
which is what the published mIoUs measure. mIoU averages the IoU of every class present
in the prediction or the ground truth, accumulated over the whole set (mmseg's and
EfficientViT's rule: a class absent from both is not counted, one predicted but absent
scores 0); pixels marked 255 are ignored.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import api, limits
from .errors import BadInput
from .eval_data import IGNORE_INDEX, LabelledSet, check_data_path, read_labelled_set
from .exporters.formats import FORMATS
from .images import to_model_input
from .rebuild import open_files, rebuild
from .report import markdown_table, write_text
from .request import Request
from .runtimes import open_runner
from .runtimes.torch_runtime import TorchRunner
from .verify import check_formats

# How each family's official evaluation resizes logits to the mask; others: mmseg's.
LOGIT_RESIZE = {"efficientvit": "bicubic"}
TOP5_MIN_CLASSES = 5  # a head of fewer classes has no meaningful top-5

# (what is running, images done, images in all, or None while a file is exported)
Progress = Callable[[str, int, int | None], None]


def _quiet(*_args) -> None:
    return None


@dataclass
class CandidateResult:
    """One row: `metrics` on the set, `drop` in points below the torch row (positive:
    worse), `agreement` the share of images (pixels) whose decision is torch's."""

    candidate: str
    precision: str
    metrics: dict
    drop: dict = field(default_factory=dict)
    agreement: float = 1.0
    format: str | None = None


@dataclass
class EvalReport:
    model: str
    task: str
    image_size: tuple[int, int]
    num_classes: int
    weights: str
    data: str
    layout: str
    images: int
    preprocessing: str
    skipped: list[str] = field(default_factory=list)
    candidates: list[CandidateResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics the table shows: no top-5 for a head of fewer than 5 classes."""
        if self.task == "segmentation":
            return ("miou", "pixel_accuracy")
        return ("top1", "top5") if self.num_classes >= TOP5_MIN_CLASSES else ("top1",)

    def to_dict(self) -> dict:
        return asdict(self)


class _ClassificationScore:
    """Logits of every image, scored against the labels at the end."""

    def __init__(self, labelled: LabelledSet, class_names: Sequence[str]) -> None:
        self.labels = labelled.labels
        self.class_names = class_names
        self.logits: list[np.ndarray] = []

    def add(self, start: int, logits: np.ndarray) -> None:
        self.logits.append(np.asarray(logits, np.float32))

    def decisions(self) -> np.ndarray:
        return np.concatenate(self.logits).argmax(1)

    def agreement(self, reference: _ClassificationScore) -> float:
        return float(np.mean(self.decisions() == reference.decisions()))

    def metrics(self) -> dict:
        logits = np.concatenate(self.logits)
        hits = logits.argmax(1) == self.labels
        top5 = None
        if logits.shape[1] >= TOP5_MIN_CLASSES:
            best5 = np.argsort(-logits, axis=1)[:, :TOP5_MIN_CLASSES]
            top5 = float(np.mean((best5 == self.labels[:, None]).any(1)))
        present = np.unique(self.labels)
        per_class = {self.class_names[c]: float(hits[self.labels == c].mean()) for c in present}
        return {"top1": float(hits.mean()), "top5": top5, "per_class": per_class}


class _SegmentationScore:
    """Per-class intersections and unions summed over the set, and the argmax maps at
    mask size (for the agreement with torch)."""

    def __init__(self, labelled: LabelledSet, class_names: Sequence[str], mode: str) -> None:
        self.masks = labelled.masks
        self.class_names = class_names
        self.mode = mode
        classes = len(class_names)
        self.intersection = np.zeros(classes, np.int64)
        self.predicted = np.zeros(classes, np.int64)
        self.truth = np.zeros(classes, np.int64)
        self.maps: list[np.ndarray] = []

    def add(self, start: int, logits: np.ndarray) -> None:
        for offset, one in enumerate(np.asarray(logits, np.float32)):
            mask = self.masks[start + offset]
            scores = torch.from_numpy(one)[None]
            if scores.shape[2:] != mask.shape:
                scores = torch.nn.functional.interpolate(
                    scores, size=mask.shape, mode=self.mode, align_corners=False
                )
            pred = scores[0].argmax(0).numpy().astype(mask.dtype)
            self.maps.append(pred)
            valid = mask != IGNORE_INDEX
            classes = len(self.class_names)
            self.predicted += np.bincount(pred[valid], minlength=classes)
            self.truth += np.bincount(mask[valid], minlength=classes)
            hit = valid & (pred == mask)
            self.intersection += np.bincount(mask[hit], minlength=classes)

    def agreement(self, reference: _SegmentationScore) -> float:
        same = sum(int(np.sum(a == b)) for a, b in zip(self.maps, reference.maps, strict=True))
        return same / sum(m.size for m in self.maps)

    def metrics(self) -> dict:
        union = self.predicted + self.truth - self.intersection
        counted = union > 0
        iou = np.where(counted, self.intersection / np.maximum(union, 1), np.nan)
        return {
            "miou": float(np.mean(iou[counted])),
            "pixel_accuracy": float(self.intersection.sum() / max(self.truth.sum(), 1)),
            "per_class_iou": {
                name: float(iou[c]) for c, name in enumerate(self.class_names) if counted[c]
            },
        }


def evaluate(
    name: str | None = None,
    *,
    data: str | Path,
    files: Sequence[str | Path] = (),
    formats: Sequence[str] = ("onnx",),
    request: Request | None = None,
    batch: int = 8,
    work_dir: Path | None = None,
    progress: Progress = _quiet,
    warn: Callable[[str], None] = _quiet,
    **options,
) -> EvalReport:
    """Score `name` (built as the request says: weights, size, head, labels) and each
    of its artifacts on `data`; or score the user's own `files`, against the model their
    records describe (rebuild.py).

    `batch` is the torch row's batch (lower it for large segmenters); artifacts run one
    image at a time. Every fault of the data is raised before the first export.
    """
    request = Request.of(request, **options)
    if not files and request.weights is None and not request.pretrained:
        raise BadInput(
            "eval scores a trained model on your images: give its checkpoint with --weights "
            "(or --pretrained)"
        )
    opened = open_files([Path(f) for f in files]) if files else []
    if not opened:
        check_formats(formats, request.precisions)
        request.check_formats(formats)
    limits.check_count("batch", batch, 1, 1024)
    data = Path(data)
    check_data_path(data)
    if opened:
        model = rebuild(opened, request).model
    else:
        model = api.load_model(name, request.weights, **request.model_options)
    spec = model.mvd_spec
    labelled = read_labelled_set(data, spec, warn)
    report = EvalReport(
        spec.name,
        spec.output_kind,
        spec.input_hw,
        spec.num_classes,
        model.mvd_provenance.source if model.mvd_provenance else "random initialisation",
        str(data),
        labelled.layout,
        len(labelled),
        _preprocessing_line(spec),
        list(labelled.skipped),
        notes=list(spec.adaptations),
    )
    names = spec.class_names or tuple(str(i) for i in range(spec.num_classes))

    def score(label: str, runner: Callable, step: int):
        tally = (
            _SegmentationScore(labelled, names, LOGIT_RESIZE.get(spec.family, "bilinear"))
            if spec.output_kind == "segmentation"
            else _ClassificationScore(labelled, names)
        )
        progress(label, 0, len(labelled))
        for start in range(0, len(labelled), step):
            tally.add(start, runner(to_model_input(labelled.images[start : start + step], spec)))
            progress(label, min(start + step, len(labelled)), len(labelled))
        return tally

    reference = score("torch", TorchRunner(model), batch)
    report.candidates.append(CandidateResult("torch", "fp32", reference.metrics()))
    for file in opened:
        if _skipped_here(file.format, report, request.device):
            continue
        runner = open_runner(file.format, file.path, device=request.device)
        tally = score(file.path.name, runner, 1)
        report.candidates.append(
            _row(file.path.name, file.precision, file.format, tally, reference)
        )
    if not opened:
        _score_exports(model, formats, request, work_dir, report, score, reference, progress)
    return report


def _skipped_here(fmt: str, report: EvalReport, device: str | None) -> bool:
    """A format that cannot run here (CoreML off macOS) is skipped, with a note."""
    info = FORMATS[fmt]
    if device is not None or info.runs_here():
        return False
    report.notes.append(
        f"{fmt}: skipped, its files run on {info.runs_only_on} (`mvd verify` "
        "checks them statically here)"
    )
    return True


def _score_exports(model, formats, request, work_dir, report, score, reference, progress):
    """Export each format at each precision asked, and score the files."""
    spec = model.mvd_spec
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for fmt in formats:
            info = FORMATS[fmt]
            if _skipped_here(fmt, report, request.device):
                continue
            for precision in request.precisions or (info.default_precision,):
                label = f"{fmt} {precision}"
                progress(f"exporting {label}", 0, None)
                artifact = api.export(
                    spec.name,
                    fmt,
                    model=model,
                    output=Path(tmp) / f"{spec.name}.{precision}{info.suffix}",
                    precision=precision,
                    request=request.for_loaded_model(fmt, precision),
                )
                progress(f"exporting {label}", 1, 1)
                report.notes += [f"{label}: {n}" for n in artifact.notes if n not in report.notes]
                runner = open_runner(fmt, artifact.path, device=request.device)
                tally = score(label, runner, 1)
                report.candidates.append(_row(label, precision, fmt, tally, reference))


def _row(label: str, precision: str, fmt: str, tally, reference) -> CandidateResult:
    metrics, base = tally.metrics(), reference.metrics()
    drop = {
        k: None if metrics[k] is None else 100 * (base[k] - metrics[k])
        for k in ("top1", "top5", "miou", "pixel_accuracy")
        if k in metrics
    }
    return CandidateResult(label, precision, metrics, drop, tally.agreement(reference), fmt)


def _preprocessing_line(spec) -> str:
    pre = spec.preprocessing
    h, w = spec.input_hw
    norm = f"mean {list(pre.mean)} std {list(pre.std)}"
    if spec.output_kind == "segmentation":
        mode = LOGIT_RESIZE.get(spec.family, "bilinear")
        return (
            f"each image resized whole to {h}x{w} ({pre.interpolation}), {norm}; logits "
            f"resized to each mask's size ({mode}) before the argmax; {IGNORE_INDEX} ignored"
        )
    return f"resize, centre crop {h}x{w} (crop {pre.crop_pct}, {pre.interpolation}), {norm}"


# --- the command line's side: progress bars, the table, the files --------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


SHOWN = {"top1": "top-1", "top5": "top-5", "miou": "mIoU", "pixel_accuracy": "pixel acc"}


def _rows(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows, for the terminal and for Markdown alike."""
    names = report.metric_names
    headers = [
        "candidate",
        *(f"{SHOWN[m]} %" for m in names),
        *(f"{SHOWN[m]} drop pts" for m in names),
        "agrees with torch",
    ]
    rows = [
        [
            c.candidate,
            *(_percent(c.metrics[m]) for m in names),
            *(_points(c.drop.get(m)) for m in names),
            "-" if c.format is None else f"{c.agreement:.3f}",
        ]
        for c in report.candidates
    ]
    return headers, rows


def _title(report: EvalReport) -> str:
    return f"{report.model} @ {'x'.join(map(str, report.image_size))} on {report.images} images"


def _described(report: EvalReport) -> str:
    return (
        f"data: {report.data} ({report.layout}, {report.num_classes}-class head); "
        f"weights: {report.weights}; preprocessing: {report.preprocessing}"
    )


def render(report: EvalReport, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    headers, rows = _rows(report)
    table = Table(title=_title(report))
    for col in headers:
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(escape(_described(report)), soft_wrap=True)
    console.print(table)
    if report.skipped:
        console.print(
            f"skipped {len(report.skipped)} unreadable: {escape(', '.join(report.skipped))}",
            soft_wrap=True,
        )
    for note in report.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True)


def eval_markdown(report: EvalReport) -> str:
    headers, rows = _rows(report)
    skipped = f"\nSkipped (unreadable): {', '.join(report.skipped)}\n" if report.skipped else ""
    head = f"**{_title(report)}**\n\n{_described(report)}\n\n"
    return head + markdown_table(headers, rows) + skipped


@contextlib.contextmanager
def progress_bars(console) -> Iterator[Progress]:
    """A rich bar per candidate over the images (a pulsing one while a file exports)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int | None) -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(label, total=total)
        bars.update(tasks[label], completed=done, total=total)

    with bars:
        yield update


def run_cli(
    out,
    err,
    emit_json: Callable[[Path | None, object], bool],
    *,
    name: str | None,
    files: Sequence[Path],
    data: Path,
    formats: Sequence[str],
    request: Request,
    json_path: Path | None,
    markdown: Path | None,
) -> EvalReport:
    """`mvd eval`, its options as typed: bars while it runs, then the table (or JSON on
    stdout for `--json -`) and the files."""
    from rich.markup import escape

    with progress_bars(err) as progress:
        report = evaluate(
            name,
            data=data,
            files=files,
            formats=formats,
            request=request,
            progress=progress,
            warn=lambda msg: err.print(f"[yellow]warning:[/] {escape(msg)}"),
        )
    if not emit_json(json_path, report.to_dict()):
        render(report, out)
    if markdown:
        write_text(markdown, eval_markdown(report))
    return report
