"""Property-based tests of the fuse math: every fold equals the ops it replaces.

Checked in float64 so that any error above ~1e-10 is a real bug, over kernel sizes,
groups, strides, padding and eps.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mobilevit_deploy.models.layers import (
    MobileOneBlock,
    ReparamLargeKernelConv,
    RepConditionalPosEnc,
)
from mobilevit_deploy.reparam import fold_sequential_pairs, fuse

FAST = settings(max_examples=40, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Float64 throughout this module only: a global default would leak into other files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(n, generator=gen))
        bn.bias.copy_(torch.randn(n, generator=gen))
        bn.running_mean.copy_(torch.randn(n, generator=gen))
        bn.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.05)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize_bn(m, gen)
    return module.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-10 * max(b.abs().max().item(), 1.0)


groups_and_channels = st.sampled_from([(1, 4, 6), (2, 4, 6), (4, 4, 8), (3, 3, 3), (5, 5, 5)])


@FAST
@given(
    gc=groups_and_channels,
    k=st.sampled_from([1, 3, 5, 7]),
    stride=st.sampled_from([1, 2]),
    pad=st.integers(0, 3),
    eps=st.sampled_from([1e-7, 1e-5, 1e-3, 0.1]),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_conv_then_bn_folds_exactly(gc, k, stride, pad, eps, bias, seed):
    groups, cin, cout = gc
    seq = nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=bias),
        nn.BatchNorm2d(cout, eps=eps),
    )
    _randomize(seq, seed)
    x = torch.randn(2, cin, 11, 9, generator=torch.Generator().manual_seed(seed))
    expected = seq(x)
    assert fold_sequential_pairs(seq) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in seq.modules())
    assert _close(seq(x), expected)


@FAST
@given(
    fin=st.integers(1, 9),
    fout=st.integers(1, 9),
    eps=st.sampled_from([1e-7, 1e-5, 1e-3]),
    bias=st.booleans(),
    bn_first=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_linear_bn_pairs_fold_exactly(fin, fout, eps, bias, bn_first, seed):
    if bn_first:
        seq = nn.Sequential(nn.BatchNorm1d(fin, eps=eps), nn.Linear(fin, fout, bias=bias))
    else:
        seq = nn.Sequential(nn.Linear(fin, fout, bias=bias), nn.BatchNorm1d(fout, eps=eps))
    _randomize(seq, seed)
    x = torch.randn(5, fin, generator=torch.Generator().manual_seed(seed))
    expected = seq(x)
    assert fold_sequential_pairs(seq) == 1
    assert _close(seq(x), expected)


@FAST
@given(
    gc=groups_and_channels,
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    branches=st.integers(0, 3),
    scale_branch=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_mobileone_block_reparam_is_exact(gc, k, stride, branches, scale_branch, seed):
    groups, cin, cout = gc
    if branches == 0 and not (cin == cout and stride == 1):
        branches = 1  # a block needs at least one branch
    block = MobileOneBlock(
        cin,
        cout,
        k,
        stride,
        groups,
        use_act=False,
        use_scale_branch=scale_branch,
        num_conv_branches=branches,
    )
    _randomize(block, seed)
    x = torch.randn(2, cin, 10, 13, generator=torch.Generator().manual_seed(seed))
    expected = block(x)
    block.reparameterize()
    assert block.conv_kxk is None and block.identity is None
    assert _close(block(x), expected)
    weight = block.reparam_conv.weight.clone()
    block.reparameterize()  # idempotent
    assert torch.equal(block.reparam_conv.weight, weight)


@FAST
@given(
    k=st.sampled_from([5, 7, 9]),
    small=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    gc=st.sampled_from([(1, 4, 6), (4, 4, 8)]),
    seed=st.integers(0, 10_000),
)
def test_large_kernel_reparam_is_exact(k, small, stride, gc, seed):
    groups, cin, cout = gc
    conv = _randomize(ReparamLargeKernelConv(cin, cout, k, stride, groups, small), seed)
    x = torch.randn(2, cin, 15, 12, generator=torch.Generator().manual_seed(seed))
    expected = conv(x)
    conv.reparameterize()
    assert _close(conv(x), expected)


@FAST
@given(k=st.sampled_from([3, 5, 7]), dim=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_conditional_pos_enc_folds_residual(k, dim, seed):
    cpe = RepConditionalPosEnc(dim, k)
    x = torch.randn(1, dim, 9, 9, generator=torch.Generator().manual_seed(seed))
    expected = cpe(x)
    cpe.reparameterize()
    assert cpe.pos_enc is None
    assert _close(cpe(x), expected)


@FAST
@given(fin=st.integers(1, 8), fout=st.integers(1, 8), bias=st.booleans(), seed=st.integers(0, 9999))
def test_affine_before_linear_and_scaled_output(fin, fout, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias)
    scale, shift = torch.randn(fin, generator=gen), torch.randn(fin, generator=gen)
    gamma = torch.randn(fout, generator=gen)
    x = torch.randn(4, fin, generator=gen)
    w, b = fuse.fold_affine_before(lin.weight, lin.bias, scale, shift)
    assert _close(x @ w.T + b, lin(x * scale + shift))
    w, b = fuse.scale_output(lin.weight, lin.bias, gamma)
    assert _close(x @ w.T + b, lin(x) * gamma)


def test_bn_fold_uses_each_norms_own_eps():
    """EfficientViT-L uses eps 1e-7: a fold assuming 1e-5 must not pass silently."""
    bn = nn.BatchNorm2d(3, eps=1e-7)
    with torch.no_grad():
        bn.running_var.fill_(1e-6)
    scale, _ = fuse.bn_affine(bn)
    assert torch.allclose(scale, torch.full((3,), (1e-6 + 1e-7) ** -0.5, dtype=torch.float64))


def test_pad_kernel_rejects_uncentrable_sizes():
    with pytest.raises(ValueError):
        fuse.pad_kernel(torch.zeros(1, 1, 3, 3), 4)


def test_fold_casts_back_to_the_layer_dtype():
    conv = nn.Conv2d(2, 2, 3, bias=False).float()
    seq = nn.Sequential(conv, nn.BatchNorm2d(2).float()).eval()
    fold_sequential_pairs(seq)
    assert seq[0].weight.dtype == torch.float32 and seq[0].bias.dtype == torch.float32
