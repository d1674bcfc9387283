"""ONNX export: torch -> checked, simplified, re-verified .onnx with metadata.

Uses torch's TorchScript-based exporter (`dynamo=False`): for these static, CNN-like
graphs it is deterministic (byte-identical files for the same input, which CI caches
and artifact reviews rely on) and needs no onnxscript. The simplified graph is run
against the raw one before it replaces it, so a simplifier bug cannot ship. Every file's
record carries onnxruntime's own verdict for ONNX Runtime Mobile's NNAPI and CoreML EPs,
and `ort` writes the ORT-format file beside it (onnx_mobile.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import BadInput, VerificationFailed
from ..files import atomic_artifact
from ..records import decoded
from ..runtimes.onnxruntime import OrtRunner
from . import ExportJob, called_modules, float_modules
from .metadata import ArtifactMetadata
from .onnx_mobile import convert_to_ort, mobile_usability
from .onnx_mobile import describe as describe_mobile
from .onnx_precision import to_fp16, to_int8

SIMPLIFY_TOLERANCE = 1e-5


def _torch_export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    dynamic: bool,
    outputs: list[str],
):
    axes = {name: {0: "batch"} for name in ("input", *outputs)} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=outputs,
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _max_rel(a: np.ndarray | tuple, b: np.ndarray | tuple) -> float:
    """Worst error of any output, relative to that output's scale."""
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    return max(float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12)) for x, y in pairs)


def _simplify(raw_path: Path, graph: onnx.ModelProto, example: np.ndarray) -> onnx.ModelProto:
    import onnxslim

    slim = onnxslim.slim(graph)
    onnx.checker.check_model(slim, full_check=True)
    slim_path = raw_path.with_suffix(".slim")
    try:
        onnx.save(slim, str(slim_path))
        err = _max_rel(OrtRunner(raw_path)(example), OrtRunner(slim_path)(example))
    finally:
        slim_path.unlink(missing_ok=True)
    if err > SIMPLIFY_TOLERANCE:
        raise VerificationFailed(
            f"onnxslim changed the model's output by {err:.2e} of its scale; "
            "export again with --no-simplify"
        )
    return slim


def node_scope(path: str, called: set[str]) -> str:
    """The prefix torch.onnx gives the nodes of the module at `path`: one level per
    module whose forward ran (`called`, exporters.called_modules; a ModuleList or
    ModuleDict never runs one, so it has none), and an index named after its parent,
    "<parent>.<index>": "backbone.stages.2.op_list.1.main" ->
    "/backbone/stages.2/op_list.1/main/" (two ModuleLists), "stem.0.act" ->
    "/stem/stem.0/act/" (a Sequential, which runs, so it has its own level too); in
    EfficientViT-Seg, whose backbone's forward does not run, "/stages.2/op_list.1/main/"."""
    levels, parent, prefix = [], "", ""
    for part in path.split("."):
        prefix = f"{prefix}.{part}" if prefix else part
        name = f"{parent}.{part}" if part.isdigit() and parent else part
        if prefix in called:
            levels.append(name)
        parent = name
    return "/" + "/".join(levels) + "/"


def owner_scopes(model: nn.Module, called: set[str]) -> list[tuple[str, str]]:
    """(node-name scope, module path) of every module that can own a node, deepest
    scopes first, for node_owner: a module whose forward ran (`called`). A ModuleList
    or ModuleDict runs none, and the model itself is not a candidate: a top-level scope
    ("/") would own every node outside the modules."""
    scopes = [
        (node_scope(path, called), path) for path, _ in model.named_modules() if path in called
    ]
    return sorted(scopes, key=lambda pair: -len(pair[0]))


def declared_scopes(model: nn.Module, called: set[str]) -> tuple[str, ...]:
    """The scopes of the modules that declare float (exporters.float_modules) and ran."""
    return tuple(node_scope(p, called) for p, _ in float_modules(model) if p in called)


