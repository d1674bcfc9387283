"""Reading checkpoints as untrusted input, and loading them into the right form.

Checkpoints come from the internet, so nothing here ever unpickles code: `.pt/.pth`
files go through `torch.load(weights_only=True)`, `.safetensors` through safetensors.
A checkpoint may hold any of three forms of a model, told apart by its keys:
  train   the training-time form (official unfused files, timm);
  deploy  the official reparameterized form (Apple's `_reparam` files);
  fused   this tool's fully folded form (what `mvd reparam` writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .configure import Carried, configure
from .errors import BadInput, CheckpointMismatch
from .registry import ModelSpec
from .reparam import reparameterize

# Wrapper keys of training scripts, in order of preference (EMA weights evaluate best).
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
FORMS = ("train", "deploy", "fused")
_LIST_LIMIT = 8


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from; copied into every artifact's metadata."""

    source: str
    sha256: str | None
    form: str
    wrapper_key: str | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Plain data holders that official checkpoints carry next to their tensors (SeaFormer's
# classification files store the trainer's argparse arguments under `args`). Allowing
# them runs no code: unpickling one only sets attributes on an empty object.
SAFE_GLOBALS = (argparse.Namespace,)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpickling_problem(path: Path, exc: pickle.UnpicklingError) -> BadInput:
    """Tell a pickle that carries code apart from a file that is not a pickle at all.

    torch words both as "Weights only load failed"; only the first names a global. A
    text file comes first: "cat" on a labels file's first line reads as the pickle
    opcode GLOBAL, and "its pickle would call at.dog" would mislead.
    """
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused and _text_start(path) is None:
        return BadInput(
            f"{path}: refused, its pickle would call {refused.group(1)}; checkpoints are "
            "untrusted, so only tensors and plain containers are read (nothing was run)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = detail.group(1) if detail else _first_line(exc)
    return _not_a_checkpoint(path, f"not a readable checkpoint ({reason[:160]})")


# What a checkpoint file begins with: torch.save's zip, an older torch.save's pickle
# (protocol 2 and up open with the PROTO opcode), or safetensors' header length.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
# Bytes a text file holds besides printable characters: tab, newlines, form feed.
_TEXT_CONTROLS = frozenset("\t\n\r\f")
_SNIFF_BYTES = 512


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_SNIFF_BYTES)
    except OSError:
        return b""


def _text_start(path: Path) -> str | None:
    """The first line of `path` if it is a text file (UTF-8 without control bytes)."""
    head = _head(path)
    # A multi-byte character cut at the end of the sample is still text.
    text = head.decode("utf-8", errors="ignore")
    if len(text.encode()) < len(head) - 3 or not text.strip():
        return None
    if any(not c.isprintable() and c not in _TEXT_CONTROLS for c in text):
        return None
    return text.strip().split("\n", 1)[0].strip()[:40]


def _not_a_checkpoint(path: Path, reason: str) -> BadInput:
    """What the file plainly is, when a reader refused it; the reader's own words only
    for a file that looks like a checkpoint (a cut or damaged one). A text file given
    as weights is a labels list, a README or an HTML error page saved in place of a
    download, and torch's complaint about it ("101") would say nothing."""
    start = _text_start(path)
    if start is not None:
        return BadInput(
            f"{path} is a text file (it begins {start!r}), not a PyTorch or safetensors checkpoint"
        )
    if path.suffix != ".safetensors" and not _head(path).startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        return BadInput(
            f"{path}: not a readable checkpoint (neither the zip nor the pickle that "
            "torch.save writes)"
        )
    return BadInput(f"{path}: {reason}")


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_problem(path, exc) from None
    except Exception as exc:
        # torch's legacy unpickler leaks struct.error, IndexError, KeyError... on garbage;
        # any failure to parse untrusted bytes is bad input.
        first = _first_line(exc).split(". ", 1)[0]  # torch's advice after it is for its devs
        reason = f"not a readable checkpoint ({first[:160]})"
        raise _not_a_checkpoint(path, reason) from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _not_a_checkpoint(path, f"not a readable safetensors file ({exc})") from None


def unwrap(obj: object, origin: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensor dict inside a training script's checkpoint, and the key it sat under."""
    state, wrapper = _inside_wrapper(obj)
    _check_state_dict(state, origin)
    return _without_wrapper_prefixes(state), wrapper


def _inside_wrapper(obj: object) -> tuple[object, str | None]:
    """The first non-empty dict under a WRAPPER_KEYS key, in their order of preference,
    or `obj` itself: a bare state dict has none of them."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict) and obj[key]:
                return obj[key], key
    return obj, None


def _check_state_dict(obj: object, origin: str) -> None:
    """Refuse, naming the offending keys, anything but a non-empty dict of names to dense
    CPU tensors: the loader and every exporter assume one, and untrusted files may hold
    anything a pickle can."""
    if not isinstance(obj, dict) or not obj:
        raise BadInput(f"{origin}: no state dict found (expected a dict of tensors)")
    odd_keys = [repr(k) for k in obj if not isinstance(k, str)]
    if odd_keys:
        raise BadInput(f"{origin}: not a state dict, keys that are not names: {_names(odd_keys)}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BadInput(f"{origin}: not a state dict, non-tensor entries: {_names(bad)}")
    unusable = [k for k, v in obj.items() if v.layout != torch.strided or v.device.type != "cpu"]
    if unusable:
        raise BadInput(
            f"{origin}: sparse or storage-less tensors cannot be weights: {_names(unusable)}"
        )


# Prefixes that wrappers add to every key: DataParallel/DDP's module, then torch.compile's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each of _WRAPPER_PREFIXES removed, in turn, where every key has it
    (a DDP-wrapped compiled model's keys begin `module._orig_mod.`)."""
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a checkpoint file safely; returns (state dict, wrapper key or None)."""
    state, wrapper, _ = read_checkpoint_file(path)
    return state, wrapper


def carried_class_names(raw: object) -> tuple[str, ...] | None:
    """Class names an mmseg checkpoint keeps beside its weights: `meta.CLASSES`
    (mmseg 0.x, SeaFormer's) or `meta.dataset_meta.classes` (mmseg 1.x)."""
    meta = raw.get("meta") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


# A URL's scheme: two letters at least, so that a Windows drive (C:/) is a path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")
DOWNLOADED_SCHEMES = ("http", "https")


def check_weights_source(weights: str | Path) -> None:
    """Refuse a --weights URL that cannot be downloaded, by its scheme. Only http and
    https are fetched; any other (ftp, s3, hf) would otherwise be read as a local path
    (pathlib folds its `//`) and reported as a missing file."""
    text = str(weights)
    scheme = _SCHEME.match(text)
    if scheme and scheme.group(1) not in DOWNLOADED_SCHEMES and not Path(text).exists():
        raise BadInput(
            f"--weights {text}: {scheme.group(1)}:// URLs are not supported; give a "
            "checkpoint file, a hub folder or an http:// or https:// URL"
        )


def read_checkpoint_file(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], str | None, tuple[str, ...] | None]:
    """read_checkpoint, plus the class names the file carries (or None)."""
    check_weights_source(path)
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a directory; --weights takes a checkpoint file or URL")
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file, not a checkpoint")
    raw = _load_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
    state, wrapper = unwrap(raw, str(path))
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not _finite(v)]
    if nonfinite:
        raise BadInput(f"{path}: NaN or Inf values in {_names(nonfinite)}")
    return state, wrapper, carried_class_names(raw)


def _finite(tensor: torch.Tensor) -> bool:
    """isfinite has no float8 kernels; widening is exact for every float format."""
    if tensor.dtype.itemsize == 1:
        tensor = tensor.float()
    return bool(tensor.isfinite().all())


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f" and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else "")


def build_form(spec: ModelSpec, form: str) -> nn.Module:
    """An empty model of `spec` in the given form (deploy and fused are derived)."""
    model = spec.build()
    if form == "train":
        return model
    return reparameterize(model, fold_affine=form == "fused")


def detect_form(spec: ModelSpec, state: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
    """The form whose key set best matches the checkpoint, and an empty model of it."""
    best: tuple[float, str, nn.Module] | None = None
    keys = set(state)
    for form in FORMS:
        model = build_form(spec, form)
        expected = set(model.state_dict())
        score = len(keys & expected) / len(keys | expected)
        if best is None or score > best[0]:
            best = (score, form, model)
        if score == 1.0:
            break
    assert best is not None
    return best[1], best[2]


def load_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Strict load that names every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    # A float checkpoint of another precision (fp16, bf16) is cast on load; integer or
    # boolean values where the model has float weights are no weights at all.
    kinds = [
        f"{k} ({str(state[k].dtype).removeprefix('torch.')})"
        for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if missing or unexpected or shapes or kinds:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_names(shapes)}")
        if kinds:
            parts.append(f"not float values: {_names(kinds)}")
        raise CheckpointMismatch(f"{origin} does not fit the model; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_into_spec(
    spec: ModelSpec,
    path: Path,
    source: str | None = None,
    *,
    carried: Carried | None = None,
    **config,
) -> nn.Module:
    """Read `path`, remap a foreign layout, size the model by it (configure.py), pick
    the form, load strictly. `config`: configure's num_classes, image_size, labels,
    features; `carried`: what a hub folder's config says."""
    state, wrapper, names = read_checkpoint_file(path)
    if spec.remap_state_dict is not None:
        state = spec.remap_state_dict(state)
    carried = carried or Carried()
    if names is not None and carried.class_names is None:
        carried = dataclasses.replace(
            carried, class_names=names, class_names_from=f"{path.name}'s meta"
        )
    spec, state = configure(spec, state, carried=carried, **config)
    form, model = detect_form(spec, state)
    load_state(model, state, str(path))
    model.mvd_provenance = Provenance(source or str(path), file_sha256(path), form, wrapper)
    model.mvd_spec = spec
    return model.eval()
