"""The program mvd sends to a device: it runs exported files there and answers over stdout.

Self-contained on purpose: the device has a Python, numpy and the format's runtime
(onnxruntime, ai_edge_litert or executorch), never torch or mvd, so this file imports
nothing else and is sent as source text. Each message either way is one JSON line and
then the bytes it announces: a loaded file, or arrays in .npy form. The file is sent
once and stays loaded under a handle, so many inferences follow one upload.
"""

import ctypes
import io
import json
import os
import platform
import sys
import tempfile
import time

try:
    import numpy as np
except ImportError:  # said in the facts, which the client checks before anything else
    np = None

# What a device lacking a runtime should pip install: the versions mvd is tested with.
PIP_NAMES = {
    "onnx": ("onnxruntime", "onnxruntime==1.31.1"),
    "tflite": ("ai_edge_litert", "ai-edge-litert==2.3.0"),
    "executorch": ("executorch", "executorch==1.4.1"),
}
VERSIONED = {"numpy": "numpy", "onnxruntime": "onnxruntime", "ai_edge_litert": "ai-edge-litert"}
# Linux aarch64 HWCAP and HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h): the features
# the kernel, or qemu-user, says the core has, whatever /proc/cpuinfo shows.
HWCAP = [
    "fp",
    "asimd",
    "evtstrm",
    "aes",
    "pmull",
    "sha1",
    "sha2",
    "crc32",
    "atomics",
    "fphp",
    "asimdhp",
    "cpuid",
    "asimdrdm",
    "jscvt",
    "fcma",
    "lrcpc",
    "dcpop",
    "sha3",
    "sm3",
    "sm4",
    "asimddp",
    "sha512",
    "sve",
    "asimdfhm",
]
HWCAP2 = [
    "dcpodp",
    "sve2",
    "sveaes",
    "svepmull",
    "svebitperm",
    "svesha3",
    "svesm4",
    "flagm2",
    "frint",
    "svei8mm",
    "svef32mm",
    "svef64mm",
    "svebf16",
    "i8mm",
    "bf16",
]


def hwcap_features() -> list:
    if platform.system() != "Linux" or platform.machine() not in ("aarch64", "arm64"):
        return []
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    words = ((getauxval(16), HWCAP), (getauxval(26), HWCAP2))  # AT_HWCAP, AT_HWCAP2
    return [name for word, names in words for bit, name in enumerate(names) if word >> bit & 1]


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def facts() -> dict:
    versions = {}
    for module, dist in VERSIONED.items():
        try:
            versions[dist] = __import__(module).__version__
        except Exception:
            versions[dist] = None
    try:
        from importlib.metadata import version

        versions["executorch"] = version("executorch")
    except Exception:
        versions["executorch"] = None
    try:
        features = hwcap_features()
    except Exception:
        features = []
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpuinfo": read("/proc/cpuinfo"),
        "midr": read("/sys/devices/system/cpu/cpu0/regs/identification/midr_el1").strip(),
        "hwcap": features,
        "qemu_cpu": os.environ.get("QEMU_CPU"),
        "versions": versions,
    }


class Missing(Exception):
    """The device lacks the format's runtime."""


