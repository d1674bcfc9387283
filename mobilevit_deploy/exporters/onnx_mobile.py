"""ONNX Runtime Mobile: onnxruntime's own verdict on an ONNX file, and its ORT-format file.

ONNX Runtime Mobile runs a file on the CPU EP, or hands supported parts to the NNAPI EP
(Android) and the CoreML EP (iOS, NeuralNetwork or MLProgram). Every partition is a
device copy, so a graph split into many is slower there than on the CPU. onnxruntime
ships the check it recommends (`python -m onnxruntime.tools.check_onnx_model_mobile_usability`):
optimise to the BASIC level, infer shapes, and partition the graph against each EP's
list of supported ops. `mobile_usability` calls the functions under that script and
keeps their numbers, so the record says what the script would print, per EP: nodes,
supported nodes, partitions, the ops it does not take by name, and its verdict.

The ORT format is what a reduced (minimal) build of ONNX Runtime loads, with the
required-operators config that builds it (`onnxruntime.tools.convert_onnx_models_to_ort`,
fixed optimisations at its default level, for ARM: int8 QDQ kept as int8).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..quiet import quiet

# The EPs onnxruntime's script checks, with the supported-ops list each is checked against
# (None: NNAPI's own function knows its list).
_EPS = {
    "NNAPI": None,
    "CoreML NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
    "CoreML MLProgram": "coreml_supported_mlprogram_ops.md",
}


def mobile_usability(path: Path) -> dict[str, dict]:
    """onnxruntime's mobile-usability numbers for the file, per EP."""
    from onnxruntime.tools.mobile_helpers import usability_checker as checker
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    logging.getLogger("usability_checker").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "basic.onnx"
        optimize_model(Path(path), optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    found = {}
    for ep, supported in _EPS.items():
        if supported is None:
            info = checker.check_nnapi_partitions(model, require_fixed_input_sizes=True)
        else:
            info = checker.check_coreml_partitions(model, True, supported)
        found[ep] = {
            "nodes": info.num_nodes,
            "supported_nodes": info.num_supported_nodes,
            "partitions": info.num_partitions,
            "unsupported_ops": sorted(info.unsupported_ops),
            "unsupported_for_rank": sorted(info.ops_with_unsupported_rank),
            "dynamic_shape_nodes": info.nodes_unsupported_due_to_dynamic_input,
            "verdict": info.suitability().name,  # YES, MAYBE or NO, as the script says
        }
    return found


def describe(found: dict[str, dict]) -> list[str]:
    """One line per EP for the export notes and verify's report."""
    lines = []
    for ep, got in found.items():
        why = []
        if got["unsupported_ops"]:
            why.append("unsupported: " + ", ".join(got["unsupported_ops"]))
        if got["unsupported_for_rank"]:
            why.append("above its rank: " + ", ".join(got["unsupported_for_rank"]))
        if got["dynamic_shape_nodes"]:
            why.append(f"{got['dynamic_shape_nodes']} nodes with dynamic shapes")
        advice = {"YES": "recommended", "MAYBE": "worth measuring", "NO": "use the CPU EP"}
        lines.append(
            f"ONNX Runtime Mobile {ep} EP: {got['supported_nodes']} of {got['nodes']} nodes in "
            f"{got['partitions']} partition{'s' if got['partitions'] != 1 else ''}"
            + (f" ({'; '.join(why)})" if why else "")
            + f": {advice[got['verdict']]} (onnxruntime's verdict {got['verdict']})"
        )
    return lines


def convert_to_ort(onnx_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """The ORT-format file and its required-operators config, written into `out_dir`
    as `<stem>.ort` and `<stem>.required_operators.config` (the tool's names)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    with quiet():  # it prints and logs each step
        convert_onnx_models_to_ort(
            Path(onnx_path),
            output_dir=Path(out_dir),
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform="arm",
        )
    stem = Path(onnx_path).stem
    return Path(out_dir) / f"{stem}.ort", Path(out_dir) / f"{stem}.required_operators.config"
