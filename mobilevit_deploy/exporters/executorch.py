"""ExecuTorch export: torch -> `.pte` delegated to XNNPACK, with a delegation report.

`torch.export` -> `to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])` ->
`to_executorch()`. What XNNPACK does not take runs on ExecuTorch's portable kernels,
which on a phone can be tens of times slower, so the file's record says which ops
those are and how many nodes stayed out (`delegation`).

Five rewrites run before partitioning, on this format's graph only (the other formats
keep their graphs and numbers); each computes the same function, LayerNorm's to
rounding:
- GELU with the tanh approximation (EfficientViT's L series) is written out as its
  formula (`_tanh_gelu`): XNNPACK's GELU computes the erf form whatever `approximate`
  says, which put stressed EfficientViT-L1 at 1.1e-3 of the output scale off;
- an `expand_copy` that does not change its input (what `matmul` of two equally
  batched 4-D tensors decomposes into) is dropped: ExecuTorch's own pass for it;
- a `mean` over any dims becomes XNNPACK's one supported form, a 4-D mean over the
  two innermost dims with keepdim (global average pooling): the reduced dims are moved
  last and viewed as (1, kept, reduced, 1). The same numbers are summed and divided;
- a `split` (of qkv projections) becomes one slice per part, and a `select` (a class
  token) a slice and a view, which XNNPACK has;
- LayerNorm, which XNNPACK lacks, is written out as means, products and an rsqrt
  (`_layer_norm`), in float32 programs and int8 ones; not at fp16.
Precisions: fp32; fp16 (weights and compute in half inside, float32 input and output
like every other file; LayerNorm in fp32, as ExecuTorch's fp16 kernel for it is wrong:
`_layer_norm_in_fp32`; what depends on constants alone computed at export,
`_fold_constants`); int8 through PT2E with XNNPACK's quantizer (symmetric,
per-channel weights, int8 activations) calibrated on natural-looking images, with the
modules that ask for float (`int8_keeps_float`) left out of quantization.
The metadata record is embedded as the program's constant method `mvd_metadata`
(a JSON string) and in the sidecar.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import re
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ..errors import ExportFailed, one_line
from ..files import atomic_artifact
from ..quiet import quiet
from ..runtimes.executorch import METADATA_METHOD
from . import ExportJob, float_modules, output_writers
from .formats import FORMATS
from .metadata import ArtifactMetadata


class LoweringFailed(ExportFailed):
    """torch.export or the XNNPACK lowering could not take the model."""


class _Half(nn.Module):
    """fp16 inside, float32 at the edges: the app's pre- and post-processing do not
    change with the precision."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()  # the job's model may be the caller's

    def forward(self, x: torch.Tensor):
        out = self.model(x.half())
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _delegate_friendly():
    """The pass that rewrites every mean into a 4-D innermost-dims mean with keepdim, and
    split and select into slices (XNNPACK has slice, not those)."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass

    aten = exir_ops.edge.aten

    class DelegateFriendly(ExportPass):
        def call_getitem(self, value, key, meta):
            if isinstance(value, list):  # a split made slices: the getitem picks one
                return value[key]
            return super().call_getitem(value, key, meta)

        def call_operator(self, op, args, kwargs, meta):
            if op == aten.split_with_sizes_copy.default:
                x, sizes = args[0], args[1]
                dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
                dim %= x.to_tensor().dim()
                slices, start = [], 0
                for size in sizes:
                    step = (x, dim, start, start + size)
                    slices.append(super().call_operator(aten.slice_copy.Tensor, step, {}, meta))
                    start += size
                return slices
            if op == aten.select_copy.int:  # x[:, i]: a slice, then the dim dropped
                x, dim, index = args
                shape = list(x.to_tensor().shape)
                dim, index = dim % len(shape), index % shape[dim % len(shape)]
                step = (x, dim, index, index + 1)
                one = super().call_operator(aten.slice_copy.Tensor, step, {}, meta)
                dropped = shape[:dim] + shape[dim + 1 :]
                return super().call_operator(aten.view_copy.default, (one, dropped), {}, meta)
            if op == aten.mean.default and kwargs.get("dtype") is None:  # x.mean()
                op, args, kwargs = aten.mean.dim, (args[0], None, False), {}
            if op != aten.mean.dim or kwargs.get("dtype") is not None:
                return super().call_operator(op, args, kwargs, meta)
            x, dims = args[0], args[1]
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            shape = list(x.to_tensor().shape)
            rank = len(shape)
            reduced = sorted(d % rank for d in (dims if dims else range(rank)))
            if rank == 4 and reduced == [2, 3] and keepdim:
                return super().call_operator(op, args, kwargs, meta)  # already the one form
            kept = [d for d in range(rank) if d not in reduced]
            inner, outer = math.prod(shape[d] for d in reduced), math.prod(shape[d] for d in kept)
            moved = x
            if kept + reduced != list(range(rank)):
                moved = super().call_operator(
                    aten.permute_copy.default, (x, kept + reduced), {}, meta
                )
            pooled_in = super().call_operator(
                aten.view_copy.default, (moved, [1, outer, inner, 1]), {}, meta
            )
            pooled = super().call_operator(op, (pooled_in, [2, 3], True), {}, meta)
            out_shape = [
                1 if d in reduced else n for d, n in enumerate(shape) if keepdim or d in kept
            ]
            return super().call_operator(aten.view_copy.default, (pooled, out_shape), {}, meta)

    return DelegateFriendly()


def _layer_norm_in_fp32():
    """The pass that runs every fp16 LayerNorm in fp32: input, weight and bias cast up,
    the outputs cast back (what ONNX fp16 does, onnx_precision.FP16_KEEP_FP32).

    XNNPACK does not take layer_norm, so it runs on ExecuTorch's optimized kernel, whose
    fp16 path is wrong from 256 features on: its vectorised moments
    (`RowwiseMomentsImpl`, moments_utils.h) load the fp16 row as fp32 vectors, so the
    mean and variance are garbage (a LayerNorm over 256 random features: 11 dB; over
    255: 81 dB). EfficientViT's head normalises 1280-1600 features and SepViT-Lite's
    last stage 256, both in that range (in fp16, stressed EfficientViT-B0 is at -16.5 dB
    and SepViT-Lite's logits are inf). The kernel's fp32 path is exact; fp32 and int8
    graphs pass through unchanged.
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass

    layer_norm = exir_ops.edge.aten.native_layer_norm.default
    cast = exir_ops.edge.dim_order_ops._to_dim_order_copy.default

    class Fp32Outputs(NamedTuple):  # a layer norm's outputs, cast back when picked
        outs: object

    class LayerNormInFp32(ExportPass):
        def _cast(self, x, dtype, meta):
            kwargs = {"dtype": dtype, "dim_order": list(range(x.to_tensor().dim()))}
            return super().call_operator(cast, (x,), kwargs, meta)

        def call_getitem(self, value, key, meta):
            if isinstance(value, Fp32Outputs):
                item = super().call_getitem(value.outs, key, meta)
                return self._cast(item, torch.float16, meta)
            return super().call_getitem(value, key, meta)

        def call_operator(self, op, args, kwargs, meta):
            if op != layer_norm or args[0].to_tensor().dtype != torch.float16:
                return super().call_operator(op, args, kwargs, meta)
            x, shape, weight, bias, eps = args
            x, weight, bias = (
                None if t is None else self._cast(t, torch.float32, meta) for t in (x, weight, bias)
            )
            args = (x, shape, weight, bias, eps)
            return Fp32Outputs(super().call_operator(op, args, kwargs, meta))

    return LayerNormInFp32()


def _fold_constants():
    """The pass that computes, once at export, what depends on constants alone.

    In an fp16 program the model's Python scalars (an attention's scale, a residual's
    0.5) become float32 constants, and `_layer_norm_in_fp32` casts LayerNorm's weights
    up: each a cast on portable kernels at every run, listed in the delegation report
    beside the ops that matter (SepViT-Lite: 151 casts, 83 of them of constants).
    Folded, they are constants of the dtype their readers take, which XNNPACK holds;
    the values are those the run-time cast made."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    class FoldConstants(ExportedProgramPassBase):
        def call(self, exported_program):
            return ExportedProgramPassResult(constant_prop_pass(exported_program), True)

    return FoldConstants()


def _owner(node) -> str | None:
    """The path of the innermost module whose forward made an exported node."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0].removeprefix("L['self'].") if stack else None


_COPY_OPS = {
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.pad.default,
    torch.ops.aten.constant_pad_nd.default,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.squeeze.dim,
}


def _share_qparams_through_copies(model: torch.fx.GraphModule) -> None:
    """XNNPACK copies the int8 values of a slice or a pad unchanged, so their input and
    output must share one scale. The quantizer shares it through reshapes and
    permutes, not slices, pads and splits: the program then fails to load (`forward`
    error 0x1; stressed LeViT pads its 7x7 grid, SepViT and SeaFormer slice, and
    FastViT's attention chunks q, k and v out of one tensor). Each such op after a
    quantized tensor takes that tensor's parameters, in graph order so that a chain of
    copies shares them too; a split's parts (its getitems) take its input's. Their
    values are that input's dequantized ones, so the shared scale loses nothing."""
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        SharedQuantizationSpec,
    )
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        part = node.target is operator.getitem and _is_split(node.args[0])
        if node.target not in _COPY_OPS and not part:
            continue
        source = node.args[0].args[0] if part else node.args[0]
        annotation = getattr(source, "meta", {}).get(Q_ANNOTATION_KEY)
        if annotation is None or annotation.output_qspec is None:
            continue
        if Q_ANNOTATION_KEY in node.meta and node.meta[Q_ANNOTATION_KEY]._annotated:
            continue
        shared = SharedQuantizationSpec(source)
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={} if part else {source: shared},
            output_qspec=shared,
            _annotated=True,
        )