def _import(fmt: str, module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise Missing(fmt) from exc


class Onnx:
    def __init__(self, path: str, threads: int, meta: dict) -> None:
        ort = _import("onnx", "onnxruntime")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        return self.session.run(None, {self.input_name: x})


class LiteRT:
    """NCHW normalised input and NCHW output, as every mvd runner speaks: the client
    resolved the file's layout, output order and inside normalisation (`meta`); int8
    inputs and outputs are quantized with the file's own scale and zero point."""

    def __init__(self, path: str, threads: int, meta: dict) -> None:
        interpreter = _import("tflite", "ai_edge_litert.interpreter").Interpreter
        self.interpreter = interpreter(model_path=path, num_threads=threads or None)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        signatures = self.interpreter._get_full_signature_list()
        outputs = next(iter(signatures.values()))["outputs"] if len(signatures) == 1 else {}
        names = meta.get("output_names")
        if names and set(names) <= set(outputs):
            self.outputs = [outputs[name] for name in names]
        else:
            self.outputs = [d["index"] for d in self.interpreter.get_output_details()]
        self.nhwc = meta["nhwc"]
        self.normalization = meta.get("normalization")

    def __call__(self, x):
        if self.normalization:  # back to RGB in [0, 1], which the file normalises itself
            mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in self.normalization)
            x = (x * std + mean).astype(np.float32)
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        if self.input["dtype"] != np.float32:
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.interpreter.set_tensor(
            self.input["index"], np.ascontiguousarray(x, self.input["dtype"])
        )
        self.interpreter.invoke()
        details = {d["index"]: d for d in self.interpreter.get_output_details()}
        outs = []
        for index in self.outputs:
            detail = details[index]
            out = self.interpreter.get_tensor(index)
            if detail["dtype"] != np.float32:
                scale, zero = detail["quantization"]
                out = (out.astype(np.float32) - zero) * scale
            outs.append(out.transpose(0, 3, 1, 2) if self.nhwc and out.ndim == 4 else out)
        return outs


class ExecuTorch:
    """executorch.runtime takes and gives its own tensors (torch's, which the executorch
    wheel brings along); the program is loaded as an app's C++ runtime would."""

    def __init__(self, path: str, threads: int, meta: dict) -> None:
        runtime = _import("executorch", "executorch.runtime").Runtime.get()
        import torch

        self.torch = torch
        self.method = runtime.load_program(path).load_method("forward")

    def __call__(self, x):
        outs = self.method.execute([self.torch.from_numpy(np.ascontiguousarray(x))])
        return [o.numpy() for o in outs]


KINDS = {"onnx": Onnx, "tflite": LiteRT, "executorch": ExecuTorch}


def time_runs(model, x, min_time_s: float, min_runs: int, warmup: int) -> list:
    for _ in range(warmup):
        model(x)
    seconds = []
    start = time.perf_counter()
    while len(seconds) < min_runs or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        model(x)
        seconds.append(time.perf_counter() - t0)
    return seconds


def serve(inp, out) -> None:
    """Answers messages until `bye` or the end of stdin."""
    workdir = tempfile.mkdtemp(prefix="mvd-device-")
    models = {}

    def send(header: dict, arrays=()) -> None:
        blobs = []
        for a in arrays:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(a), allow_pickle=False)
            blobs.append(buffer.getvalue())
        header["arrays"] = [len(b) for b in blobs]
        out.write(json.dumps(header).encode() + b"\n" + b"".join(blobs))
        out.flush()

    while True:
        line = inp.readline()
        if not line:
            break
        msg = json.loads(line)
        payload = inp.read(msg.get("nbytes", 0))
        arrays, at = [], msg.get("nbytes", 0) - sum(msg.get("arrays", []))
        for n in msg.get("arrays", []):
            arrays.append(np.load(io.BytesIO(payload[at : at + n]), allow_pickle=False))
            at += n
        op = msg["op"]
        try:
            if op == "bye":
                break
            if op == "facts":
                send({"ok": True, "facts": facts()})
            elif op == "load":
                path = os.path.join(workdir, f"{len(models)}{msg['suffix']}")
                with open(path, "wb") as f:
                    f.write(payload[: msg["nbytes"] - sum(msg.get("arrays", []))])
                models[len(models)] = KINDS[msg["format"]](path, msg["threads"], msg["meta"])
                send({"ok": True, "handle": len(models) - 1})
            elif op == "run":
                t0 = time.perf_counter()
                outs = models[msg["handle"]](arrays[0])
                send({"ok": True, "seconds": time.perf_counter() - t0}, outs)
            elif op == "time":
                model = models[msg["handle"]]
                runs = time_runs(model, arrays[0], msg["min_time_s"], msg["min_runs"], 3)
                send({"ok": True, "seconds": runs})
            elif op == "unload":
                models[msg["handle"]] = None
                send({"ok": True})
        except Missing as exc:
            module, pip = PIP_NAMES[str(exc)]
            send({"ok": False, "missing": module, "pip": pip})
        except Exception as exc:
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    """The protocol owns the real stdout; anything a runtime prints from C goes to stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
