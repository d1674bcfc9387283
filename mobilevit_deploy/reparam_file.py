"""`mvd reparam`: fuse a model and save the deployable weights.

The file holds only tensors plus a small metadata dict, so it loads with
`torch.load(weights_only=True)` and, through `load_model(name, weights=...)`, back
into the fused form (recognised by its keys). A quick check on natural-looking
images compares the fused and unfused model before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import api
from .errors import BadInput, VerificationFailed
from .files import atomic_path, check_output_file
from .info import count_params
from .judge import DEFAULT_TOLERANCES
from .metrics import compare
from .reparam import reparameterize, training_leftovers
from .request import Request
from .runtimes.torch_runtime import TorchRunner

CHECK_INPUTS = 4


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reparam_to_file(name: str, output: Path, *, request: Request | None = None, **options) -> dict:
    """Fuse the model the request builds (its weights, size, head, labels, features) and
    write its weights; `options` are Request fields (request.py)."""
    request = Request.of(request, **options)
    if output.suffix not in (".pt", ".pth", ".safetensors"):
        raise BadInput(f"{output}: choose a .pt, .pth or .safetensors file name")
    check_output_file(output)
    model = api.load_model(name, request.weights, **request.model_options)
    spec = model.mvd_spec  # the checkpoint's model: its head, a LeViT's grid
    fused = reparameterize(model, image_size=spec.input_hw)
    leftovers = training_leftovers(fused)
    x = api.example_input(spec, spec.input_hw, CHECK_INPUTS)
    metrics = compare(
        TorchRunner(model, torch.float64)(x), TorchRunner(fused, torch.float64)(x), spec.output_kind
    )
    if leftovers or metrics.max_rel > DEFAULT_TOLERANCES["fp32"]:
        raise VerificationFailed(
            f"fusing {spec.name} changed its output by {metrics.max_rel:.2e} of the scale"
            + (f"; left unfused: {', '.join(leftovers)}" if leftovers else "")
        )
    state = {k: v.contiguous() for k, v in fused.state_dict().items()}
    provenance = model.mvd_provenance
    meta = {"model": spec.name, "form": "fused", "weights": provenance.source if provenance else ""}
    with atomic_path(output) as tmp:
        if output.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=meta)
        else:
            torch.save({"state_dict": state, "mvd": meta}, tmp)
    return {
        "model": spec.name,
        "output": str(output),
        "params_before": count_params(model),
        "params_after": count_params(fused),
        "batchnorms_before": _count_bn(model),
        "check_inputs": CHECK_INPUTS,
        "max_rel": metrics.max_rel,
        "weights": meta["weights"] or "random initialisation",
    }
