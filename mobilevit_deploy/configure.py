"""The user's model: what a checkpoint and the flags decide about a zoo spec.

A fine-tuned checkpoint is the real case (docs/architecture.md): its head tensors fix
the number of classes (none: a headless backbone), a LeViT's bias tables fix the token
grid it was trained at, and an mmseg file or a hub config may carry class names. The
zoo's defaults apply only where nothing says otherwise. The result is a ModelSpec like
any other, so every downstream step (export metadata, CoreML's classifier, verify's
metrics) reads the user's model from the same place it reads a stock one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import BadInput, CheckpointMismatch
from .limits import check_image_hw, check_num_classes
from .registry import ModelSpec, Preprocessing

Features = bool | Sequence[int] | None


@dataclasses.dataclass(frozen=True)
class Carried:
    """What a checkpoint or its hub folder says about itself, beside the tensors."""

    class_names: tuple[str, ...] | None = None
    class_names_from: str | None = None
    num_classes: int | None = None  # a hub config's, checked against the head
    image_size: tuple[int, int] | None = None  # a hub config's input_size
    preprocessing: Preprocessing | None = None


def read_labels_file(path: Path) -> tuple[str, ...]:
    """One class name per line, blank lines skipped."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(
            f"--labels {path} is a directory; give a text file with one class name per line"
        )
    if not path.is_file():
        raise BadInput(f"{path}: no such labels file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not a readable labels file ({exc})") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def head_classes(spec: ModelSpec, state: dict[str, torch.Tensor]) -> int | None:
    """Classes of the checkpoint's head; 0 when it has none (and the family allows a
    headless model); None when the family names no head key."""
    if spec.head_key is None:
        return None
    tensor = state.get(spec.head_key)
    if tensor is None:
        return 0 if spec.headless_ok else None
    return int(tensor.shape[0])


def _classes(
    spec: ModelSpec, state: dict | None, asked: int | None, carried: Carried
) -> tuple[int, str]:
    """The head size and where it came from, or the error that names the conflict."""
    if asked is not None:
        check_num_classes(asked)
    found = head_classes(spec, state) if state is not None else None
    for claimed, by in ((asked, "--num-classes"), (carried.num_classes, "the hub config")):
        if claimed is not None and found is not None and claimed != found:
            shape = tuple(state[spec.head_key].shape) if found else "absent"
            raise CheckpointMismatch(
                f"{by} says {claimed} classes, but the checkpoint's head has {found} "
                f"({spec.head_key} {shape})"
            )
    if found is not None:
        return found, "read from the checkpoint" + ("" if found else ", which has no head")
    if asked is not None:
        return asked, "--num-classes"
    return spec.num_classes, "zoo default"


def _feature_stages(spec: ModelSpec, features: Features) -> tuple[int, ...] | None:
    if features is None or features is False:
        return None
    with torch.device("meta"):
        model = dataclasses.replace(spec, features=None, num_classes=1).build()
    if not callable(getattr(model, "stage_info", None)):
        raise BadInput(
            f"--features exports a classifier's backbone stages; {spec.name} is a "
            f"{spec.task} model (export its classifier, e.g. the same family's)"
        )
    stages = len(model.stage_info())
    indices = tuple(range(stages)) if features is True else tuple(features)
    model.select_features(indices)  # BadInput for a stage that does not exist
    return model.features


def configure(
    spec: ModelSpec,
    state: dict[str, torch.Tensor] | None,
    *,
    num_classes: int | None = None,
    image_size: tuple[int, int] | None = None,
    labels: Path | Sequence[str] | None = None,
    features: Features = None,
    carried: Carried = Carried(),
) -> tuple[ModelSpec, dict | None]:
    """The spec of the user's model, and the state dict adapted to it (LeViT tables
    resampled for another size). `image_size` must already be checked."""
    classes, classes_from = _head_size(spec, state, num_classes, carried)
    size, state, adaptations = _fit_input_size(spec, state, image_size, carried)
    stages = _feature_stages(spec, features)
    names, names_from = _head_names(labels, carried, stages, classes, classes_from)
    said = [f"head: {_head_words(classes)} ({classes_from})"]
    said += _input_words(spec, state, image_size, carried, size, adaptations)
    if names is not None:
        said.append(f"class names: {len(names)} ({names_from})")
    if stages is not None:
        said.append(f"outputs: feature maps of stages {', '.join(map(str, stages))}")
    derived = dataclasses.replace(
        spec,
        configured_by=tuple(said),
        num_classes=classes,
        input_size=tuple(size),
        labels=spec.labels if classes == spec.num_classes and names is None else "custom",
        class_names=names,
        features=stages,
        adaptations=tuple(adaptations),
        preprocessing=carried.preprocessing or spec.preprocessing,
    )
    return derived, state


