"""The standard TFLite Metadata that MediaPipe Tasks and the LiteRT Task Library read.

Their image tasks (ImageClassifier, ImageSegmenter) do not run a bare interpreter: they
read the model's `TFLITE_METADATA` entry, a ModelMetadata flatbuffer (tflite-support's
metadata_schema.fbs, file identifier "M001"), for the input's colour space and
normalisation and for the labels of the output, and refuse a float input without
NormalizationOptions. This module writes that table from mvd's own record, with
flatbuffers' Builder against the schema's field ids (neither tflite-support, which pins
protobuf below 4, nor mediapipe's metadata writers, which do not import from its wheel,
are needed).

MediaPipe applies the normalisation to pixels in [0, 255] and with ONE mean and std for
all channels ("Per-channel image normalization is not available"); so files whose
(x - mean) / std is inside (the default) declare mean 0 and std 255: the app feeds RGB
in [0, 1]. Files that leave it to the app declare the model's per-channel mean and std
times 255, which the Task Library applies and MediaPipe refuses.

The labels are an associated TENSOR_AXIS_LABELS file packed as the metadata populator
packs it: a zip archive appended to the flatbuffer (stored, not compressed), which the
interpreter ignores and the tasks' metadata extractor opens by name.
"""

from __future__ import annotations

import io
import zipfile

import flatbuffers

METADATA_NAME = "TFLITE_METADATA"
LABELS_FILE = "labels.txt"
_IDENTIFIER = b"M001"

# The image segmenter's own table (mediapipe's image_segmenter_metadata_schema.fbs),
# a CustomMetadata of the subgraph under this name: it tells the task which activation
# turns the logits into confidence masks.
_SEGMENTER_NAME = "SEGMENTER_METADATA"
_SEGMENTER_IDENTIFIER = b"V001"
_SOFTMAX = 2

# Union tags (the member's position in the union, from 1) and enum values of the schema.
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # ContentProperties
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions
_RGB, _GRAYSCALE = 1, 2  # ColorSpaceType
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType

# The oldest parser that reads every field written: custom_metadata came with 1.5.0,
# everything else here is in 1.0.0.
_PARSER_VERSION = {False: "1.0.0", True: "1.5.0"}


def _table(b: flatbuffers.Builder, fields: list[tuple[str, int, object]]) -> int:
    """A table from (kind, slot, value) fields; a None value is left out. Kinds: "off"
    (an offset already built), "i8", "u32". Union fields take two slots: the type's,
    then the value's."""
    b.StartObject(max((slot for _, slot, _ in fields), default=-1) + 1)
    for kind, slot, value in fields:
        if value is None:
            continue
        if kind == "off":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "i8":
            b.PrependInt8Slot(slot, value, 0)
        else:
            b.PrependUint32Slot(slot, value, 0)
    return b.EndObject()


def _offsets(b: flatbuffers.Builder, items: list[int]) -> int:
    b.StartVector(4, len(items), 4)
    for item in reversed(items):
        b.PrependUOffsetTRelative(item)
    return b.EndVector()


def _floats(b: flatbuffers.Builder, values: list[float]) -> int:
    b.StartVector(4, len(values), 4)
    for value in reversed(values):
        b.PrependFloat32(float(value))
    return b.EndVector()


def _string(b: flatbuffers.Builder, text: str | None) -> int | None:
    return None if text is None else b.CreateString(text)


def _image_content(b: flatbuffers.Builder, color: int, hw: tuple[int, int] | None) -> int:
    size = None
    if hw is not None:
        size = _table(b, [("u32", 0, int(hw[1])), ("u32", 1, int(hw[0]))])  # width, height
    image = _table(b, [("i8", 0, color), ("off", 1, size)])
    return _table(b, [("i8", 0, _IMAGE_PROPERTIES), ("off", 1, image)])


def _feature_content(b: flatbuffers.Builder) -> int:
    return _table(b, [("i8", 0, _FEATURE_PROPERTIES), ("off", 1, _table(b, []))])


def _labels_file(b: flatbuffers.Builder) -> int:
    name, text = b.CreateString(LABELS_FILE), b.CreateString("The class of each output index.")
    return _table(b, [("off", 0, name), ("off", 1, text), ("i8", 2, _TENSOR_AXIS_LABELS)])


def _tensor(b, name, description, content=None, process_units=None, stats=None, files=None):
    """A TensorMetadata: name 0, description 1, dimension_names 2, content 3,
    process_units 4, stats 5, associated_files 6."""
    return _table(
        b,
        [
            ("off", 0, _string(b, name)),
            ("off", 1, _string(b, description)),
            ("off", 3, content),
            ("off", 4, process_units),
            ("off", 5, stats),
            ("off", 6, files),
        ],
    )


def normalization(record: dict) -> tuple[list[float], list[float]]:
    """Mean and std in the convention the tasks apply: (pixel in [0, 255] - mean) / std."""
    if record.get("normalize_inside"):
        return [0.0], [255.0]
    return [255.0 * m for m in record["mean"]], [255.0 * s for s in record["std"]]


