"""Reduced-precision ONNX: fp16 weights and activations, int8 static QDQ.

fp16. Every float tensor becomes float16 except the graph's input and output (apps
keep feeding float32) and the ops in `FP16_KEEP_FP32`: reductions and normalisations
whose sums of many fp16 terms lose most of their digits, and exponentials that
overflow fp16 (max 65504) on logits a stressed or merely large model produces. Grouped
convolutions other than plain depthwise ones also stay fp32 (`arm_unsafe_convs`): on an
ARMv8.2 core with FP16 arithmetic, onnxruntime's fp16 Conv computes them wrong.

int8. Static quantization in QDQ form (QuantizeLinear/DequantizeLinear pairs around
each weighted op): onnxruntime fuses the pairs into integer kernels on CPU, and other
runtimes (TensorRT, QNN, XNNPACK) read the same file. Weights per output channel,
activations per tensor, calibrated on natural-looking images. Dynamic quantization is
not offered: on convolutions it emits ConvInteger, which onnxruntime's CPU provider
does not implement.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import io
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

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


def arm_unsafe_convs(model: onnx.ModelProto) -> list[str]:
    """The names of the grouped Convs that are not plain depthwise (one input and one
    output channel per group), naming any that had no name.

    onnxruntime 1.31 runs fp16 Conv in fp16 kernels on ARMv8.2 cores with FP16
    arithmetic (phones since about 2018), and computes these wrong there; x86 and ARMv8.0
    compute them in fp32 and are right. Measured on an emulated Cortex-A76, stressed, at
    128x128: FastViT-T8 (depthwise with two outputs per group, in its downsamplers and
    final conv) -39.4 dB with them in fp16, 56.9 dB with these 4 of 52 Convs in fp32;
    EfficientViT-B0 (the attention's grouped 1x1 aggregation) 16.4 dB, then 48.9 dB.
    Keeping every Conv fp32 instead gains little more (63.4 dB) and undoes fp16's speed.
    """
    weights = {t.name: t.dims for t in model.graph.initializer}
    unsafe = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_channels, in_per_group = weights[node.input[1]][:2]
        if groups > 1 and not (in_per_group == 1 and out_channels == groups):
            node.name = node.name or f"grouped_conv_{i}"
            unsafe.append(node.name)
    return unsafe


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of `model` with float32 input and output."""
    from onnxconverter_common import float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _unshare_small_constants(model)
    kept_convs = arm_unsafe_convs(model)
    # Stale float32 value_info (onnxslim writes it) makes the converter type the casts
    # it inserts around kept-fp32 ops wrongly; it re-infers shapes itself.
    del model.graph.value_info[:]
    with warnings.catch_warnings():
        # It warns for every constant below fp16's smallest normal; those become 0 or
        # a subnormal, which is what fp16 execution means.
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(FP16_KEEP_FP32) + list(float16.DEFAULT_OP_BLOCK_LIST),
            node_block_list=kept_convs,
            disable_shape_infer=False,
        )
    _store_weights_fp16(converted, kept_convs)
    return converted


def _store_weights_fp16(model: onnx.ModelProto, nodes: list[str]) -> None:
    """The weights of `nodes`, kept fp32 by the converter, stored fp16 and cast back to
    fp32 in the graph, in place: the file stays fp16's size, and onnxruntime folds the
    Cast once when it loads the file."""
    weights = {n.input[1] for n in model.graph.node if n.name in set(nodes)}
    casts = []
    for tensor in model.graph.initializer:
        if tensor.name in weights and tensor.data_type == onnx.TensorProto.FLOAT:
            half = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(half, f"{tensor.name}__fp16"))
            casts.append(
                onnx.helper.make_node(
                    "Cast",
                    [tensor.name],
                    [tensor.name.removesuffix("__fp16")],
                    to=onnx.TensorProto.FLOAT,
                    name=f"{tensor.name}__to_fp32",
                )
            )
    nodes_in_order = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes_in_order)


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


@functools.cache
def _ranges_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mvd-int8-ranges-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def ranges_cache(model: onnx.ModelProto, calibration: np.ndarray) -> Path:
    """Where onnxruntime's calibration cache keeps the activation ranges of this float
    graph on these images, for the life of the process. The int8 search exports one
    graph several times with other nodes kept float, and the ranges do not depend on
    which: the calibrator collects every tensor of the quantizable op types, whatever
    `nodes_to_exclude` says. Calibrating is most of an int8 export (the histogram
    percentile: 60% of FastViT-S12's zoo benchmark), so it runs once a search, not once
    a step."""
    return _ranges_dir() / f"{graph_digest(model, calibration)}.json"


