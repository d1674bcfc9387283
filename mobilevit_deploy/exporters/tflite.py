"""TFLite export: torch -> .tflite through litert-torch, quantized with ai-edge-quantizer.

litert-torch lowers a `torch.export` graph to TFLite ops (no ONNX or TensorFlow step).
Precisions are derived from the fp32 flatbuffer: fp16 stores weights as float16 (half
the file; the runtime computes in fp32, or fp16 where a GPU delegate does); int8 is
full-integer static quantization (int8 weights per channel and int8 activations,
calibrated on natural-looking images) or, with `int8_mode="dynamic"`, dynamic-range
quantization (int8 weights, activations quantized on the fly) for models whose
activations do not survive a static range. Every precision keeps float32 input and
output (a QUANTIZE/DEQUANTIZE pair at the edges), so a file is a drop-in replacement
for the fp32 one: the app's pre- and post-processing do not change with the precision.

After writing, the flatbuffer is inspected: its op set is recorded in the metadata, and
what mobile GPU/NNAPI delegates lack (tensors above rank 4, gathers, bicubic resize,
custom and Flex ops) is reported by name. The metadata record is embedded as the
model's metadata entry `mvd` (JSON), as well as in the sidecar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportFailed, one_line
from ..files import atomic_artifact
from ..quiet import quiet
from ..runtimes.litert import METADATA_NAME, pixels
from . import ExportJob, float_modules, module_outputs, tflite_metadata, writers
from .formats import FORMATS
from .metadata import ArtifactMetadata

DELEGATE_UNFRIENDLY = {"GATHER", "GATHER_ND", "RESIZE_BICUBIC"}
NORMALIZED_INSIDE = "RGB in [0, 1]; (x - mean) / std is inside the file"


class ConversionFailed(ExportFailed):
    """litert-torch could not lower the model; the message names the op where it can."""


def _channels_last(model: nn.Module, example: np.ndarray) -> tuple[nn.Module, bool]:
    """NHWC in, and NHWC out where an output is image-shaped (a segmenter's map, feature
    maps): the layout mobile apps feed and read. A classifier's (N, classes) stays."""
    import litert_torch

    with torch.no_grad():
        out = model(torch.from_numpy(example))
    outs = out if isinstance(out, tuple) else (out,)
    maps = [i for i, o in enumerate(outs) if o.dim() == 4]
    wrapped = litert_torch.to_channel_last_io(model, args=[0], outputs=maps)
    return wrapped, bool(maps)


class _Normalized(nn.Module):
    """Takes RGB in [0, 1] and applies the model's (x - mean) / std itself: MediaPipe
    normalises with one mean and std for all channels, so a per-channel one must be
    in the file (two elementwise ops on the input, which XNNPACK runs)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer(
            "inv_std", (1 / torch.tensor(std, dtype=torch.float64)).float().reshape(1, -1, 1, 1)
        )

    def forward(self, x: torch.Tensor):
        return self.model((x - self.mean) * self.inv_std)


class _NamedOutputs(nn.Module):
    """Returns a dict, which litert-torch turns into the signature's output names: the
    file's outputs are `output` or `stage<i>`, as in ONNX and CoreML."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        outs = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.names, outs, strict=True))


