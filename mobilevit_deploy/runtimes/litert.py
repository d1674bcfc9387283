"""Run a .tflite file with the LiteRT interpreter (XNNPACK on CPU): NCHW numpy in and out.

The caller always speaks normalised NCHW, like every other runner: a channels-last file
(the default; recorded in its metadata) gets its input transposed here and image-shaped
outputs transposed back, and a file with the normalisation inside (the default) gets
RGB in [0, 1] back from the caller's (x - mean) / std. int8 inputs or outputs, if a file
has them, are quantized and dequantized with the file's own scale and zero point.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..quiet import quiet

# The name of the metadata entry the exporter embeds the record under.
METADATA_NAME = "mvd"


def read_metadata(path: Path) -> dict:
    """The metadata record embedded in an exported .tflite file ({} without one)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(bytearray(Path(path).read_bytes()), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()))
    return {}


def _tensor_info(tensor, types: dict[int, str], name: str) -> dict:
    """A tensor's name, shape (None where the signature leaves a dimension free) and dtype."""
    shape = [int(d) for d in tensor.ShapeAsNumpy()]
    signature = tensor.ShapeSignatureAsNumpy()  # 0 when the file has none
    if not isinstance(signature, int) and len(signature) == len(shape):
        shape = [None if int(free) < 0 else d for d, free in zip(shape, signature, strict=True)]
    return {"name": name, "shape": shape, "dtype": types[tensor.Type()].lower()}


def _precision(model, graph, types: dict[int, str]) -> tuple[str, str, dict]:
    """The precision the weights are stored in, the evidence in words, and for int8 the
    mode: static when activations are int8 too, dynamic when the weights alone are."""
    kinds = set()
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        buffer = model.Buffers(tensor.Buffer())
        constant = buffer.DataLength() > 0 or buffer.Offset() > 1  # offset 1: none (schema)
        kinds.add((types[tensor.Type()], constant))
    if ("INT8", False) in kinds or ("UINT8", False) in kinds:
        return "int8", "int8 activations and weights", {"int8_mode": "static"}
    if ("INT8", True) in kinds:
        return "int8", "int8 weights, float activations", {"int8_mode": "dynamic"}
    if ("FLOAT16", True) in kinds:
        return "fp16", "float16 weights", {}
    return "fp32", "float32 weights", {}


def file_facts(path: Path) -> dict:
    """The first subgraph's input and outputs, named as its signature names them (the
    names an app binds), and the precision of its weights (records.file_facts)."""
    from ai_edge_litert import schema_py_generated as schema

    from ..records import single_input

    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(bytearray(Path(path).read_bytes()), 0)
    graph = model.Subgraphs(0)
    names = {}
    if model.SignatureDefsLength() == 1:
        signature = model.SignatureDefs(0)
        entries = [signature.Inputs(i) for i in range(signature.InputsLength())]
        entries += [signature.Outputs(i) for i in range(signature.OutputsLength())]
        names = {entry.TensorIndex(): entry.Name().decode() for entry in entries}

    def info(index: int) -> dict:
        tensor = graph.Tensors(index)
        return _tensor_info(tensor, types, names.get(index, tensor.Name().decode()))

    inputs = [info(graph.Inputs(i)) for i in range(graph.InputsLength())]
    single_input(path, [i["name"] for i in inputs])
    precision, evidence, details = _precision(model, graph, types)
    return {
        "input_name": inputs[0]["name"],
        "input_shape": inputs[0]["shape"],
        "input_dtype": inputs[0]["dtype"],
        "outputs": [info(graph.Outputs(i)) for i in range(graph.OutputsLength())],
        "precision": precision,
        "precision_evidence": evidence,
        "details": details,
    }


def pixels(x: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """Normalised NCHW input back to RGB in [0, 1]: what a file with the normalisation
    inside takes."""
    mean_, std_ = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    return (x * std_ + mean_).astype(np.float32)


class LiteRTRunner:
    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        with quiet():
            from ai_edge_litert.interpreter import Interpreter

        from ..records import layout_of

        path = Path(path)
        # The file alone: its embedded record, or for a file another tool made ({}), the
        # layout its input's shape implies.
        meta = read_metadata(path)
        with quiet():  # the XNNPACK banner is printed from C++ when tensors are allocated
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self._output_order(meta.get("output_names"))
        layout = meta.get("input_layout") or layout_of([int(d) for d in self.input["shape"]])
        self.nhwc = layout == "NHWC"
        # A file with the normalisation inside takes RGB in [0, 1]; the caller speaks
        # normalised input, as to every runner.
        self.normalization = (meta["mean"], meta["std"]) if meta.get("normalize_inside") else None
        self.options = {"num_threads": threads or 0, "delegate": "XNNPACK (default CPU)"}

    def _output_order(self, names: list[str] | None) -> list[int]:
        """Output tensor indices in the model's order: the signature's outputs are named
        as the record lists them (`output`, `stage<i>`); the plain output list need not
        keep that order. Without a record, the file's own order."""
        signatures = self.interpreter._get_full_signature_list()
        outputs = next(iter(signatures.values()))["outputs"] if len(signatures) == 1 else {}
        if names and set(names) <= set(outputs):
            return [outputs[name] for name in names]
        return [d["index"] for d in self.interpreter.get_output_details()]

    def _feed(self, x: np.ndarray) -> None:
        if self.normalization is not None:
            x = pixels(x, *self.normalization)
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        if tuple(x.shape) != tuple(self.input["shape"]):
            self.interpreter.resize_tensor_input(self.input["index"], list(x.shape))
            with quiet():
                self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
        if self.input["dtype"] != np.float32:
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.interpreter.set_tensor(
            self.input["index"], np.ascontiguousarray(x, self.input["dtype"])
        )

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output, or a tuple of them in the model's order (feature maps)."""
        self._feed(x)
        self.interpreter.invoke()
        details = {d["index"]: d for d in self.interpreter.get_output_details()}
        outs = tuple(self._read(details[index]) for index in self.outputs)
        return outs[0] if len(outs) == 1 else outs

    def _read(self, detail: dict) -> np.ndarray:
        out = self.interpreter.get_tensor(detail["index"])
        if detail["dtype"] != np.float32:
            scale, zero = detail["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out.transpose(0, 3, 1, 2) if self.nhwc and out.ndim == 4 else out
