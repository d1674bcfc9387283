"""Run an ONNX file with onnxruntime on CPU: numpy in, numpy out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtRunner:
    """One inference session. `level="all"` is what a deployment would use; note that
    it fuses Conv+BN on its own, so speed-ups must be measured against it."""

    def __init__(
        self,
        path: Path | str,
        threads: int | None = None,
        level: str = "all",
        spinning: bool = True,
    ) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = LEVELS[level]
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle worker threads spin by default; where several sessions take turns (the
        # interleaved benchmark) the spinning of one steals cores from the next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.options = {
            "graph_optimization_level": level,
            "intra_op_num_threads": threads or 0,
            "allow_spinning": spinning,
        }
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output, or a tuple of them in graph order (feature maps)."""
        outputs = self.session.run(None, {self.input_name: x})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# Ops that only a quantized graph has: QDQ pairs, and the integer ops of QOperator graphs.
_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}


def _load_graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def read_record(path: Path) -> dict:
    """mvd's record embedded in an .onnx file, {} for one another tool wrote: any
    exporter may fill metadata_props, so the record counts only under mvd's producer."""
    from ..records import decoded

    graph = _load_graph(path)
    if graph.producer_name != "mobilevit_deploy":
        return {}
    return decoded({entry.key: entry.value for entry in graph.metadata_props})


def _value_info(value) -> dict:
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "shape": shape, "dtype": dtype}


def _precision(graph) -> tuple[str, str]:
    """The precision the weights are stored in, and the evidence, in words."""
    import onnx

    weights = list(graph.graph.initializer) + [
        attribute.t
        for node in graph.graph.node
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.name == "value"
    ]
    kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in weights}
    quantizing = sorted({n.op_type for n in graph.graph.node} & _INT8_OPS)
    if quantizing:
        return "int8", f"{', '.join(quantizing)} nodes"
    if kinds & {"INT8", "UINT8"}:
        return "int8", "int8 weights"
    if "FLOAT16" in kinds:
        return "fp16", "float16 weights"
    return "fp32", "float32 weights"


def file_facts(path: Path) -> dict:
    """The graph's input and outputs (a dynamic dimension by its name) and the precision
    of its weights (records.file_facts)."""
    from ..records import single_input

    graph = _load_graph(path)
    stored = {t.name for t in graph.graph.initializer}  # old IRs list weights as inputs
    inputs = [_value_info(v) for v in graph.graph.input if v.name not in stored]
    single_input(path, [i["name"] for i in inputs])
    precision, evidence = _precision(graph)
    return {
        "input_name": inputs[0]["name"],
        "input_shape": inputs[0]["shape"],
        "input_dtype": inputs[0]["dtype"],
        "outputs": [_value_info(v) for v in graph.graph.output],
        "precision": precision,
        "precision_evidence": evidence,
    }
