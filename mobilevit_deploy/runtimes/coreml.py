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
import logging
import warnings
from pathlib import Path

import numpy as np

from ..errors import BadInput

_FEATURE_TYPES = {"multiArrayType": "tensor", "imageType": "image", "stringType": "string"}

# The user-defined metadata keys export_coreml writes the record under.
_RECORD_PREFIX = "mvd."

# What a feature that is not a multiArray holds: an image RGB pixels, 0-255 each.
_OTHER_DTYPES = {
    "imageType": "uint8",
    "int64Type": "int64",
    "stringType": "string",
    "dictionaryType": "dictionary",
}

# CoreMLOptions.compress by the op that expands such weights at load (iOS16's
# constexpr_* ops; iOS18 has a blockwise form of each).
_COMPRESSION = (
    ("palettize8", "constexpr_lut_to_dense"),
    ("int8", "constexpr_affine_dequantize"),
    ("int8", "constexpr_blockwise_shift_scale"),
)


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


def read_metadata(path: Path) -> dict:
    """The record embedded in a package ({} without one)."""
    return _record(_load_spec(Path(path)))


def _record(spec) -> dict:
    """export_coreml writes each key of the record as user-defined metadata
    `mvd.<key>`, a string or JSON text."""
    from ..records import decoded

    entries = spec.description.metadata.userDefined
    prefix = len(_RECORD_PREFIX)
    return decoded({k[prefix:]: v for k, v in entries.items() if k.startswith(_RECORD_PREFIX)})


def _tensor_info(desc) -> dict:
    """A feature as records.file_facts gives it: an image is RGB pixels, 0-255 each; a
    classifier's label and probabilities have no shape."""
    from coremltools.proto import FeatureTypes_pb2

    feature = _feature(desc)
    kind = desc.type.WhichOneof("Type")
    if kind == "multiArrayType":
        code = desc.type.multiArrayType.dataType
        dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(code).lower()
    else:
        dtype = _OTHER_DTYPES.get(kind, kind)
    return {"name": feature["name"], "shape": feature.get("shape"), "dtype": dtype}


def _weights(spec) -> tuple[str, str, str | None]:
    """(precision, evidence, compression) from the ML Program's constants: their dtype,
    and the ops that expand compressed ones at load (a lookup table for palettized
    weights, an affine dequantize for int8 ones)."""
    from coremltools.proto import MIL_pb2

    if spec.WhichOneof("Type") != "mlProgram":
        return "unknown", f"a {spec.WhichOneof('Type')} package, not an ML Program", None
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    dtypes, ops = set(), {op.type for op in block.operations}
    for op in block.operations:
        tensor = op.outputs[0].type.tensorType if op.outputs else None
        if op.type == "const" and tensor is not None and tensor.rank > 1:  # weights, not scalars
            dtypes.add(MIL_pb2.DataType.Name(tensor.dataType))
    compressed = next(
        (name for name, prefix in _COMPRESSION if any(o.startswith(prefix) for o in ops)), None
    )
    if "FLOAT16" in dtypes:
        return "fp16", "float16 weights", compressed
    return "fp32", "float32 weights", compressed


def _spec_target(spec) -> str | None:
    """The oldest deployment target that loads the package (its spec version's)."""
    try:
        return import_coremltools().target(spec.specificationVersion).name
    except ValueError:  # a spec version older than coremltools' first target
        return None


def file_facts(path: Path) -> dict:
    """The package's input and outputs as its description declares them (an image input
    or a tensor), its weights' precision and compression, its spec version, and a
    classifier's labels (records.file_facts)."""
    from ..records import single_input

    spec = _load_spec(Path(path))
    inputs = [_tensor_info(d) for d in spec.description.input]
    single_input(path, [i["name"] for i in inputs])
    precision, evidence, compressed = _weights(spec)
    kind = spec.description.input[0].type.WhichOneof("Type")
    return {
        "input_name": inputs[0]["name"],
        "input_shape": inputs[0]["shape"],
        "input_dtype": inputs[0]["dtype"],
        "input_type": "image" if kind == "imageType" else "tensor",
        "outputs": [_tensor_info(d) for d in spec.description.output],
        "precision": precision,
        "precision_evidence": evidence,
        "details": {
            "compress": compressed,
            "spec_version": spec.specificationVersion,
            "min_target": _spec_target(spec),
            "class_labels": classifier_labels(spec),
        },
    }