def graph_digest(model: onnx.ModelProto, *arrays: np.ndarray, extra: str = "") -> str:
    """A hash of what computes, and of the `arrays` (and `extra`) it computes on: the
    graph and its opsets, not the record embedded in the file (metadata_props,
    producer): the int8 search's ranking reads a file that carries a record and its
    steps a bare export of the same graph, and both must find the one calibration
    (minutes at 512x1024)."""
    digest = hashlib.sha256(model.graph.SerializeToString())
    digest.update(repr(sorted((o.domain, o.version) for o in model.opset_import)).encode())
    for array in arrays:
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(extra.encode())
    return digest.hexdigest()


def _prepared(model: onnx.ModelProto, tmp: Path) -> Path:
    """Shape inference and graph cleanup, as onnxruntime recommends before quantizing:
    without shapes, some ops keep float paths between quantized neighbours."""
    from onnxruntime.quantization import quant_pre_process

    raw, prepared = tmp / "raw.onnx", tmp / "pre.onnx"
    onnx.save(model, str(raw))
    quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared))
    if _name_inlined_nodes(graph):
        onnx.save(graph, str(prepared))
    return prepared


def _name_inlined_nodes(model: onnx.ModelProto) -> int:
    """quant_pre_process expands function ops into nodes without names (EfficientViT's
    HardSwish into HardSigmoid and Mul), which no module's scope matches: they stayed
    int8 inside modules kept float, and an activation module owned nothing to rank. Each
    is named in the scope of the tensor it writes ("/stem/op_list.0/act/HardSwish_output_0")
    or, where that has none, of a named node that reads it. Returns how many were named."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    named, progress = 0, True
    while progress:
        progress = False
        for node in model.graph.node:
            if node.name:
                continue
            scoped = [o for o in node.output if o.startswith("/")]
            scoped += [r.name for o in node.output for r in readers.get(o, []) if r.name]
            if scoped:
                node.name = f"{scoped[0].rsplit('/', 1)[0]}/{node.op_type}_inlined_{named}"
                named, progress = named + 1, True
    return named


def to_int8(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    stays_float: Callable[[str], bool] = lambda _name: False,
) -> onnx.ModelProto:
    """Static QDQ int8: per-channel int8 weights, uint8 activations; the nodes whose
    names `stays_float` takes (those of the modules kept float) stay float.

    Activation ranges come from the 99.999th percentile of the calibration
    activations, not their min and max: one outlier no longer stretches the scale for
    every other value (stressed FastViT-T8: 25 dB against min-max's 20 dB).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cache = ranges_cache(model, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = _prepared(model, Path(tmp)), Path(tmp) / "q.onnx"
        float_graph = onnx.load(str(prepared))
        excluded = [n.name for n in float_graph.graph.node if stays_float(n.name)]
        # The calibrator prints its progress; stdout belongs to `--json -`.
        with contextlib.redirect_stdout(io.StringIO()), no_root_warnings():
            quantize_static(
                str(prepared),
                str(quantized),
                _Calibration(model.graph.input[0].name, calibration),
                calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.Percentile,
                nodes_to_exclude=excluded,
                extra_options={"CalibStridedMinMax": 1},  # any calibrator, despite the name
            )
        result = onnx.load(str(quantized))
    _read_float_inputs(result, set(excluded), float_graph)
    _float_graph_outputs(result)
    return result


def _float_graph_outputs(model: onnx.ModelProto) -> None:
    """Drop the QuantizeLinear/DequantizeLinear pair onnxruntime puts on each graph
    output, in place: no op reads it, and uint8 logits cost top-1 its ties (256 levels
    over the logits' range) for no speed; the last op's output is then float."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dropped = set()
    for output in graph.output:
        dq = producer.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or readers.get(q.output[0]) != 1:
            continue
        source = producer.get(q.input[0])
        if source is None or readers.get(q.input[0]) != 1:
            continue
        source.output[list(source.output).index(q.input[0])] = output.name
        dropped |= {q.name, dq.name}
    kept = [n for n in graph.node if n.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)


def int8_module_gain(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    owner: Callable[[str], str | None],
    images: np.ndarray,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict[tuple[str, ...], float]:
    """For each module (`owner` names the module of a node), the share of the output's
    int8 noise power that goes when its nodes read float inputs again, measured: the
    QDQ graph, with those nodes' inputs wired back to the float tensors and weights it
    still holds (the calibration unchanged), runs in onnxruntime on `images` against
    the float graph. Keyed by the modules kept float together: each module alone, and
    the modules that read one quantized activation (`_co_readers`).

    The readers of a tensor go float together because one alone may gain nothing: a
    residual block reads its input in its first convolution and in its add, and where
    the two paths' int8 errors cancel, either path float un-cancels them. Stressed
    SeaFormer-Small's stem output is such a tensor: its two readers, ranked alone, were
    its last two modules (gains -0.005 and -0.010), yet int8 in an otherwise float
    program the pair cost all but 23.4 dB, and no float set short of every module
    reached 25 dB.

    A measure at the output, not at the node: the relative noise of each node's own
    int8 inputs (onnxruntime's qdq_loss_debug matching) ranked stressed FastViT-T8's
    modules nearly backwards, its 32 noisiest gaining 0.6 dB and its last 10 over 20 dB,
    because a tensor's relative noise says nothing of how the layers after it amplify
    or wash it out.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = onnx.load(str(_prepared(model, Path(tmp))))
    modules: dict[str, set[str]] = {}
    for name in _reading_dequantized(quantized):
        module = owner(name)
        if module is not None:
            modules.setdefault(module, set()).add(name)
    entries = {(module,): nodes for module, nodes in modules.items()}
    for readers in _co_readers(quantized, owner):
        entries.setdefault(readers, set().union(*(modules[m] for m in readers)))
    reference = _outputs(prepared, images)
    power = float(np.sum(reference**2)) or 1.0
    base = float(np.sum((_outputs(quantized, images) - reference) ** 2)) / power
    gains = {}
    for k, (entry, nodes) in enumerate(entries.items(), 1):
        progress(f"ranking modules by their share of the int8 error ({k}/{len(entries)})")
        edited = onnx.ModelProto()
        edited.CopyFrom(quantized)
        _read_float_inputs(edited, nodes, prepared)
        got = _outputs(edited, images)
        gains[entry] = base - float(np.sum((got - reference) ** 2)) / power
    return gains


def _co_readers(
    model: onnx.ModelProto, owner: Callable[[str], str | None]
) -> list[tuple[str, ...]]:
    """The modules that read one quantized activation, for each activation that more
    than one module reads (in the order the graph reads them). A weight is read by its
    own node only: its DequantizeLinear reads an initializer, not a QuantizeLinear."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        module = owner(node.name)
        for name in node.input:
            dq = producer.get(name)
            if module is None or dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                group = readers.setdefault(q.input[0], [])
                if module not in group:
                    group.append(module)
    groups: dict[frozenset[str], tuple[str, ...]] = {}  # one entry per set of modules
    for group in readers.values():
        if len(group) > 1:
            groups.setdefault(frozenset(group), tuple(group))
    return list(groups.values())


def _reading_dequantized(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that read a DequantizeLinear output (an int8 activation or
    weight): the ones that keeping float changes."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {
        n.name
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and any(i in dequantized for i in n.input)
    }


def _read_float_inputs(
    model: onnx.ModelProto, names: set[str], float_graph: onnx.ModelProto
) -> None:
    """Make the nodes `names` of a QDQ graph read float inputs, in place: an activation
    from before its QuantizeLinear, a quantized weight from `float_graph` (the graph
    that was quantized, under a name of its own). onnxruntime leaves an excluded node
    reading the int8 copy of a tensor that other nodes read quantized; excluded, it
    keeps only its weights float.

    Where the quantizer dropped a Relu or Clip, because a uint8 quantization clips
    the same range, the tensor before the QuantizeLinear is the one before that
    activation; a node that reads it float gets the activation applied again, or it
    would see the negative values the float graph never has.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    float_producer = {o: n for n in float_graph.graph.node for o in n.output}
    float_weights = {w.name: w for w in float_graph.graph.initializer}
    present = {w.name for w in graph.initializer}
    restored: dict[str, onnx.NodeProto] = {}  # tensor -> the activation applied again

    def add_initializer(name: str, as_name: str) -> str:
        if as_name not in present and name in float_weights:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(float_weights[name])
            tensor.name = as_name
            graph.initializer.append(tensor)
            present.add(as_name)
        return as_name

    def float_activation(tensor: str) -> str:
        dropped = float_producer.get(tensor)
        here = producer.get(tensor)
        if dropped is None or here is None or dropped.op_type == here.op_type:
            return tensor
        if dropped.op_type not in ("Relu", "Clip"):
            return tensor
        if tensor not in restored:
            node = onnx.NodeProto()
            node.CopyFrom(dropped)
            node.name = f"{dropped.name}_restored"
            node.input[0] = tensor
            node.output[0] = f"{tensor}_restored"
            for bound in node.input[1:]:
                add_initializer(bound, bound)
            restored[tensor] = node
        return restored[tensor].output[0]

    for node in graph.node:
        if node.name not in names:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = producer.get(dq.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                node.input[k] = float_activation(source.input[0])
                continue
            weight = dq.input[0].removesuffix("_quantized")
            if weight in float_weights:
                node.input[k] = add_initializer(weight, f"{weight}_float")
    if restored:
        # Each activation goes right after the node whose output it reads: ONNX keeps
        # nodes in topological order.
        ordered = []
        for node in graph.node:
            ordered.append(node)
            ordered += [restored[o] for o in node.output if o in restored]
        del graph.node[:]
        graph.node.extend(ordered)


def _outputs(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """Every output of `model` for each image (batch 1, as exported), flattened."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: images[i : i + 1]}) for i in range(len(images))]
    return np.concatenate([np.ravel(o).astype(np.float64) for run in runs for o in run])
