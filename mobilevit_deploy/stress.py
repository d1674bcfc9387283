"""Stress weights: make every branch of a freshly built model contribute.

A fresh model hides fusion bugs: layer scales start at 1e-5 and BatchNorm statistics
at 0/1, so a wrong fold still matches. Order matters (docs/architecture.md):
1. draw every BN affine and layer scale near 1 in magnitude, every bias non-zero,
   every attention-bias table and learned window token;
2. only then calibrate BN running statistics with train-mode forwards over inputs
   (calibrating first lets activations explode once the branches switch on);
3. perturb the statistics, so a fold that ignores them (or uses the wrong eps) fails.
Without calibration the output barely depends on the input and a wrong network
would pass, so `check_sane_outputs` guards that too.

BatchNorms that a model initialises with zero weight close a residual branch (LeViT's
`bn_weight_init=0`). Drawn near 1, a dozen such branches in a row grow the activations
past what fp32 carries to 1e-5, so their scale is damped after step 3: they still
contribute (a wrong fold of them still fails) without making fp32 itself the error.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm
RESIDUAL_DAMPING = 0.3


def _is_scale_param(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "gamma" or "layer_scale" in name


def _draw_magnitude(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Values of magnitude in [0.5, 1.5] with random signs."""
    mag = 0.5 + torch.rand(shape, generator=gen)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.2, -1.0, 1.0)
    return mag * sign


@torch.no_grad()
def apply_stress_weights(model: nn.Module, calibration: torch.Tensor, seed: int = 0) -> nn.Module:
    """Stress `model` in place and return it in eval mode.

    `calibration` is a batch of model inputs (natural-looking images work best).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if _is_scale_param(name):
            p.copy_(_draw_magnitude(p.shape, gen))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen) + 0.02)
        elif "attention_bias" in name or name.endswith("win_tokens"):
            p.copy_(torch.randn(p.shape, generator=gen))
    norms = [m for m in model.modules() if isinstance(m, _BN)]
    closing = [bn for bn in norms if bn.weight is not None and not bn.weight.any()]
    for bn in norms:
        if bn.weight is not None:
            bn.weight.copy_(_draw_magnitude(bn.weight.shape, gen))
            bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=gen))
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    # Only the norms calibrate in train mode: dropout and stochastic depth would make
    # the statistics depend on the global RNG (SeaFormer's DropPath did: stressed models,
    # and every test on them, changed with whatever ran before in the process).
    model.eval()
    for bn in norms:
        bn.train()
    for chunk in calibration.split(4):
        model(chunk)
    for bn in norms:
        bn.momentum = 0.1
        std = bn.running_var.sqrt()
        bn.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=gen))
        bn.running_var.mul_(torch.empty(std.shape).uniform_(0.7, 1.4, generator=gen))
    for bn in closing:
        bn.weight.mul_(RESIDUAL_DAMPING)
        bn.bias.mul_(RESIDUAL_DAMPING)
    return model.eval()


def check_sane_outputs(outputs: np.ndarray | tuple[np.ndarray, ...]) -> list[str]:
    """Problems that would make an equivalence check meaningless; empty when fine.
    Several outputs (feature maps) are checked each, their problems named by index.

    Outputs must be finite, of sane magnitude, and clearly depend on the input: the
    spread across inputs must be a visible fraction of the output scale.
    """
    if isinstance(outputs, tuple):
        return [f"output {i}: {p}" for i, o in enumerate(outputs) for p in check_sane_outputs(o)]
    problems = []
    if not np.all(np.isfinite(outputs)):
        return ["outputs contain NaN or Inf"]
    scale = float(np.abs(outputs).max())
    if not 1e-3 < scale < 1e5:
        problems.append(f"output scale {scale:.3g} is outside [1e-3, 1e5]")
    if outputs.shape[0] >= 2:
        spread = float(np.abs(outputs - outputs.mean(axis=0, keepdims=True)).max())
        if spread < 1e-2 * max(scale, 1e-12):
            problems.append(
                f"outputs barely depend on the input (spread {spread:.3g} vs scale {scale:.3g})"
            )
    return problems