def package_ops(spec) -> tuple[str, set[str]]:
    """(op set name, op types) of the package's main function."""
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    return main.opset, {op.type for op in block.operations}


def classifier_labels(spec) -> list[str] | None:
    """The labels an ML Program classifier carries (its `classify` op's classes), as
    strings; None for a package that is not a classifier."""
    if spec.WhichOneof("Type") != "mlProgram":
        return None
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


def check_package(
    path: Path, expected_output_shapes: list[tuple[int, ...]], record: dict | None = None
) -> dict:
    """A report of the static checks; `problems` lists every failed one in words.
    `expected_output_shapes`: one per tensor output, in order (unused for classifiers).
    `record`: what the package must be, by default the record it carries; a package
    another tool made carries none, and is checked against the model the user names."""
    path = Path(path)
    spec = _load_spec(path)
    meta = record if record is not None else _record(spec)
    if not meta:
        raise BadInput(f"{path}: carries no mvd record; name the model it should be (--model)")
    meta = {"min_target": _spec_target(spec), **meta}
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
    """Runs a package (macOS only): normalised NCHW float32 in, the output out. An
    image-input package (the default) is fed the RGB image the input stands for, in
    8-bit pixels as an app's camera frame is: inputs outside the image range are
    clipped to it.

    A classifier package answers with probabilities; they are returned as an
    (N, classes) array in class order. CoreML schedules its own threads: `threads` is
    taken for the runner signature (exporters/formats.py) and left to it.
    """

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        ct = import_coremltools()
        self.model = ct.models.MLModel(str(path))
        spec = self.model.get_spec()
        # The package says it all, whoever made it: its input's name, its outputs in the
        # record's order (the description's for a package without one), and a
        # classifier's labels in class order.
        self.input_name = spec.description.input[0].name
        self.output_names = _record(spec).get("output_names") or [
            desc.name for desc in spec.description.output
        ]
        self.labels = classifier_labels(spec)
        self.probabilities = spec.description.predictedProbabilitiesName or None
        record = _record(spec)
        image = spec.description.input[0].type.WhichOneof("Type") == "imageType"
        if image and "mean" not in record:
            raise BadInput(
                f"{path}: an image input without mvd's record: its mean and std are unknown"
            )
        self.pixels = (record["mean"], record["std"]) if image else None

    def _fed(self, sample: np.ndarray):
        """The sample as the package takes it: a batch of one, or an RGB PIL image."""
        if self.pixels is None:
            return sample[None]
        from PIL import Image

        mean, std = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in self.pixels)
        rgb = np.clip(np.round((sample * std + mean) * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(rgb.transpose(1, 2, 0), "RGB")

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        rows = []
        for sample in x:
            result = self.model.predict({self.input_name: self._fed(sample)})
            if self.probabilities is not None:
                probs = result[self.probabilities]
                # integer classes are keyed by their index; named ones in the order of the
                # package's classify op (sorted, for a package that has none)
                named = self.labels is not None and isinstance(next(iter(probs)), str)
                order = self.labels if named else sorted(probs)
                rows.append((np.array([probs[k] for k in order], dtype=np.float32),))
            else:
                names = self.output_names
                rows.append(tuple(np.asarray(result[n], dtype=np.float32)[0] for n in names))
        outs = tuple(np.stack(column) for column in zip(*rows, strict=True))
        return outs[0] if len(outs) == 1 else outs
