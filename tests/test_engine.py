"""The reparam engine on third-party modules: timm's hook conventions (issue 14)."""

from __future__ import annotations

import torch
from torch import nn

from mobilevit_deploy.reparam import reparameterize, training_leftovers


class TimmConvNorm(nn.Sequential):
    """timm's LeViT / RepViT ConvNorm: `fuse()` builds the fused conv and *returns* it,
    leaving itself as it was (timm's own reparameterize swaps it in)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        w = bn.weight / (bn.running_var + bn.eps) ** 0.5
        fused = nn.Conv2d(c.in_channels, c.out_channels, 3, padding=1, dtype=c.weight.dtype)
        fused.weight.copy_(c.weight * w[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * w)
        return fused


class InPlaceDeploy(nn.Module):
    """A `switch_to_deploy()` that works in place and returns nothing (RepVGG style)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.deployed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.deployed else x * self.scale / self.scale

    def switch_to_deploy(self) -> None:
        self.deployed = True


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = TimmConvNorm(3, 8)
        self.body = nn.ModuleList([TimmConvNorm(8, 8), InPlaceDeploy()])
        # A submodule that is named like a hook must not be called as one.
        self.fuse = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.body:
            x = block(x)
        return self.fuse(x)


def _stressed(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data = 0.5 + torch.rand(bn.weight.shape, generator=gen)
        bn.bias.data = torch.randn(bn.bias.shape, generator=gen)
        bn.running_mean = torch.randn(bn.running_mean.shape, generator=gen)
        bn.running_var = 0.5 + torch.rand(bn.running_var.shape, generator=gen)
    return model.eval()


def test_a_fuse_that_returns_its_replacement_is_swapped_in():
    """The engine dropped fuse()'s return value: both ConvNorms stayed unfused."""
    model = _stressed(Net()).double()
    fused = reparameterize(model)
    assert isinstance(fused.stem, nn.Conv2d) and isinstance(fused.body[0], nn.Conv2d)
    assert fused.body[1].deployed and not model.body[1].deployed
    assert training_leftovers(fused) == []
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), rtol=0, atol=1e-12)


def test_a_root_module_whose_fuse_returns_a_replacement_is_replaced():
    model = _stressed(TimmConvNorm(3, 4))
    fused = reparameterize(model)
    assert isinstance(fused, nn.Conv2d)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
