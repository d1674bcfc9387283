"""The reparameterization engine: the module protocol, then a generic folding pass.

Protocol. A module with a deploy form implements `reparameterize(self)`: in place,
exact in eval mode, a no-op when called again. This gives the deploy form the
official repositories ship (Apple's `_reparam` checkpoints load into it). A module
may also implement `fold_affine(self)` for folds that go further than the official
code (layer scales, a BatchNorm in front of a Linear). timm's `fuse()` and
`switch_to_deploy()` are honoured, so third-party models benefit too.

Generic pass. After the protocol, any Conv->BN, Linear->BN and BN->Linear pair left
adjacent inside an nn.Sequential is folded. The pass only trusts Sequential order:
for other containers it cannot know the call order from the module tree.
"""

from __future__ import annotations

import copy

from torch import nn

from . import fuse

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_THIRD_PARTY_HOOKS = ("fuse", "switch_to_deploy")


def _call_protocol(module: nn.Module, method: str) -> nn.Module:
    """Call `method` on every module, children before parents (a parent sees its
    children fused); returns `module`, or what replaces it.

    A hook may return its replacement: timm's `fuse()` builds a new layer and returns
    it (its LeViT and RepViT-style ConvNorm/LinearNorm), which then takes the module's
    place in its parent. An in-place hook returns None (or the module itself). A
    submodule that happens to be named like a hook is not one.
    """
    for name, child in list(module._modules.items()):
        if child is not None:
            replaced = _call_protocol(child, method)
            if replaced is not child:
                module._modules[name] = replaced
    hook = getattr(module, method, None)
    if callable(hook) and not isinstance(hook, nn.Module):
        result = hook()
        if isinstance(result, nn.Module) and result is not module:
            return result
    return module


def _fold_pair(first: nn.Module, second: nn.Module) -> nn.Module | None:
    """The single layer equal to first-then-second, or None when not foldable."""
    if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
        w, b = fuse.fold_bn_after(first.weight, first.bias, second)
        return fuse.conv_like(first, w, b)
    if isinstance(first, nn.Linear) and isinstance(second, nn.BatchNorm1d):
        w, b = fuse.fold_bn_after(first.weight, first.bias, second)
        return fuse.linear_like(first, w, b)
    if isinstance(first, nn.BatchNorm1d) and isinstance(second, nn.Linear):
        w, b = fuse.fold_affine_before(second.weight, second.bias, *fuse.bn_affine(first))
        return fuse.linear_like(second, w, b)
    return None


def fold_sequential_pairs(model: nn.Module) -> int:
    """Fold adjacent foldable pairs in every Sequential; returns how many were folded."""
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        i = 0
        while i < len(names) - 1:
            first, second = seq._modules[names[i]], seq._modules[names[i + 1]]
            merged = _fold_pair(first, second) if first is not None and second is not None else None
            if merged is None:
                i += 1
                continue
            # The merged layer takes the place (and the name) of the weighted layer.
            keep, drop = (i, i + 1) if not isinstance(first, _BN) else (i + 1, i)
            seq._modules[names[keep]] = merged
            seq._modules[names[drop]] = nn.Identity()
            folded += 1
            i += 2
    return folded


def reparameterize(
    model: nn.Module,
    *,
    fold_affine: bool = True,
    image_size: tuple[int, int] | None = None,
) -> nn.Module:
    """The deployable form of `model`, computed on a deep copy in eval mode.

    `fold_affine=False` stops at the official deploy form (what Apple's and timm's
    `reparameterize_model` produce); the default folds every BatchNorm and layer
    scale that can be folded exactly. The caller's model is never modified.

    `image_size` (H, W) is for models whose fused form is tied to one resolution
    (SeaFormer precomputes its positional embeddings): a model with a
    `set_export_resolution(h, w)` method is told the size before anything is folded.
    """
    deployed = copy.deepcopy(model).eval()
    set_resolution = getattr(deployed, "set_export_resolution", None)
    if image_size is not None and callable(set_resolution):
        set_resolution(*image_size)
    deployed = _call_protocol(deployed, "reparameterize")
    for hook in _THIRD_PARTY_HOOKS:
        deployed = _call_protocol(deployed, hook)
    if fold_affine:
        deployed = _call_protocol(deployed, "fold_affine")
        fold_sequential_pairs(deployed)
    for p in deployed.parameters():
        p.requires_grad_(False)
    return deployed


def training_leftovers(model: nn.Module) -> list[str]:
    """Names of modules that still carry training-only structure after reparam.

    BatchNorm layers, and protocol modules whose train-time branches are still there.
    Empty for every model in the zoo; a third-party model may legitimately keep a BN
    that follows a non-linear op.
    """
    left = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            left.append(f"{name} (BatchNorm)")
        elif (
            callable(getattr(module, "reparameterize", None))
            and getattr(module, "reparam_conv", True) is None
        ):
            left.append(f"{name} (multi-branch {type(module).__name__})")
    return left
