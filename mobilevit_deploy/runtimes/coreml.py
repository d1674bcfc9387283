"""CoreML packages: what can be proven about one here, and running it where CoreML runs.

coremltools predicts on macOS only. Elsewhere `check_package` proves what a static
look can: the package loads, its input and outputs have the names, shapes and types
the app will bind, and every op of the ML Program exists in the op set of the
deployment target it declares (an op newer than the target fails on old devices).
The numbers are then estimated by the caller (verify runs the fused model in fp16).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from ..files import sidecar_path

_FEATURE_TYPES = {"multiArrayType": "tensor", "imageType": "image", "stringType": "string"}


def import_coremltools():
    """coremltools, imported without the noise it makes on stderr at import: a warning
    that torch 2.13 is untested (verify is the test) and, off macOS, that its native
    runtime is missing (expected: check_package needs none)."""
    for name in ("coremltools", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import coremltools

    return coremltools


def _load_spec(path: Path):
    ct = import_coremltools()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.utils.load_spec(str(path))


def _feature(desc) -> dict:
    kind = desc.type.WhichOneof("Type")
    out = {"name": desc.name, "type": _FEATURE_TYPES.get(kind, kind)}
    if kind == "multiArrayType":
        out["shape"] = list(desc.type.multiArrayType.shape)
    elif kind == "imageType":
        image = desc.type.imageType
        out["shape"] = [1, 3, image.height, image.width]
    return out


def package_ops(spec) -> tuple[str, set[str]]:
    """(op set name, op types) of the package's main function."""
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    return main.opset, {op.type for op in block.operations}


def classifier_labels(spec) -> list[str] | None:
    """The labels an ML Program classifier carries (its `classify` op's classes), as
    strings; None for a package that is not a classifier."""
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    ops = [op for op in block.operations if op.type == "classify"]
    if not ops:
        return None
    classes = ops[0].inputs["classes"].arguments[0].value.immediateValue.list.values
    out = []
    for value in classes:
        tensor = value.immediateValue.tensor
        kind = tensor.WhichOneof("value")
        out += [str(v) for v in getattr(tensor, kind).values]
    return out


def unsupported_ops(op_types: set[str], min_target: str) -> list[str]:
    """Op types that the target's op set lacks (or that are not core ops at all)."""
    ct = import_coremltools()
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    target = getattr(ct.target, min_target)
    versions = [v for v in SSAOpRegistry.SUPPORTED_OPSET_VERSIONS if v <= target]
    return sorted(
        op for op in op_types if not any(v in SSAOpRegistry.core_ops.get(op, {}) for v in versions)
    )


def check_package(path: Path, expected_output_shapes: list[tuple[int, ...]]) -> dict:
    """A report of the static checks; `problems` lists every failed one in words.
    `expected_output_shapes`: one per tensor output, in order (unused for classifiers)."""
    path = Path(path)
    meta = json.loads(sidecar_path(path).read_text())
    spec = _load_spec(path)
    inputs = [_feature(d) for d in spec.description.input]
    outputs = [_feature(d) for d in spec.description.output]
    opset, ops = package_ops(spec)
    problems = []
    want_input = {"name": "input", "shape": meta["input_shape"]}
    got = inputs[0] if len(inputs) == 1 else {}
    if {k: got.get(k) for k in want_input} != want_input:
        problems.append(f"input is {inputs}, expected one named 'input' of shape {want_input}")
    if meta["task"] == "classification":
        names = [o["name"] for o in outputs]
        if names != ["classLabel", "classLabel_probs"] or spec.description.predictedFeatureName != (
            "classLabel"
        ):
            problems.append(f"classifier outputs are {names}, expected classLabel(_probs)")
        want = [str(label) for label in meta.get("class_labels", range(meta["num_classes"]))]
        if classifier_labels(spec) != want:
            problems.append(f"the classifier's labels are not the model's {len(want)} labels")
    else:
        expected = [
            {"name": name, "type": "tensor", "shape": list(shape)}
            for name, shape in zip(meta["output_names"], expected_output_shapes, strict=True)
        ]
        if outputs != expected:
            problems.append(f"outputs are {outputs}, expected {expected}")
    missing = unsupported_ops(ops, meta["min_target"])
    if missing:
        problems.append(f"ops not in {meta['min_target']}'s op set: {', '.join(missing)}")
    summary = (
        f"the package loads, its input and outputs have the expected names, types and "
        f"shapes, and its {len(ops)} op types are all in {meta['min_target']}'s op set"
    )
    return {
        "summary": summary,
        "spec_version": spec.specificationVersion,
        "opset": opset,
        "ops": sorted(ops),
        "inputs": inputs,
        "outputs": outputs,
        "problems": problems,
    }


class CoreMLRunner:
    """Runs a tensor-input package (macOS only): NCHW float32 in, the output out.

    A classifier package answers with probabilities; they are returned as an
    (N, classes) array in class order. CoreML schedules its own threads: `threads` is
    taken for the runner signature (exporters/formats.py) and left to it.
    """

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        ct = import_coremltools()
        self.model = ct.models.MLModel(str(path))
        self.meta = json.loads(sidecar_path(Path(path)).read_text())

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        rows = []
        for sample in x:
            result = self.model.predict({"input": sample[None]})
            if "classLabel_probs" in result:
                probs = result["classLabel_probs"]
                order = self.meta.get("class_labels") or sorted(probs)
                rows.append((np.array([probs[k] for k in order], dtype=np.float32),))
            else:
                names = self.meta["output_names"]
                rows.append(tuple(np.asarray(result[n], dtype=np.float32)[0] for n in names))
        outs = tuple(np.stack(column) for column in zip(*rows, strict=True))
        return outs[0] if len(outs) == 1 else outs
