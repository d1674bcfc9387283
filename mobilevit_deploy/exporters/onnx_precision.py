"""Reduced-precision ONNX: fp16 weights and activations, int8 static QDQ.

fp16. Every float tensor becomes float16 except the graph's input and output (apps
keep feeding float32) and the ops in `FP16_KEEP_FP32`: reductions and normalisations
whose sums of many fp16 terms lose most of their digits, and exponentials that
overflow fp16 (max 65504) on logits a stressed or merely large model produces.

int8. Static quantization in QDQ form (QuantizeLinear/DequantizeLinear pairs around
each weighted op): onnxruntime fuses the pairs into integer kernels on CPU, and other
runtimes (TensorRT, QNN, XNNPACK) read the same file. Weights per output channel,
activations per tensor, calibrated on natural-looking images. Dynamic quantization is
not offered: on convolutions it emits ConvInteger, which onnxruntime's CPU provider
does not implement.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from ..quiet import no_root_warnings

# Numerically sensitive in fp16 (see the module docstring); they run in fp32.
FP16_KEEP_FP32 = (
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "LayerNormalization",
    "InstanceNormalization",
    "Softmax",
    "Exp",
    "Pow",
    "Sqrt",
    "Div",
    "Resize",
)


def _unshare_small_constants(model: onnx.ModelProto) -> None:
    """Give every user of a small shared initializer its own copy, in place.

    onnxslim merges equal constants, so one scalar may feed a Clip next to a kept-fp32
    op and another in the fp16 part; the converter can give a tensor only one type,
    and onnxruntime then refuses the graph (SeaFormer's ReLU6 bounds did this).
    """
    small = {t.name: t for t in model.graph.initializer if len(t.dims) <= 1}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name not in small:
                continue
            uses[name] = uses.get(name, 0) + 1
            if uses[name] == 1:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(small[name])
            copy.name = f"{name}__use{uses[name]}"
            model.graph.initializer.append(copy)
            node.input[i] = copy.name


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of `model` with float32 input and output."""
    from onnxconverter_common import float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _unshare_small_constants(model)
    # Stale float32 value_info (onnxslim writes it) makes the converter type the casts
    # it inserts around kept-fp32 ops wrongly; it re-infers shapes itself.
    del model.graph.value_info[:]
    with warnings.catch_warnings():
        # It warns for every constant below fp16's smallest normal; those become 0 or
        # a subnormal, which is what fp16 execution means.
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(FP16_KEEP_FP32) + list(float16.DEFAULT_OP_BLOCK_LIST),
            disable_shape_infer=False,
        )


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a batch of images, one at a time.

    `__len__` and `set_range` let the quantizer take the images in strides: the
    calibrator keeps every intermediate output of what it has read until it folds them
    into its histograms, so a stride of one image bounds its memory to one image's
    activations (EfficientViT-L1 at 224 with 8 images: 20.5 GiB at once).
    """

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._feeds = [{input_name: images[i : i + 1]} for i in range(len(images))]
        self._next: Iterator[dict] = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self._feeds[start_index:end_index])

    def get_next(self) -> dict | None:
        return next(self._next, None)


def _prepared(model: onnx.ModelProto, tmp: Path) -> Path:
    """Shape inference and graph cleanup, as onnxruntime recommends before quantizing:
    without shapes, some ops keep float paths between quantized neighbours."""
    from onnxruntime.quantization import quant_pre_process

    raw, prepared = tmp / "raw.onnx", tmp / "pre.onnx"
    onnx.save(model, str(raw))
    quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True)
    return prepared


def to_int8(
    model: onnx.ModelProto, calibration: np.ndarray, float_scopes: Sequence[str] = ()
) -> onnx.ModelProto:
    """Static QDQ int8: per-channel int8 weights, uint8 activations; nodes whose names
    start with one of `float_scopes` (the modules kept float) stay float.

    Activation ranges come from the 99.999th percentile of the calibration
    activations, not their min and max: one outlier no longer stretches the scale for
    every other value (stressed FastViT-T8: 25 dB against min-max's 20 dB).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = _prepared(model, Path(tmp)), Path(tmp) / "q.onnx"
        nodes = onnx.load(str(prepared)).graph.node
        excluded = [n.name for n in nodes if n.name.startswith(tuple(float_scopes))]
        # The calibrator prints its progress; stdout belongs to `--json -`.
        with contextlib.redirect_stdout(io.StringIO()), no_root_warnings():
            quantize_static(
                str(prepared),
                str(quantized),
                _Calibration(model.graph.input[0].name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.Percentile,
                nodes_to_exclude=excluded,
                extra_options={"CalibStridedMinMax": 1},  # any calibrator, despite the name
            )
        return onnx.load(str(quantized))


def int8_node_noise(
    model: onnx.ModelProto, quantized: onnx.ModelProto, images: np.ndarray
) -> dict[str, float]:
    """The quantization noise at each node of the float graph, by node name: the
    relative noise power (10^(-SQNR/10)) of each int8 input it reads and of its int8
    weight, summed. That is what keeping the node float takes away.

    onnxruntime's qdq_loss_debug helpers measure it: the QDQ graph runs with every
    activation as an output, and each quantized tensor is compared before and after its
    QuantizeLinear/DequantizeLinear pair; each weight against its dequantized int8. The
    noise a node's inputs carry from earlier layers is not counted: a float node passes
    it on (a strided conv even amplifies it), so it is not the node's to remove.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )
    from onnxruntime.quantization.qdq_loss_debug import (
        compute_signal_to_quantization_noice_ratio as sqnr_db,
    )

    with tempfile.TemporaryDirectory() as tmp:
        prepared = _prepared(model, Path(tmp))
        graph = onnx.load(str(prepared)).graph
        qdq, augmented = Path(tmp) / "q.onnx", Path(tmp) / "q.all.onnx"
        onnx.save(quantized, str(qdq))
        modify_model_output_intermediate_tensors(str(qdq), str(augmented))
        feeds = [{graph.input[0].name: images[i : i + 1]} for i in range(len(images))]
        activations = collect_activations(str(augmented), feeds)
        errors = {
            name: sqnr_db(pair["pre_qdq"], pair["post_qdq"])
            for name, pair in create_activation_matching(activations).items()
        }
        for name, pair in create_weight_matching(str(prepared), str(qdq)).items():
            if np.ndim(pair["float"]) > 0:  # scalars (a Clip's bounds) are not weights
                errors[name] = sqnr_db(np.asarray(pair["float"]), np.asarray(pair["dequantized"]))
    noise = {name: 10 ** (-db / 10) for name, db in errors.items()}
    shares = {}
    for node in graph.node:
        share = sum(noise.get(name, 0.0) for name in node.input)
        if share:
            shares[node.name] = share
    return shares
