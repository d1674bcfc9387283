"""`mvd bench --device`: the candidates' files run and are timed on the device.

Only files travel: torch eager and OpenVINO run here, so they are no candidates there.
Each file is timed in a loop on the device itself (a round trip per run would time the
pipe), one file after another rather than interleaved. Under emulation nothing is
timed: qemu-user's timings measure the emulator, not the core it emulates, so the
report keeps the accuracy of every candidate and says why it has no latency.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .device import device_facts, is_emulated
from .device.stamp import device_stamp
from .timing import TimingResult, summarize

# What runs here, never on a device.
LOCAL_RUNTIMES = ("torch", "openvino")


def device_runtimes(runtimes: tuple[str, ...], skipped: list[str]) -> tuple[str, ...]:
    """The asked runtimes that run files on a device; the others are said in `skipped`."""
    for runtime in LOCAL_RUNTIMES:
        if runtime in runtimes:
            skipped.append(f"{runtime}: runs here, not on the device")
    return tuple(r for r in runtimes if r not in LOCAL_RUNTIMES)


def emulation_note(device: str) -> str | None:
    facts = device_facts(device)
    if not is_emulated(facts):
        return None
    return (
        f"timings: none; {device} is emulated by qemu-user (QEMU_CPU={facts['qemu_cpu']}), "
        "whose timings measure the emulator, not the core: the accuracy rows are the core's"
    )


def time_on_device(
    runners: Mapping[str, Callable],
    x: np.ndarray,
    batch: int,
    min_time_s: float,
    min_runs: int,
    progress: Callable[[str], None],
) -> dict[str, TimingResult]:
    """Each runner's latency, timed by the device's runner (`RemoteRunner.time`)."""
    results = {}
    for label, runner in runners.items():
        progress(f"timing {label} on the device")
        seconds = runner.time(x, min_time_s=min_time_s, min_runs=min_runs)
        results[label] = summarize([s * 1000.0 for s in seconds], batch)
    return results


def device_machine(device: str) -> dict:
    """The device's stamp, for the report's `machine`."""
    return {**device_stamp(device_facts(device)), "device": device}