def _input(b: flatbuffers.Builder, record: dict) -> int:
    mean, std = normalization(record)
    options = _table(b, [("off", 0, _floats(b, mean)), ("off", 1, _floats(b, std))])
    unit = _table(b, [("i8", 0, _NORMALIZATION_OPTIONS), ("off", 1, options)])
    lows = [(0.0 - m) / s for m, s in zip(mean, std, strict=True)]
    highs = [(255.0 - m) / s for m, s in zip(mean, std, strict=True)]
    stats = _table(b, [("off", 0, _floats(b, highs)), ("off", 1, _floats(b, lows))])
    hw = _input_hw(record)
    return _tensor(
        b,
        record.get("input_name", "input"),
        _input_description(record),
        _image_content(b, _RGB, hw),
        _offsets(b, [unit]),
        stats,
    )


def _input_hw(record: dict) -> tuple[int, int] | None:
    shape = record["input_shape"]
    hw = shape[1:3] if record.get("input_layout") == "NHWC" else shape[2:4]
    return tuple(hw) if all(isinstance(d, int) for d in hw) else None


def _input_description(record: dict) -> str:
    layout = record.get("input_layout", "NCHW")
    inside = (
        "normalised inside the file"
        if record.get("normalize_inside")
        else (f"then (x - {record['mean']}) / {record['std']} per channel, by the app")
    )
    return f"float32 {layout} RGB in [0, 1], {inside}."


def _output(b: flatbuffers.Builder, record: dict, name: str, position: int) -> int:
    task = record["task"]
    described = {o["name"]: o for o in record.get("outputs", [])}.get(name, {})
    meaning = described.get("meaning") or ", ".join(
        f"{k} {v}" for k, v in described.items() if k != "name"
    )
    if task in ("classification", "segmentation"):
        # A segmenter's map is an image of class scores; a classifier's a feature vector.
        content = (
            _feature_content(b) if task == "classification" else _image_content(b, _GRAYSCALE, None)
        )
        return _tensor(b, name, meaning, content, files=_offsets(b, [_labels_file(b)]))
    return _tensor(b, name, meaning or f"output {position}", _feature_content(b))


def _segmenter_options(b: flatbuffers.Builder) -> int:
    """A CustomMetadata (name 0, data 1) holding the segmenter's ImageSegmenterOptions
    (activation 0): softmax over the class logits."""
    inner = flatbuffers.Builder(32)
    inner.Finish(_table(inner, [("i8", 0, _SOFTMAX)]), _SEGMENTER_IDENTIFIER)
    data = bytes(inner.Output())
    b.StartVector(1, len(data), 16)  # the schema forces 16-byte alignment on `data`
    for byte in reversed(data):
        b.PrependUint8(byte)
    vector = b.EndVector()
    return _table(b, [("off", 0, b.CreateString(_SEGMENTER_NAME)), ("off", 1, vector)])


def _precision_note(record: dict) -> str:
    precision = record["precision"]
    if precision == "fp32":
        return "float32 throughout"
    inside = {"fp16": "float16 weights", "int8": "int8 weights and activations"}[precision]
    return f"{inside} inside; float32 input and output"


def model_metadata(record: dict, output_order: list[str]) -> bytes:
    """The ModelMetadata flatbuffer for the file the record describes, its outputs in
    the order of the subgraph's output tensors (`output_order`, by signature name)."""
    b = flatbuffers.Builder(1024)
    segmenter = record["task"] == "segmentation"
    outputs = [_output(b, record, name, i) for i, name in enumerate(output_order)]
    inputs = [_input(b, record)]
    custom = _offsets(b, [_segmenter_options(b)]) if segmenter else None
    subgraph = _table(
        b,
        [
            ("off", 0, b.CreateString(record["model"])),
            ("off", 2, _offsets(b, inputs)),
            ("off", 3, _offsets(b, outputs)),
            ("off", 9, custom),
        ],
    )
    description = (
        f"{record['model']} ({record['family']}, {record['task']}), {record['precision']} "
        f"({_precision_note(record)}); weights: {record['weights']}. Exported by mobilevit_deploy."
    )
    version = (record.get("tool_versions") or {}).get("mobilevit_deploy") or "unknown"
    root = _table(
        b,
        [
            ("off", 0, b.CreateString(record["model"])),
            ("off", 1, b.CreateString(description)),
            ("off", 2, b.CreateString(version)),
            ("off", 3, _offsets(b, [subgraph])),
            ("off", 4, b.CreateString("mobilevit_deploy")),
            ("off", 7, b.CreateString(_PARSER_VERSION[segmenter])),
        ],
    )
    b.Finish(root, _IDENTIFIER)
    return bytes(b.Output())


def labels_text(record: dict) -> bytes | None:
    """One class per line (the names, or the class indices where the model has none);
    None for outputs that are not classes."""
    if record["task"] not in ("classification", "segmentation"):
        return None
    names = record.get("class_labels") or [str(i) for i in range(record["num_classes"])]
    return "".join(f"{name}\n" for name in names).encode()


def with_associated_files(model: bytes, files: dict[str, bytes]) -> bytes:
    """The flatbuffer with the files appended as a zip archive, as the metadata
    populator appends them (zipfile in append mode after the model's bytes)."""
    if not files:
        return model
    buffer = io.BytesIO(model)
    buffer.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buffer, "a") as archive:
        for name, data in sorted(files.items()):
            # A fixed date: the same export twice gives the same bytes.
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()
