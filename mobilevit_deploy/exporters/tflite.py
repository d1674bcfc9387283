"""TFLite export: torch -> .tflite through litert-torch, quantized with ai-edge-quantizer.

litert-torch lowers a `torch.export` graph to TFLite ops (no ONNX or TensorFlow step).
Precisions are derived from the fp32 flatbuffer: fp16 stores weights as float16 (half
the file; the runtime computes in fp32, or fp16 where a GPU delegate does); int8 is
full-integer static quantization (int8 weights per channel and int8 activations,
calibrated on natural-looking images; int8 input and output too, with their scale and
zero point in the metadata) or, with `int8_mode="dynamic"`, dynamic-range quantization
(int8 weights, activations quantized on the fly, float32 I/O) for models whose
activations do not survive a static range.

After writing, the flatbuffer is inspected: its op set is recorded in the metadata, and
what mobile GPU/NNAPI delegates lack (tensors above rank 4, gathers, bicubic resize,
custom and Flex ops) is reported by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MvdError
from ..files import atomic_path, write_json_atomic
from ..quiet import quiet

DELEGATE_UNFRIENDLY = {"GATHER", "GATHER_ND", "RESIZE_BICUBIC"}


class ConversionFailed(MvdError):
    """litert-torch could not lower the model; the message names the op where it can."""


class _ChannelsLast(nn.Module):
    """NHWC in, and NHWC out for image-shaped outputs: the layout mobile apps feed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.permute(0, 3, 1, 2))
        return out.permute(0, 2, 3, 1) if out.dim() == 4 else out


def _convert_fp32(model: nn.Module, example: np.ndarray, path: Path) -> None:
    import litert_torch

    try:
        with quiet():
            edge = litert_torch.convert(model.eval(), (torch.from_numpy(example),))
            edge.export(str(path))
    except Exception as exc:  # the converter raises many types; the op name is the news
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionFailed(f"litert-torch could not convert the model: {first[:300]}") from exc


def _signature(path: Path) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"][0]


def _quantize(fp32: Path, out: Path, precision: str, int8_mode: str, calibration) -> None:
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
    calibration_result = None
    if q.need_calibration:
        key, name = _signature(fp32)
        samples = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
        with quiet():
            calibration_result = q.calibrate({key: samples})
    with quiet():
        result = q.quantize(calibration_result)
    out.write_bytes(result.quantized_model)


def inspect_tflite(path: Path) -> dict:
    """Op names, I/O details, and what mobile delegates would refuse, by name."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    ops = sorted({op["op_name"] for op in interpreter._get_ops_details()})
    warnings = [
        f"op {op}: mobile GPU/NNAPI delegates lack it (it falls back to the CPU)"
        for op in ops
        if op in DELEGATE_UNFRIENDLY or op.startswith(("Flex", "CUSTOM"))
    ]
    high = sorted(
        {len(t["shape"]) for t in interpreter.get_tensor_details() if len(t["shape"]) > 4}
    )
    warnings += [f"tensors of rank {rank}: mobile delegates take rank <= 4" for rank in high]
    detail = interpreter.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    return {
        "tflite_ops": ops,
        "delegate_warnings": warnings,
        "input_details": {
            "shape": detail["shape"].tolist(),
            "dtype": detail["dtype"].__name__,
            # An int8 input takes round(x / scale + zero_point) of the float input.
            "quantization": {"scale": float(scale), "zero_point": int(zero_point)},
        },
    }


def export_tflite(
    model: nn.Module,
    output: Path,
    example: np.ndarray,
    metadata: dict,
    *,
    precision: str = "fp32",
    calibration: np.ndarray | None = None,
    nhwc: bool = False,
    int8_mode: str = "static",
) -> Path:
    """Write `model` to `output` (+ `output`.json); returns the path.

    TFLite has no metadata field this stack can write without the TensorFlow metadata
    tools, so the record of DESIGN.md goes to the sidecar only.
    """
    if nhwc:
        model = _ChannelsLast(model)
        example = np.ascontiguousarray(example.transpose(0, 2, 3, 1))
        batch, channels, height, width = metadata["input_shape"]
        metadata.update(input_layout="NHWC", input_shape=[batch, height, width, channels])
        metadata["output_layout"] = "NHWC" if metadata["task"] == "segmentation" else "NC"
    if precision == "int8":
        metadata["int8_mode"] = int8_mode
        if calibration is not None and nhwc:
            calibration = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1))
    with atomic_path(output) as tmp:
        if precision == "fp32":
            _convert_fp32(model, example, tmp)
        else:
            fp32 = tmp.with_name(tmp.name + ".fp32")
            try:
                _convert_fp32(model, example, fp32)
                _quantize(fp32, tmp, precision, int8_mode, calibration)
            finally:
                fp32.unlink(missing_ok=True)
        metadata.update(inspect_tflite(tmp))
    write_json_atomic(output.with_name(output.name + ".json"), metadata)
    return output
