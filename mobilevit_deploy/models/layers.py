"""Blocks shared by the families: MobileOne-style multi-branch convs, the RepLKNet
large-kernel conv, squeeze-excite, layer scale, conditional position encoding.

Module and parameter names follow timm, so timm state dicts load without remapping.
Each reparameterizable block implements the protocol of reparam/engine.py:
`reparameterize()` is in place, exact in eval mode and a no-op the second time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..errors import BadInput
from ..reparam import fuse


def conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
    """Conv (no bias) + BatchNorm as a Sequential named like timm's ConvNormAct.

    A Sequential so that the generic Conv->BN pass of the engine folds it.
    """
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(
                in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
            ),
            bn=nn.BatchNorm2d(out_chs),
        )
    )


def deploy_conv(
    weight: Tensor, bias: Tensor, stride: int, groups: int, replaces: nn.Module
) -> nn.Conv2d:
    """The single 'same'-padded conv (odd kernel) holding a fused kernel and bias.

    It takes the dtype of the block it `replaces`, so a float64 model fuses into a
    float64 one (verify checks the fuse math alone that way).
    """
    out_chs, in_per_group, k, _ = weight.shape
    dtype = next(replaces.parameters()).dtype
    conv = nn.Conv2d(in_per_group * groups, out_chs, k, stride, k // 2, groups=groups, dtype=dtype)
    return fuse.assign(conv, weight, bias)


def _conv_bn_kernel(branch: nn.Sequential) -> tuple[Tensor, Tensor]:
    return fuse.fold_bn_after(branch.conv.weight, branch.conv.bias, branch.bn)


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite (ReLU inside, sigmoid gate) with a global mean pool."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class MobileOneBlock(nn.Module):
    """Identity-BN + k x k conv-BN branches + 1x1 conv-BN branch, summed.

    Deploy form: one k x k conv with bias (`reparam_conv`), RepVGG style.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.groups = in_chs, out_chs, groups
        self.kernel_size, self.stride = kernel_size, stride
        self.reparam_conv: nn.Conv2d | None = None
        has_identity = in_chs == out_chs and stride == 1
        self.identity = nn.BatchNorm2d(in_chs) if has_identity else None
        self.conv_kxk = (
            nn.ModuleList(
                conv_bn(in_chs, out_chs, kernel_size, stride, groups)
                for _ in range(num_conv_branches)
            )
            if num_conv_branches > 0
            else None
        )
        self.conv_scale = (
            conv_bn(in_chs, out_chs, 1, stride, groups)
            if kernel_size > 1 and use_scale_branch
            else None
        )
        self.se = SqueezeExcite(out_chs, round(out_chs / 16)) if use_se else nn.Identity()
        self.act = nn.GELU() if use_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        out = self.identity(x) if self.identity is not None else 0
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.conv_kxk is not None:
            for branch in self.conv_kxk:
                out = out + branch(x)
        return self.act(self.se(out))

    def fused_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The single conv equal to all branches, in float64."""
        if self.reparam_conv is not None:
            return self.reparam_conv.weight.to(fuse.F64), self.reparam_conv.bias.to(fuse.F64)
        k = self.kernel_size
        weight = torch.zeros(self.out_chs, self.in_chs // self.groups, k, k, dtype=fuse.F64)
        bias = torch.zeros(self.out_chs, dtype=fuse.F64)
        if self.identity is not None:
            scale, shift = fuse.bn_affine(self.identity)
            eye = fuse.identity_kernel(self.in_chs, self.groups, k)
            w, b = fuse.scale_output(eye, None, scale, shift)
            weight, bias = weight + w, bias + b
        if self.conv_scale is not None:
            w, b = _conv_bn_kernel(self.conv_scale)
            weight, bias = weight + fuse.pad_kernel(w, k), bias + b
        for branch in self.conv_kxk or ():
            w, b = _conv_bn_kernel(branch)
            weight, bias = weight + w, bias + b
        return weight, bias

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weight, bias = self.fused_kernel_bias()
        self.reparam_conv = deploy_conv(weight, bias, self.stride, self.groups, self)
        self.identity = self.conv_kxk = self.conv_scale = None


class ReparamLargeKernelConv(nn.Module):
    """Large k x k conv-BN plus a small 3x3 conv-BN in parallel (RepLKNet)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        groups: int,
        small_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.groups = in_chs, out_chs, groups
        self.kernel_size, self.stride = kernel_size, stride
        self.reparam_conv: nn.Conv2d | None = None
        self.large_conv = conv_bn(in_chs, out_chs, kernel_size, stride, groups)
        self.small_conv = conv_bn(in_chs, out_chs, small_kernel, stride, groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.large_conv(x) + self.small_conv(x)

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weight, bias = _conv_bn_kernel(self.large_conv)
        small_w, small_b = _conv_bn_kernel(self.small_conv)
        weight = weight + fuse.pad_kernel(small_w, self.kernel_size)
        self.reparam_conv = deploy_conv(weight, bias + small_b, self.stride, self.groups, self)
        self.large_conv = self.small_conv = None


class RepConditionalPosEnc(nn.Module):
    """Conditional position encoding x + dwconv(x); deploy form: one conv (W + I)."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.reparam_conv: nn.Conv2d | None = None
        self.pos_enc = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        eye = fuse.identity_kernel(self.dim, self.dim, self.kernel_size)
        weight = self.pos_enc.weight.to(fuse.F64) + eye
        self.reparam_conv = fuse.conv_like(self.pos_enc, weight, self.pos_enc.bias.to(fuse.F64))
        self.pos_enc = None


class ClassifierHead(nn.Module):
    """Global average pool + Linear, named like timm's ClassifierHead (`head.fc`).

    With no classes (timm's num_classes=0, a backbone) the pooled features come out."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


class FeatureStages:
    """A classifier that can return its stages' feature maps instead of its head, as
    timm's `features_only` does: the inputs of a detection or segmentation neck.

    A family implements `stage_info()` (stride and channels of every stage, in order)
    and `forward_stages(x, last)` (NCHW maps of stages 0..last); its forward returns
    `feature_outputs(x)` once `select_features` has been called. The weights and their
    names do not change, so a classifier's checkpoint loads as it is.
    """

    features: tuple[int, ...] | None = None

    def stage_info(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def forward_stages(self, x: Tensor, last: int) -> list[Tensor]:
        raise NotImplementedError

    def select_features(self, indices: tuple[int, ...]) -> None:
        stages = len(self.stage_info())
        if not indices or any(not 0 <= i < stages for i in indices):
            raise BadInput(
                f"feature stages {list(indices)} do not exist; this model has stages "
                f"0-{stages - 1} (strides {', '.join(str(s) for s, _ in self.stage_info())})"
            )
        self.features = tuple(sorted(set(indices)))

    def feature_outputs(self, x: Tensor) -> tuple[Tensor, ...]:
        assert self.features is not None
        stages = self.forward_stages(x, self.features[-1])
        return tuple(stages[i] for i in self.features)
