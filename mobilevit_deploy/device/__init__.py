"""Run exported files on another machine: a device is a command that starts a Python there.

`--device 'ssh pi@raspberrypi python3'`, `--device python3`, or `--device arm64` (the
emulated ARM root, arm64.py). The device needs numpy and the format's runtime only; the
reference and the judging stay here. One Python per device for the life of the process,
so each file is sent once and every inference after it is a round trip of arrays.
A device that lacks the runtime, or dies mid-run, is a BackendUnavailable (exit 3).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shlex
import weakref
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, BadInput
from ..files import sidecar_path
from ..machine import stamp_line
from . import arm64
from .session import DeviceLost, Session

__all__ = [
    "DeviceLost",
    "RemoteRunner",
    "describe",
    "device_facts",
    "is_emulated",
    "open_remote_runner",
]

_sessions: dict[str, Session] = {}


def session(device: str) -> Session:
    """The running Python of `device`, started on first use."""
    if device not in _sessions or _sessions[device].process.poll() is not None:
        if arm64.is_alias(device):
            argv = arm64.command(device)
        else:
            argv = shlex.split(device)
            if not argv:
                raise BadInput("--device is empty; give a command that starts a Python")
        _sessions[device] = Session(device, argv)
    return _sessions[device]


@atexit.register
def _close_all() -> None:
    for s in _sessions.values():
        s.close()
    _sessions.clear()


def device_facts(device: str) -> dict:
    """What the device says about itself: machine, CPU (cpuinfo, HWCAP features, MIDR),
    Python and runtime versions."""
    return session(device).facts


def describe(device: str) -> dict:
    """`mvd doctor --device`: the device's stamp, what its CPU means for the reduced
    precisions, and which formats' files it can run (or what to pip install there)."""
    from .remote_runner import PIP_NAMES
    from .stamp import device_stamp

    facts = device_facts(device)
    stamp = device_stamp(facts)
    versions = facts.get("versions", {})
    formats = []
    for fmt, (_module, pip) in PIP_NAMES.items():
        dist = pip.partition("==")[0]
        formats.append(
            {
                "name": fmt,
                "runtime": dist,
                "version": versions.get(dist),
                "install": None if versions.get(dist) else f"pip install {pip} (there)",
            }
        )
    return {
        "device": device,
        "machine": stamp,
        "machine_line": stamp_line(stamp),
        "emulated": stamp["emulated"],
        "notes": stamp["notes"],
        "formats": formats,
    }


def is_emulated(facts: dict) -> bool:
    """Under qemu-user a timing measures the emulator, not the core it emulates."""
    return bool(facts.get("qemu_cpu"))


def _litert_options(format_name: str, path: Path) -> dict:
    """What the device's LiteRT runner needs of the file's record, resolved here as
    runtimes/litert.py resolves it: the output order, the input layout, and the
    normalisation a file with it inside takes back (the caller speaks normalised NCHW)."""
    if format_name != "tflite":
        return {}
    from ..records import layout_of
    from ..runtimes.litert import file_facts, read_metadata

    meta = read_metadata(path)
    if not meta and sidecar_path(path).is_file():
        meta = json.loads(sidecar_path(path).read_text())
    layout = meta.get("input_layout") or layout_of(file_facts(path)["input_shape"])
    inside = meta.get("normalize_inside")
    return {
        "output_names": meta.get("output_names"),
        "nhwc": layout == "NHWC",
        "normalization": [meta["mean"], meta["std"]] if inside else None,
    }


class RemoteRunner:
    """A file loaded on a device: numpy (NCHW batch) in, numpy out, like the local runners."""

    def __init__(
        self, format_name: str, path: Path | str, threads: int | None, device: str
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"--device runs single files; {path} is not one")
        meta = _litert_options(format_name, path)
        self.device = device
        self._session = session(device)
        self.facts = self._session.facts
        self.options = {"device": device, "threads": threads or 0}
        header = {
            "op": "load",
            "format": format_name,
            "suffix": path.suffix,
            "threads": threads or 0,
            "meta": meta,
        }
        answer, _ = self._checked(header, path.read_bytes())
        self.handle = answer["handle"]
        self.last_seconds: float | None = None
        weakref.finalize(self, _unload, self._session, self.handle)

    def _checked(self, header: dict, payload: bytes = b"", arrays=()) -> tuple[dict, list]:
        answer, outs = self._session.request(header, payload, arrays)
        if answer.get("missing"):
            raise BackendUnavailable(
                f"device {self.device!r} has no {answer['missing']}: "
                f"pip install {answer['pip']} there"
            )
        if not answer.get("ok"):
            raise BackendUnavailable(f"device {self.device!r}: {answer.get('error')}")
        return answer, outs

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        answer, outs = self._checked({"op": "run", "handle": self.handle}, arrays=(x,))
        self.last_seconds = answer["seconds"]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def time(self, x: np.ndarray, min_time_s: float, min_runs: int) -> list[float]:
        """Seconds per inference, timed on the device (after three warm-up runs there, as
        timing.time_callable does here)."""
        header = {"op": "time", "handle": self.handle, "min_time_s": min_time_s}
        answer, _ = self._checked({**header, "min_runs": min_runs}, arrays=(x,))
        return answer["seconds"]


def _unload(s: Session, handle: int) -> None:
    if s.process.poll() is None:
        with contextlib.suppress(BackendUnavailable):
            s.request({"op": "unload", "handle": handle})


def open_remote_runner(
    format_name: str, path: Path | str, threads: int | None, device: str
) -> RemoteRunner:
    if format_name not in ("onnx", "tflite", "executorch"):
        raise BadInput(f"--device runs onnx, tflite and executorch files, not {format_name}")
    return RemoteRunner(format_name, path, threads, device)