_SPLIT_OPS = {
    torch.ops.aten.chunk.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.unbind.int,
}


def _is_split(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.target in _SPLIT_OPS


# Ops between the last weighted op and a graph output that compute nothing a scale
# needs to bound: resizes, pooling and copies (EfficientViT's segmenters end in an
# upsample, pooled features in a mean).
_TO_OUTPUT_OPS = _COPY_OPS | {
    torch.ops.aten.upsample_bilinear2d.vec,
    torch.ops.aten.upsample_bicubic2d.vec,
    torch.ops.aten.upsample_nearest2d.vec,
    torch.ops.aten.mean.dim,
    torch.ops.aten.adaptive_avg_pool2d.default,
}


def _float_graph_outputs(model: torch.fx.GraphModule) -> None:
    """An int8 output stops at its calibrated maximum, so an unseen input's top logit
    can be capped and lose to the runner-up. The modules that write an output get a
    dynamic config (`_quantize`); an output written by a resize, a mean or a copy has no
    such module, so here those ops and the op before them run float (XNNPACK has no
    int8 convolution with a float output: its weights' dequantize would fall to portable
    kernels, which lack it). That op is a segmentation head's last 1x1 convolution, a
    small share of the weights. Only chains that feed nothing but the output change: a
    feature map that also feeds the next stage keeps its scale."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    output = next(n for n in model.graph.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    for node in outs:
        chain = {output}
        while isinstance(node, torch.fx.Node) and set(node.users) <= chain:
            annotation = node.meta.get(Q_ANNOTATION_KEY)
            if node.op == "call_function" and node.target in _TO_OUTPUT_OPS:
                node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)
                chain.add(node)
                node = node.args[0]
                continue
            if annotation is not None and annotation.output_qspec is not None:
                node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)
            break


def _quantize(
    model: nn.Module, example: torch.Tensor, calibration: torch.Tensor, keep_float=()
) -> nn.Module:
    """PT2E int8; the modules that declare float (with their children) and the nodes
    that the modules at the `keep_float` paths own (their own ops, not their
    children's: int8_search.rank_modules) are left out of quantization."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    declared = [path for path, _ in float_modules(model)]

    class SharedCopies(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            _float_cats(model, declared, set(keep_float))
            model = super().annotate(model)
            _share_qparams_through_copies(model)
            _float_graph_outputs(model)
            return model

    quantizer = SharedCopies().set_global(get_symmetric_quantization_config(is_per_channel=True))
    for cls in {type(model.get_submodule(path)) for path in declared}:
        quantizer.set_module_type(cls, None)  # None: left float (and out of the global)
    # The ops that write the graph's outputs: int8 weights, float output (the input is
    # quantized at run time), so that no logit is capped at the calibrated maximum.
    for path in output_writers(model, example.numpy()) - set(keep_float):
        if not _inside(path, declared):
            quantizer.set_module_name(
                path, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
            )
    if keep_float:  # set_module_name takes no None (yet): a filter leaves them out instead
        kept = set(keep_float)
        quantizer.set_filter_function(lambda node: _owner(node) not in kept)
    graph = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    # The graph is traced at the example's batch: calibrate in batches of that size,
    # the last one filled up from the first images, so that every image is seen.
    batch = len(example)
    count = -(-len(calibration) // batch) * batch
    images = calibration[torch.arange(count) % len(calibration)]
    with torch.no_grad():
        for i in range(0, count, batch):
            prepared(images[i : i + batch])
    converted = convert_pt2e(prepared)
    _one_dequantize_per_user(converted)
    return converted


def _float_cats(model: torch.fx.GraphModule, declared: list[str], kept: set[str]) -> None:
    """XNNPACK's quantizer annotates every `cat` whatever its module and type filters
    say (its cat annotator ignores the filter), so LiteMLA, declared float, had its
    multi-scale q/k/v cat quantized, and the reshapes and pads after it by propagation:
    no float set of the int8 search could reach 25 dB on stressed EfficientViT-B2
    (23.1 dB with all 135 ranked modules float). Marking those cats annotated with no
    spec first leaves them float, as the filters meant."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    for node in model.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.cat.default:
            continue
        owner = _owner(node) or ""
        if owner in kept or _inside(owner, declared):
            node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)


def _inside(path: str, modules: list[str]) -> bool:
    """Whether the module at `path` is one of `modules` or below one of them."""
    return any(path == m or path.startswith(m + ".") for m in modules)


def _one_dequantize_per_user(model: torch.fx.GraphModule) -> None:
    """Give each reader of a dequantized tensor its own dequantize. PT2E shares one
    among its readers when one of them runs float (a residual add kept float reads
    the block's int8 input beside the block's first convolution). When a portable op
    splits them into two XNNPACK subgraphs, the shared dequantize becomes an output of
    the first, which XNNPACK computed wrong (0.15 off PT2E's simulation, at an output
    scale of 0.86) or failed to size at run time ("Failed to resize output tensor";
    EfficientViT-B0 and B1 with a LiteMLA block's add kept float, a step of their int8
    search). With a copy each, the int8 tensor crosses the boundary, as it
    does when all its readers are int8. A dequantize is exact: the values are equal."""
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target != dequantize:
            continue
        for user in list(node.users)[1:]:
            with model.graph.inserting_after(node):
                own = model.graph.call_function(node.target, node.args, node.kwargs)
            own.meta = dict(node.meta)
            user.replace_input_with(node, own)
    model.recompile()


def delegation_report(graph_module) -> dict:
    """How much of the graph XNNPACK runs, and each op left to portable kernels, by
    name and count (the getitem nodes that unpack a delegate's outputs are not ops)."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    portable = {
        re.sub(r"^aten_", "", op): row.non_delegated
        for op, row in sorted(info.delegation_by_operator.items())
        if row.non_delegated and op != "getitem"
    }
    delegated = info.num_delegated_nodes
    total = delegated + sum(portable.values())
    return {
        "delegated_nodes": delegated,
        "portable_nodes": sum(portable.values()),
        "delegated_fraction": delegated / total if total else 1.0,
        "delegate_subgraphs": info.num_delegated_subgraphs,
        "portable_ops": portable,
    }


def describe(delegation: dict) -> str:
    """The delegation report in one line, for export and verify output."""
    share = delegation["delegated_fraction"]
    total = delegation["delegated_nodes"] + delegation["portable_nodes"]
    line = f"XNNPACK runs {share:.1%} of {total} nodes"
    if delegation["portable_ops"]:
        ops = ", ".join(f"{op} x{n}" for op, n in delegation["portable_ops"].items())
        line += f"; left to portable kernels (slow on device): {ops}"
    return line


def _tanh_gelu(x: torch.Tensor, approximate: str = "none"):
    """GELU's tanh approximation as mul, add and tanh, which XNNPACK runs as written.

    The delegate lowers every `aten.gelu` to its erf GELU and drops `approximate`; the
    two forms differ by up to 4.7e-4 (at x = 2.69). The erf form is left to the
    delegate (NotImplemented keeps the op)."""
    if approximate != "tanh":
        return NotImplemented
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + torch.tanh(inner))  # 1.0: an int 1 is a cast on portable kernels


def _layer_norm(x: torch.Tensor, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """LayerNorm as means, a subtraction, products and an rsqrt, which XNNPACK runs.

    XNNPACK has no LayerNorm, so each one ran on portable kernels between two delegate
    calls (SepViT: 33 in a program), and an app built with the portable library alone
    runs them on reference kernels. Written out, the float32 numbers are LayerNorm's to
    rounding (stressed SepViT-Lite: the same 139 dB against float64). Not at fp16:
    (x - mean)^2 passes fp16's 65504 from |x - mean| > 256, so fp16 programs keep
    LayerNorm in fp32 (`_layer_norm_in_fp32`)."""
    dims = list(range(x.dim() - len(shape), x.dim()))
    centred = x - torch.mean(x, dims, keepdim=True)
    out = centred * torch.rsqrt(torch.mean(centred * centred, dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _lower(model: nn.Module, example: torch.Tensor, fp16: bool = False):
    from executorch.backends.xnnpack._passes.remove_noop_expand_copy_pass import (
        RemoveNoopExpandCopyPass,
    )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(model, (example,))
    table = {torch.ops.aten.gelu.default: _tanh_gelu}
    if not fp16:
        table[torch.ops.aten.layer_norm.default] = _layer_norm
    program = program.run_decompositions(table)
    return to_edge_transform_and_lower(
        program,
        transform_passes=[
            RemoveNoopExpandCopyPass(),
            _delegate_friendly(),
            _layer_norm_in_fp32(),
            *([_fold_constants()] if fp16 else []),  # only fp16 casts constants
        ],
        partitioner=[XnnpackPartitioner()],
    )


def _program(job: ExportJob, example: torch.Tensor):
    """The ExecuTorch program with its record embedded, and the record."""
    from executorch.exir import EdgeProgramManager

    model = job.model.eval()
    with quiet(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if job.precision == "fp16":
            model = _Half(model)
        elif job.precision == "int8":
            model = _quantize(model, example, torch.from_numpy(job.calibration), job.keep_float)
        edge = _lower(model, example, fp16=job.precision == "fp16")
        delegation = delegation_report(edge.exported_program().graph_module)
        metadata = dataclasses.replace(
            job.metadata,
            delegate_report=[describe(delegation)],
            details={**job.metadata.details, "delegation": delegation},
        )
        # The record is a constant method of the program; it needs the report, so the
        # lowered program is wrapped again with it (the lowering itself is not redone).
        program = EdgeProgramManager(
            edge.exported_program(),
            {METADATA_METHOD: json.dumps(metadata.to_dict(), sort_keys=True)},
            edge.compile_config,
        ).to_executorch()
    return program, metadata


def _check_it_runs(path, example: torch.Tensor) -> None:
    """XNNPACK checks a delegated graph only when the runtime builds it, and some of it
    only when it first runs: a program it refuses lowers and serializes, then fails at
    `load_method`, or at `execute` ("Propagating input shapes failed"), with a bare
    error code. Loading and running it once here makes either an export error, and no
    file."""
    from ..runtimes.executorch import ExecuTorchRunner

    stage = "load"
    try:
        runner = ExecuTorchRunner(path)
        stage = "run"
        runner(example.numpy())
    except Exception as exc:  # the runtime's errors are RuntimeErrors, its checks others
        raise LoweringFailed(
            f"the ExecuTorch runtime cannot {stage} the lowered program "
            f"({one_line(str(exc)) or type(exc).__name__}); "
            "XNNPACK refused part of its delegated graph"
        ) from exc


def export_executorch(job: ExportJob) -> ArtifactMetadata:
    """Write `job.output` (+ `.json`): the .pte and its record with the delegation report."""
    FORMATS["executorch"].import_backend("executorch.exir")
    example = torch.from_numpy(job.example)
    try:
        program, metadata = _program(job, example)
    except Exception as exc:  # many exception types; the first line is the news
        first = one_line(str(exc)) or type(exc).__name__
        raise LoweringFailed(f"ExecuTorch could not lower the model: {first}") from exc
    with atomic_artifact(job.output) as staged:
        staged.path.write_bytes(program.buffer)
        _check_it_runs(staged.path, example)
        staged.record = metadata.to_dict()
    return metadata
