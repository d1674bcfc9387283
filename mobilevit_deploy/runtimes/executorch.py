"""Run a .pte with ExecuTorch's Python runtime (XNNPACK where delegated): numpy in and out.

`executorch.runtime` loads the program as an app's C++ runtime would. The XNNPACK
delegate runs on ExecuTorch's own thread pool, one per process: `threads` resets it
(an experimental call of its bindings), so the last runner opened sets it for all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..quiet import quiet

# The constant method the exporter embeds the record as.
METADATA_METHOD = "mvd_metadata"


def _runtime():
    with quiet():  # the bindings import torchao and warn that they are experimental
        from executorch.runtime import Runtime

        return Runtime.get()


def read_metadata(path: Path) -> dict:
    """The record embedded in an exported .pte ({} without one)."""
    with quiet():  # a damaged file is also logged from C++; the error says it in one line
        program = _runtime().load_program(Path(path))
    if METADATA_METHOD not in program.method_names:
        return {}
    return json.loads(program.load_method(METADATA_METHOD).execute([])[0])


# c10::ScalarType codes, which the runtime's tensor info reports (ExecuTorch's
# scalar_type.h), by numpy's names.
_SCALAR_TYPES = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "int64",
    5: "float16",
    6: "float32",
    7: "float64",
    11: "bool",
    15: "bfloat16",
}


def _tensor_info(meta) -> dict:
    """A tensor of the method's signature: .pte files name none of them."""
    shape = [int(d) for d in meta.sizes()]
    return {"name": None, "shape": shape, "dtype": _SCALAR_TYPES.get(meta.dtype(), "unknown")}


def _xnnpack_values(payload: bytes) -> list[dict]:
    """The values of an XNNPACK delegate's graph (its flatbuffer after XNNPACK's header),
    read through executorch's own schema and flatc."""
    import re
    import tempfile
    from importlib import resources

    from executorch.backends.xnnpack import serialization
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(payload[: XNNHeader.EXPECTED_LENGTH])
    start = header.flatbuffer_offset
    with tempfile.TemporaryDirectory() as folder:
        schema, binary = Path(folder, "schema.fbs"), Path(folder, "graph.bin")
        schema.write_bytes(resources.files(serialization).joinpath("schema.fbs").read_bytes())
        binary.write_bytes(payload[start : start + header.flatbuffer_size])
        _flatc_decompile(folder, str(schema), str(binary), ["--raw-binary"])
        text = Path(folder, "graph.json").read_text()
    # flatc writes infinite bounds (a ReLU's clamp) as bare inf, which JSON lacks
    text = re.sub(r"(?<=: )(-?inf)\b", r'"\1"', text)
    return json.loads(text)["xvalues"]


def _precision(path: Path) -> tuple[str, str]:
    """The precision the program computes in: its own tensors' types and those of its
    XNNPACK graphs (fp16 programs keep some weights fp32 for XNNPACK to convert, so the
    values computed on count, not the weights alone)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    with quiet():
        program = deserialize_pte_binary(Path(path).read_bytes()).program
    kinds = {
        getattr(v.val, "scalar_type", None) and v.val.scalar_type.name
        for plan in program.execution_plan
        for v in plan.values
    }
    operators = {op.name for plan in program.execution_plan for op in plan.operators}
    for delegate in program.backend_delegate_data:
        if delegate.data[4:8] == b"XH00":  # XNNPACK's header (XNNHeader.EXPECTED_MAGIC)
            for value in _xnnpack_values(delegate.data):
                tensor = value["xvalue_union"].get("tensor_value", value["xvalue_union"])
                kinds.add(tensor.get("datatype"))
    if kinds & {"CHAR", "QINT8", "xnn_datatype_qint8", "xnn_datatype_qcint8"} or any(
        "quantize" in op for op in operators
    ):
        return "int8", "int8 tensors"
    if kinds & {"HALF", "xnn_datatype_fp16"}:
        return "fp16", "float16 tensors"
    return "fp32", "float32 tensors"


def file_facts(path: Path) -> dict:
    """The forward method's input and outputs as the runtime reports them (unnamed:
    a program names no tensors) and the precision it computes in (records.file_facts)."""
    from ..records import single_input

    with quiet():
        meta = _runtime().load_program(Path(path)).load_method("forward").metadata
    inputs = [_tensor_info(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]
    single_input(path, [f"input {i}" for i in range(len(inputs))])
    precision, evidence = _precision(path)
    return {
        "input_name": None,
        "input_shape": inputs[0]["shape"],
        "input_dtype": inputs[0]["dtype"],
        "outputs": [_tensor_info(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())],
        "precision": precision,
        "precision_evidence": evidence,
    }


class ExecuTorchRunner:
    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        import torch

        self._torch = torch
        runtime = _runtime()
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        with quiet():  # cpuinfo prints what it cannot read about the CPU, from C++
            self.method = runtime.load_program(Path(path)).load_method("forward")
        self.options = {"threads": threads or 0, "delegate": "XNNPACK"}

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output, or a tuple of them in the model's order (feature maps)."""
        outs = self.method.execute([self._torch.from_numpy(np.ascontiguousarray(x))])
        arrays = tuple(o.numpy() for o in outs)
        return arrays[0] if len(arrays) == 1 else arrays
