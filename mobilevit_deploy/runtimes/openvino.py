"""Run an ONNX file with OpenVINO on CPU: numpy in, numpy out, as OrtRunner does.

OpenVINO is a second runtime for the ONNX format, not a format: it reads the same fused
fp32 file and the same int8 QDQ file the ONNX exporter writes (its low-precision passes
turn the QDQ pairs into integer kernels). What it adds is the inference precision:
`INFERENCE_PRECISION_HINT` makes the CPU plugin compute an fp32 file in bf16 or fp16
where the CPU has those instructions (AVX512-BF16 / AMX, AVX512-FP16), so a reduced
precision needs no file of its own. On such CPUs the plugin's default is bf16, so fp32
is asked for explicitly: an unset hint would silently time and judge bf16 as fp32.

`openvino` is imported only when a runner is made or the CPU is asked, so `mvd doctor`
and `mvd bench --help` work without the extra installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, BadInput

DIST = "openvino"  # the distribution machine stamps record
INSTALL_HINT = "pip install 'mobilevit_deploy[openvino]'"
# mvd's precision names -> the element type of INFERENCE_PRECISION_HINT.
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# OPTIMIZATION_CAPABILITIES names of the reduced float precisions.
_CAPABILITIES = {"bf16": "BF16", "fp16": "FP16"}


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _core():
    if not available():
        raise BackendUnavailable(f"the openvino runtime needs openvino: {INSTALL_HINT}")
    import openvino as ov

    return ov.Core()


def inference_precisions() -> tuple[str, ...]:
    """The reduced float precisions ("bf16", "fp16") this CPU executes natively.

    Read from the CPU plugin's OPTIMIZATION_CAPABILITIES rather than from CPU flags:
    what counts is whether OpenVINO's kernels use the instructions, and a hint for a
    precision the CPU lacks is quietly computed in fp32, which a benchmark would then
    mislabel.
    """
    capabilities = set(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return tuple(p for p, name in _CAPABILITIES.items() if name in capabilities)


class OpenVINORunner:
    """One compiled model on the CPU device, with a latency hint (one stream: a batch
    runs as one request on `threads` threads, as a deployment answering single
    requests would)."""

    def __init__(
        self, path: Path | str, threads: int | None = None, precision: str = "fp32"
    ) -> None:
        if precision not in HINTS:
            raise BadInput(f"openvino runs {', '.join(HINTS)}, not {precision}")
        core = _core()
        if precision != "fp32" and precision not in inference_precisions():
            raise BadInput(f"this CPU has no native {precision}: OpenVINO would run it in fp32")
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        config = {
            hints.inference_precision: getattr(ov.Type, HINTS[precision]),
            hints.performance_mode: hints.PerformanceMode.LATENCY,
        }
        if threads:
            config[props.inference_num_threads] = threads
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.options = {
            "device": "CPU",
            "inference_precision_hint": HINTS[precision],
            "inference_num_threads": threads or 0,
            "performance_hint": "LATENCY",
        }

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output, or a tuple of them in graph order (feature maps)."""
        result = self.request.infer({0: np.ascontiguousarray(x)})
        outputs = tuple(result[port] for port in self.compiled.outputs)
        return outputs[0] if len(outputs) == 1 else outputs