def node_owner(scopes: list[tuple[str, str]], name: str) -> str | None:
    """The path of the deepest module (owner_scopes) whose scope the node's name is in:
    the module whose own forward made the node."""
    return next((path for scope, path in scopes if name.startswith(scope)), None)


def export_onnx(job: ExportJob) -> ArtifactMetadata:
    """Write the model to `job.output` (+ `.json`): fp16 and int8 are derived from the
    checked fp32 graph (onnx_precision.py); int8 calibrates on `job.calibration` and
    leaves the modules that ask for it in float, and the nodes that the modules at
    `job.keep_float` own (node_owner)."""
    model, options, metadata = job.model.eval(), job.options, job.metadata
    if options.ort and job.precision == "int8":  # the int8 search copies its chosen file
        raise BadInput(
            "--ort is not available with int8 yet; convert the int8 .onnx with "
            "python -m onnxruntime.tools.convert_onnx_models_to_ort"
        )
    with atomic_artifact(job.output) as staged:
        tmp = staged.path
        outputs = metadata.output_names
        example = job.example
        _torch_export(
            model, torch.from_numpy(example), tmp, options.opset, options.dynamic_batch, outputs
        )
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph, full_check=True)
        if options.simplify:
            graph = _simplify(tmp, graph, example)
        if job.precision == "fp16":
            graph = to_fp16(graph)
        elif job.precision == "int8":
            called = called_modules(model, example)
            declared = declared_scopes(model, called)
            scopes, kept = owner_scopes(model, called), set(job.keep_float)
            graph = to_int8(
                graph,
                job.calibration,
                lambda name: name.startswith(declared) or node_owner(scopes, name) in kept,
            )
        onnx.save(graph, str(tmp))
        metadata = _with_mobile_verdict(metadata, tmp, job, options.ort)
        staged.record = metadata.to_dict()
        _embed(graph, staged.record)
        onnx.save(graph, str(tmp))
    if options.ort:
        _write_ort(job.output)
    return metadata


def _with_mobile_verdict(metadata: ArtifactMetadata, path: Path, job: ExportJob, ort: bool):
    """The record with onnxruntime's mobile-usability verdict (onnx_mobile.py), in its
    delegation report as ExecuTorch's and TFLite's are, and the ORT-format file it names."""
    found = mobile_usability(path)
    details = {**metadata.details, "ort_mobile": found}
    if ort:
        stem = job.output.stem
        details["ort_format"] = {
            "file": f"{stem}.ort",
            "required_operators": f"{stem}.required_operators.config",
        }
    report = [*(metadata.delegate_report or []), *describe_mobile(found)]
    return dataclasses.replace(metadata, delegate_report=report, details=details)


def _write_ort(onnx_path: Path) -> None:
    """The ORT-format file and its config beside the published .onnx, each written to a
    temporary directory there and renamed into place."""
    with tempfile.TemporaryDirectory(dir=onnx_path.parent, prefix=".ort-") as tmp:
        made = convert_to_ort(onnx_path, Path(tmp))
        for path in made:
            os.replace(path, onnx_path.parent / path.name)


def _embed(graph: onnx.ModelProto, record: dict) -> None:
    del graph.metadata_props[:]
    for key, value in sorted(record.items()):
        entry = graph.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    graph.producer_name = "mobilevit_deploy"


def restamp_onnx(path: Path, record: dict) -> None:
    """Replace the record embedded in an exported file (the int8 search's chosen one)."""
    graph = onnx.load(str(path))
    _embed(graph, record)
    onnx.save(graph, str(path))


def read_metadata(path: Path) -> dict:
    """The metadata embedded in an .onnx file, whoever wrote it (mvd's record alone:
    records.read_record)."""
    graph = onnx.load(str(path), load_external_data=False)
    return decoded({entry.key: entry.value for entry in graph.metadata_props})