def _convert_fp32(model: nn.Module, example: np.ndarray, path: Path) -> None:
    import litert_torch

    try:
        with quiet():
            edge = litert_torch.convert(model.eval(), (torch.from_numpy(example),))
            edge.export(str(path))
    except Exception as exc:  # the converter raises many types; the op name is the news
        raise ConversionFailed(f"litert-torch could not convert the model: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    """One line: the torch op the converter stopped at, when its message names one."""
    text = str(exc).strip()
    first = one_line(text) if text else type(exc).__name__
    op = re.search(r"\baten\.[A-Za-z0-9_]+", text)
    if op is None or op.group(0) in first:
        return first
    return f"op {op.group(0)}: {first}"


def _signature(path: Path) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        signatures = Interpreter(model_path=str(path)).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"][0]


def _class_level(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}_"


# The op that writes a graph output is named after the signature's output, not its
# module ("serving_default_output_output"): the head's last Linear in a classifier.
SIGNATURE_OUTPUT = "^serving_default_"


def float_patterns(model: nn.Module, paths: list[str], example: np.ndarray) -> list[str]:
    """Recipe regexes for the tensors of the modules kept float. litert-torch names each
    tensor by its module chain, one "<module>.<Class>_<attribute>" per level (none for a
    ModuleList or ModuleDict: EfficientViT's `op_list` child "0" is "ConvLayer_0"), ending
    in ";", so a kept module is matched by its chain below the model's own level (whatever
    wraps it) ending there: its own ops, not its children's (int8_search.rank_modules).
    A class that declares float is matched by its one level, with all below it; a kept
    module whose own op writes a graph output also by the signature's name for it
    (SIGNATURE_OUTPUT). Only modules whose forward ran have a level (called_modules)."""
    declared = sorted({type(m) for _, m in float_modules(model)}, key=str)
    patterns = [f".*{re.escape(_class_level(cls))}.*" for cls in declared]
    returned, out = module_outputs(model, example) if paths else ([], None)
    called = {path for path, _ in returned}
    for path in paths:
        levels, module, prefix = [], model, ""
        for part in path.split("."):
            module = module.get_submodule(part)
            prefix = f"{prefix}.{part}" if prefix else part
            # A module whose forward did not run has no level (a ModuleList never runs).
            if prefix in called:
                levels.append(_class_level(type(module)) + part)
        root = re.escape(_class_level(type(model)))
        patterns.append(f".*{root}[^/]*/{re.escape('/'.join(levels))}(;|$).*")
    if paths and writers(returned, out) & set(paths):
        patterns.append(SIGNATURE_OUTPUT)
    return patterns


def _quantize(
    fp32: Path, out: Path, precision: str, int8_mode: str, calibration, keep_float=()
) -> None:
    """`keep_float`: regexes (float_patterns) of the tensors whose ops stay float in int8
    (static: weights and activations; dynamic: the weights, the rest being float)."""
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    q = quantizer.Quantizer(str(fp32))
    if precision == "fp16":
        q.add_weight_only_config(
            regex=".*",
            operation_name=TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
    elif int8_mode == "dynamic":
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        q.load_quantization_recipe(recipe.static_wi8_ai8())
        # float32 I/O; and DIV stays float: an int8 divisor that rounds to its zero point
        # stops the interpreter (EfficientViT's attention normaliser did, at run time).
        for op in (TFLOperationName.INPUT, TFLOperationName.OUTPUT, TFLOperationName.DIV):
            q.update_quantization_recipe(".*", op, algorithm_key=AlgorithmName.NO_QUANTIZE)
        # The op that writes the output keeps it float (int8 weights, its input
        # quantized at run time), as ONNX int8 outputs are: an int8 output stops at the
        # largest value calibration saw, and a classifier's top logit is where a new
        # image goes past it (stressed LeViT-128S lost a decisive top-1 that way).
        q.add_dynamic_config(SIGNATURE_OUTPUT, TFLOperationName.ALL_SUPPORTED, num_bits=8)
    if precision == "int8" and keep_float:  # static or dynamic: their weights stay float too
        # One recipe entry for all of them: the recipe manager re.search-es every op's
        # name with every entry at each calibration sample, and 41 entries took
        # EfficientViT-B1's calibration from 4 s to 86 s (the int8 search's TFLite steps
        # keep dozens). Their ".*" ends, which a search does not need, backtrack.
        q.update_quantization_recipe(
            "|".join(f"(?:{_searched(pattern)})" for pattern in keep_float),
            TFLOperationName.ALL_SUPPORTED,
            algorithm_key=AlgorithmName.NO_QUANTIZE,
        )
    calibration_result = None
    if q.need_calibration:
        key, name = _signature(fp32)
        samples = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
        with quiet(), warnings.catch_warnings():  # its own debug-mode interpreter warns
            warnings.simplefilter("ignore")
            calibration_result = _quantizer_step(q.calibrate, {key: samples})
        if not calibration_result:  # every op it would calibrate is kept float
            out.write_bytes(fp32.read_bytes())
            return
    with quiet(), _large_weights_in_slices():
        result = _quantizer_step(q.quantize, calibration_result)
    out.write_bytes(result.quantized_model)


# ai-edge-quantizer quantizes a tensor above 32 MiB in chunks, and there it broadcasts
# per-channel scales of shape (O, 1, 1, 1) to the tensor flattened to 2-D, which
# fails ("input operand has more dimensions than allowed by the axis remapping";
# google-ai-edge/ai-edge-quantizer#512, open in 0.10.0). EfficientViT-L3's largest
# 1x1 convolution is such a weight, so its int8 export failed.
_CHUNKED_BYTES = 32 * 1024 * 1024


@contextlib.contextmanager
def _large_weights_in_slices():
    """While open, a tensor above the threshold is quantized in slices along its first
    axis, each below it, with the scales of its rows: the library's own per-element
    arithmetic, on the path that broadcasts correctly."""
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    original = uqt.uniform_quantize

    def sliced(tensor, params, is_blockwise_quant=False):
        if is_blockwise_quant or tensor.ndim < 2 or tensor.nbytes <= _CHUNKED_BYTES:
            return original(tensor, params, is_blockwise_quant)
        params = uqt.fix_quantization_params_rank(tensor, params)
        step = max(1, _CHUNKED_BYTES // tensor[0].nbytes)

        def rows(values, i):
            return values[i : i + step] if values.shape[0] == len(tensor) else values

        return np.concatenate(
            [
                original(
                    tensor[i : i + step],
                    dataclasses.replace(
                        params, scale=rows(params.scale, i), zero_point=rows(params.zero_point, i)
                    ),
                )
                for i in range(0, len(tensor), step)
            ]
        )

    uqt.uniform_quantize = sliced
    try:
        yield
    finally:
        uqt.uniform_quantize = original


def _quantizer_step(step, *args):
    """A step of ai-edge-quantizer, whose failures are an export error that names the
    cause (the int8 search counts a step that fails so as a miss)."""
    try:
        return step(*args)
    except Exception as exc:  # it raises many types; the cause is at its message's end
        raise ConversionFailed(
            f"ai-edge-quantizer could not quantize the model: {_reason(exc)}"
        ) from exc


def _searched(pattern: str) -> str:
    """A float_patterns regex for re.search, which matches anywhere: without its ".*" ends."""
    return pattern.removeprefix(".*").removesuffix(".*")


def _rank_warnings(interpreter) -> list[str]:
    """Tensors above rank 4, named by the ops that make or take them."""
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    found: dict[tuple[str, int], list[str]] = defaultdict(list)
    for op in interpreter._get_ops_details():
        for index in [*op["outputs"], *op["inputs"]]:
            tensor = tensors.get(int(index))
            if tensor is not None and len(tensor["shape"]) > 4:
                found[op["op_name"], len(tensor["shape"])].append(tensor["name"])
    return [
        f"op {op} has tensors of rank {rank} ({names[0]}"
        + (f" and {len(set(names)) - 1} more" if len(set(names)) > 1 else "")
        + "): mobile GPU/NNAPI delegates take rank <= 4"
        for (op, rank), names in sorted(found.items())
    ]


def inspect_tflite(path: Path) -> dict:
    """Op names, I/O details, and what mobile delegates would refuse, by name."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        interpreter = Interpreter(model_path=str(path))
    ops = sorted({op["op_name"] for op in interpreter._get_ops_details()})
    notes = [
        f"op {op}: mobile GPU/NNAPI delegates lack it (it falls back to the CPU)"
        for op in ops
        if op in DELEGATE_UNFRIENDLY or op.startswith(("Flex", "CUSTOM"))
    ]
    notes += _rank_warnings(interpreter)
    detail = interpreter.get_input_details()[0]
    return {
        "tflite_ops": ops,
        "delegate_report": notes,
        "input_details": {"shape": detail["shape"].tolist(), "dtype": detail["dtype"].__name__},
    }


def embed_metadata(path: Path, metadata: dict) -> None:
    """Write the record as the model's metadata entry `mvd`, and the standard TFLite
    Metadata that MediaPipe and the Task Library read (tflite_metadata.py) as the entry
    `TFLITE_METADATA` with its labels file appended, replacing any there (the int8
    search's chosen file). This is how TFLite's own metadata writer (tflite_support)
    and ai-edge-quantizer write files: unpack the model object, append, pack it again;
    the interpreter ignores entries it does not know, so the file runs as before."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    record = json.dumps(metadata, sort_keys=True).encode()
    _set_entry(model, METADATA_NAME, record)
    standard = tflite_metadata.model_metadata(metadata, _output_order(model, metadata))
    _set_entry(model, tflite_metadata.METADATA_NAME, standard)
    data = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    labels = tflite_metadata.labels_text(metadata)
    files = {tflite_metadata.LABELS_FILE: labels} if labels is not None else {}
    path.write_bytes(tflite_metadata.with_associated_files(data, files))


def _set_entry(model, name: str, data: bytes) -> None:
    """Set the metadata entry `name` of the unpacked model to `data`."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    entries = model.metadata or []
    ours = next((e for e in entries if _decoded(e.name) == name), None)
    if ours is not None:
        model.buffers[ours.buffer] = buffer
    else:
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        model.metadata = [*entries, entry]


def _output_order(model, metadata: dict) -> list[str]:
    """The signature's output names in the order of the subgraph's output tensors,
    which the TFLite Metadata's output list follows (and need not be the record's)."""
    names = list(metadata["output_names"])
    signatures = model.signatureDefs or []
    if len(signatures) != 1:
        return names
    by_index = {t.tensorIndex: _decoded(t.name) for t in signatures[0].outputs or []}
    order = [by_index.get(int(i)) for i in model.subgraphs[0].outputs]
    return order if None not in order and sorted(order) == sorted(names) else names


def _decoded(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def export_tflite(job: ExportJob) -> ArtifactMetadata:
    """Write `job.output` (+ `.json`). The metadata record (docs/architecture.md) is
    embedded (runtimes.litert.read_metadata) and in the sidecar."""
    FORMATS["tflite"].import_backend("ai_edge_litert.interpreter", "litert_torch")

    model, example, calibration = job.model, job.example, job.calibration
    precision, options, metadata = job.precision, job.options, job.metadata
    details: dict = {"normalize_inside": options.normalize_inside}
    if options.normalize_inside:
        model = _Normalized(model.eval(), metadata.mean, metadata.std)
        example = pixels(example, metadata.mean, metadata.std)
        if calibration is not None:
            calibration = pixels(calibration, metadata.mean, metadata.std)
        metadata = dataclasses.replace(metadata, input_range=NORMALIZED_INSIDE)
    if options.nhwc:
        model, image_out = _channels_last(model.eval(), example)
        example = np.ascontiguousarray(example.transpose(0, 2, 3, 1))
        metadata = dataclasses.replace(
            metadata, input_layout="NHWC", input_shape=[int(d) for d in example.shape]
        )
        details["output_layout"] = "NHWC" if image_out else "NC"
    model = _NamedOutputs(model, metadata.output_names)
    if precision == "int8":
        details["int8_mode"] = options.int8_mode
        if options.nhwc:
            calibration = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1))
    with atomic_artifact(job.output) as staged:
        tmp = staged.path
        if precision == "fp32":
            _convert_fp32(model, example, tmp)
        else:
            shared = job.scratch is not None
            fp32 = job.scratch / "fp32.tflite" if shared else tmp.with_name(tmp.name + ".fp32")
            try:
                if not (shared and fp32.exists()):
                    _convert_fp32(model, example, fp32)
                patterns = float_patterns(job.model, list(job.keep_float), job.example)
                _quantize(fp32, tmp, precision, options.int8_mode, calibration, patterns)
            finally:
                if not shared:
                    fp32.unlink(missing_ok=True)
        found = inspect_tflite(tmp)
        report = found.pop("delegate_report")
        details.update(found)
        metadata = dataclasses.replace(
            metadata, delegate_report=report, details={**metadata.details, **details}
        )
        staged.record = metadata.to_dict()
        embed_metadata(tmp, staged.record)
    return metadata
