"""All fuse math of the project, in one place.

Every function computes in float64 and returns float64 tensors; `conv_like` and
`linear_like` cast back to the module's dtype once, at the end. Folding in float32
alone costs ~4e-4 of the output scale on a stressed LeViT-128S, float64 ~4e-12
(docs/architecture.md), and a fold is done once per export, so the cost is irrelevant.

Conventions: a kernel is (out, in/groups, kh, kw); an "affine" is a per-channel
(scale, shift) pair meaning y = x * scale + shift.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

F64 = torch.float64


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm as y = x * scale + shift, with the norm's own eps."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    mean = bn.running_mean.to(F64)
    var = bn.running_var.to(F64)
    gamma = bn.weight.to(F64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(F64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def scale_output(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor | None = None):
    """Fold y = layer(x) * scale + shift into the layer: scales each output channel."""
    w = weight.to(F64)
    b = bias.to(F64) if bias is not None else torch.zeros(w.shape[0], dtype=F64)
    s = scale.to(F64).reshape(-1)
    w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    b = b * s
    if shift is not None:
        b = b + shift.to(F64).reshape(-1)
    return w, b


def fold_bn_after(weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """Conv/Linear followed by BatchNorm -> one Conv/Linear."""
    scale, shift = bn_affine(bn)
    return scale_output(weight, bias, scale, shift)


def fold_affine_before(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor):
    """y = layer(x * scale + shift) with a per-input-channel affine -> one layer.

    Exact for a Linear and for a 1x1 or unpadded conv with groups=1; with zero padding
    the shift would wrongly reach the padded border, so callers must not use it there.
    """
    w = weight.to(F64)
    b = bias.to(F64) if bias is not None else torch.zeros(w.shape[0], dtype=F64)
    s = scale.to(F64).reshape(-1)
    t = shift.to(F64).reshape(-1)
    in_shape = [1, -1] + [1] * (w.dim() - 2)
    b = b + (w * t.reshape(in_shape)).sum(dim=tuple(range(1, w.dim())))
    return w * s.reshape(in_shape), b


def identity_kernel(channels: int, groups: int, kernel_size: int | tuple[int, int]) -> Tensor:
    """The kernel of a conv that returns its input (channels in = channels out)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    per_group = channels // groups
    k = torch.zeros(channels, per_group, kh, kw, dtype=F64)
    idx = torch.arange(channels)
    k[idx, idx % per_group, kh // 2, kw // 2] = 1.0
    return k


def pad_kernel(kernel: Tensor, kernel_size: int | tuple[int, int]) -> Tensor:
    """Zero-pad a centred small kernel to a larger odd size (same stride, same centre)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dh, dw = kh - kernel.shape[-2], kw - kernel.shape[-1]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"cannot centre a {tuple(kernel.shape[-2:])} kernel in {(kh, kw)}")
    return nn.functional.pad(kernel, [dw // 2, dw // 2, dh // 2, dh // 2])


def conv_like(template: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """A new Conv2d with the template's geometry, holding the fused (cast) tensors."""
    dtype, device = template.weight.dtype, template.weight.device
    conv = nn.Conv2d(
        template.in_channels,
        template.out_channels,
        template.kernel_size,
        stride=template.stride,
        padding=template.padding,
        dilation=template.dilation,
        groups=template.groups,
        bias=bias is not None,
        padding_mode=template.padding_mode,
        device=device,
        dtype=dtype,
    )
    return assign(conv, weight, bias).train(template.training)


def linear_like(template: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    dtype, device = template.weight.dtype, template.weight.device
    lin = nn.Linear(
        template.in_features,
        template.out_features,
        bias=bias is not None,
        device=device,
        dtype=dtype,
    )
    return assign(lin, weight, bias).train(template.training)


def assign(layer: nn.Conv2d | nn.Linear, weight: Tensor, bias: Tensor | None):
    """Copy fused float64 tensors into a layer, cast once to the layer's dtype."""
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
    return layer


def combine_linears(
    layers: list[tuple[Tensor, Tensor | None]], coefficients: list[float]
) -> tuple[Tensor, Tensor]:
    """sum_i c_i * layer_i(x) for parallel layers reading the same x -> one layer.

    Exact for Linears (and convs of equal geometry): the output is linear in the
    weights. LeViT's two classifier heads, averaged at inference, become one Linear.
    """
    if not layers or len(layers) != len(coefficients):
        raise ValueError("need one coefficient per layer, and at least one layer")
    shape = layers[0][0].shape
    weight = torch.zeros(shape, dtype=F64)
    bias = torch.zeros(shape[0], dtype=F64)
    for (w, b), c in zip(layers, coefficients, strict=True):
        if w.shape != shape:
            raise ValueError(
                f"cannot combine weights of shapes {tuple(shape)} and {tuple(w.shape)}"
            )
        weight = weight + float(c) * w.to(F64)
        if b is not None:
            bias = bias + float(c) * b.to(F64)
    return weight, bias


def dense_bias_table(table: Tensor, index: Tensor) -> Tensor:
    """table[:, index] in float64: a (heads, n) bias table gathered to (heads, *index.shape).

    Done once at reparam time, so the deployed graph adds a constant instead of
    gathering on every call (a Gather that some converters and delegates reject).
    """
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an integer tensor, got {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= table.shape[-1]):
        raise ValueError(f"index out of range for a table of {table.shape[-1]} entries")
    return table.to(F64)[:, index]


def concat_output_channels(layers: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
    """Parallel layers reading the same input -> one layer whose outputs are theirs, stacked.

    Exact: each output channel keeps its own kernel and bias. Layers must agree on every
    dimension but the first (SeaFormer's q, k and v 1x1 convs become one).
    """
    if not layers:
        raise ValueError("need at least one layer")
    rest = layers[0][0].shape[1:]
    if any(w.shape[1:] != rest for w, _ in layers):
        shapes = [tuple(w.shape) for w, _ in layers]
        raise ValueError(f"layers differ beyond their output channels: {shapes}")
    weight = torch.cat([w.to(F64) for w, _ in layers])
    bias = torch.cat(
        [b.to(F64) if b is not None else torch.zeros(w.shape[0], dtype=F64) for w, b in layers]
    )
    return weight, bias


def resample_linear_1d(table: Tensor, length: int) -> Tensor:
    """A (..., C, n) table linearly resampled to `length` (align_corners=False), float64.

    What F.interpolate(table, size=length, mode="linear") computes on every call of a
    SeaFormer axial positional embedding, done once so the deployed graph adds a constant.
    """
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    t = table.detach().to(F64)
    flat = t.reshape(-1, 1, t.shape[-1])
    out = nn.functional.interpolate(flat, size=length, mode="linear", align_corners=False)
    return out.reshape(*t.shape[:-1], length)