def _head_size(
    spec: ModelSpec, state: dict | None, asked: int | None, carried: Carried
) -> tuple[int, str]:
    """_classes, refusing a headless model of a family whose outputs are its head's (a
    segmenter's masks; a classifier without a head still gives pooled features)."""
    classes, classes_from = _classes(spec, state, asked, carried)
    if classes == 0 and not spec.headless_ok:
        raise BadInput(f"{spec.name} needs at least one class (a {spec.task} head)")
    return classes, classes_from


def _fit_input_size(
    spec: ModelSpec,
    state: dict | None,
    image_size: tuple[int, int] | None,
    carried: Carried,
) -> tuple[tuple[int, int], dict | None, list[str]]:
    """The input size, the state dict fitted to it, and what was changed to fit it.

    A model sized by its input (LeViT) takes its checkpoint's token grid unless another
    size is asked; then its tables are resampled, and the user is told, since the result
    is not the checkpoint's own function."""
    size = _asked_size(spec, image_size, carried)
    if not (spec.sized_by_input and state is not None and spec.checkpoint_size is not None):
        return size, state, []
    trained = spec.checkpoint_size(state, carried.image_size, image_size)
    if image_size is None or tuple(image_size) == trained:
        return trained, state, []
    state = spec.resize_state(state, trained, tuple(image_size))
    return (
        size,
        state,
        [
            f"attention-bias tables resized from the checkpoint's {trained[0]}x{trained[1]} "
            f"to {size[0]}x{size[1]} by bicubic interpolation: not the checkpoint's own "
            "function (fine-tune at this size for that)"
        ],
    )


def _asked_size(
    spec: ModelSpec, image_size: tuple[int, int] | None, carried: Carried
) -> tuple[int, int]:
    """--image-size, else the hub config's, else the zoo's; one the user or a hub
    config gave is bounded before anything is built at it."""
    size = image_size or carried.image_size or spec.input_hw
    if image_size or carried.image_size:
        where = "--image-size" if image_size else "the hub config's input_size"
        check_image_hw(tuple(size), where)
    return size


def _head_names(
    labels: Path | Sequence[str] | None,
    carried: Carried,
    stages: tuple[int, ...] | None,
    classes: int,
    classes_from: str,
) -> tuple[tuple[str, ...] | None, str | None]:
    """The class names of the head, checked against it. An export without a head
    (features, or a headless checkpoint) refuses names the user gave, since they would
    name nothing, but quietly drops names a checkpoint or hub config carried."""
    names, names_from = _class_names(labels, carried)
    if names is not None and (stages is not None or classes == 0):
        if names_from == "--labels":
            raise BadInput(
                "--labels names a head's classes, but this export has no head "
                + ("(--features)" if stages is not None else "(a headless checkpoint)")
            )
        return None, names_from
    if names is not None:
        check_class_names(names, names_from, classes, classes_from)
    return names, names_from


def _head_words(classes: int) -> str:
    return f"{classes} classes" if classes else "none (headless: pooled features)"


def _input_words(
    spec: ModelSpec,
    state: dict | None,
    image_size: tuple[int, int] | None,
    carried: Carried,
    size: tuple[int, int],
    adaptations: list[str],
) -> list[str]:
    """The input size line of `configured_by`, only where something other than the zoo
    default decided it (the checkpoint's token grid or the hub config)."""
    if spec.sized_by_input and state is not None:
        return [
            f"input: {size[0]}x{size[1]}"
            + (" (resized tables)" if adaptations else " (the checkpoint's token grid)")
        ]
    if carried.image_size is not None and image_size is None:
        return [f"input: {size[0]}x{size[1]} (the hub config's input_size)"]
    return []


def check_class_names(names: Sequence[str], where: str, classes: int, classes_from: str) -> None:
    """One name per class of the head, no name twice (a classifier's probabilities
    are keyed by name: a repeated one would hide a class)."""
    if len(names) != classes:
        raise BadInput(
            f"{where} names {len(names)} classes, but the model's head has {classes} "
            f"({classes_from})"
        )
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise BadInput(f"{where} names a class more than once: {', '.join(repeated[:5])}")


def with_labels(spec: ModelSpec, labels: Path | Sequence[str]) -> ModelSpec:
    """A loaded model's spec with class names given at export time."""
    names, where = _class_names(labels, Carried())
    if spec.output_kind not in ("classification", "segmentation"):
        raise BadInput("--labels names a head's classes, but this model exports no head")
    check_class_names(names, where, spec.num_classes, "the model's")
    return dataclasses.replace(spec, class_names=names, labels="custom")


def _class_names(
    labels: Path | Sequence[str] | None, carried: Carried
) -> tuple[tuple[str, ...] | None, str | None]:
    if isinstance(labels, (str, Path)):
        return read_labels_file(Path(labels)), "--labels"
    if labels is not None:
        return tuple(str(x) for x in labels), "--labels"
    return carried.class_names, carried.class_names_from
