"""Run an ONNX file with onnxruntime on CPU: numpy in, numpy out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtRunner:
    """One inference session. `level="all"` is what a deployment would use; note that
    it fuses Conv+BN on its own, so speed-ups must be measured against it."""

    def __init__(
        self,
        path: Path | str,
        threads: int | None = None,
        level: str = "all",
        spinning: bool = True,
    ) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = LEVELS[level]
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle worker threads spin by default; where several sessions take turns (the
        # interleaved benchmark) the spinning of one steals cores from the next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.options = {
            "graph_optimization_level": level,
            "intra_op_num_threads": threads or 0,
            "allow_spinning": spinning,
        }
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output, or a tuple of them in graph order (feature maps)."""
        outputs = self.session.run(None, {self.input_name: x})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
