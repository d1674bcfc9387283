"""Each format x precision of one model per family, run on x86 and on emulated ARM cores;
writes benchmarks/ARM.md and arm.json.

    python benchmarks/run_arm.py             # after `make arm-device`, as root
    python benchmarks/run_arm.py --resume    # keep the cells arm.json has, fill the rest

Stress weights, small inputs (emulation runs a FastViT-T8 at 256x256 in 8-30 s), the
files exported once here on x86 and then run here, on an emulated Cortex-A72 (ARMv8.0:
no FP16 arithmetic) and on an emulated Cortex-A76 (ARMv8.2-A with FP16 and dot product,
as phones have). Each is compared with the float64 unfused model, as verify does: PSNR,
and agreement of the decision (top-1, or argmax per pixel). No timings: under qemu-user
they measure the emulator. Each cell is saved as it finishes, so a stop loses nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from mobilevit_deploy import api
from mobilevit_deploy.device import device_facts
from mobilevit_deploy.device.stamp import device_stamp
from mobilevit_deploy.errors import MvdError
from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.images import natural_images, to_model_input
from mobilevit_deploy.machine import machine_stamp, stamp_line
from mobilevit_deploy.metrics import compare
from mobilevit_deploy.report import markdown_table
from mobilevit_deploy.runtimes import open_runner, run_per_sample
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.stress import apply_stress_weights
from mobilevit_deploy.verify import softmax

HERE = Path(__file__).parent
RESULTS = HERE / "arm.json"
# One classifier of each family, and the segmenter the issue measured collapse on.
MODELS = {
    "fastvit_t8": "128",
    "efficientvit_b0": "128",
    "levit_128s": "128",
    "seaformer_tiny": "128",
    "sepvit_lite": "128",
    "efficientvit_seg_b0_cityscapes": "128x256",
}
FILES = [
    ("onnx", "fp32"),
    ("onnx", "fp16"),
    ("onnx", "int8"),
    ("tflite", "fp32"),
    ("tflite", "fp16"),
    ("tflite", "int8"),
    ("executorch", "fp32"),
    ("executorch", "fp16"),
]
DEVICES = {"x86-64": None, "Cortex-A72": "arm64:cortex-a72", "Cortex-A76": "arm64:cortex-a76"}
IMAGES = 2  # emulation is slow; the issue measured on 2 too
SEED = 0


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def _measured(cell: dict | None) -> bool:
    """A number, or a file that cannot be made; a device that failed is asked again."""
    return bool(cell) and ("error" not in cell or cell["error"].startswith("export:"))


def measure_model(name: str, size: tuple[int, int], cells: dict, work: Path, save) -> None:
    """Every file of `name` on every device, skipping the cells already in `cells`."""
    model = api.load_model(name, image_size=size)
    spec = model.mvd_spec
    task = spec.output_kind
    calibration = to_model_input(natural_images(8, size, SEED + 1000), spec)
    apply_stress_weights(model, torch.from_numpy(calibration), SEED)
    x = to_model_input(natural_images(IMAGES, size, SEED), spec)
    reference = TorchRunner(model, torch.float64)(x)
    bilinear = None
    for fmt, precision in FILES:
        key = f"{name} {fmt} {precision}"
        if all(_measured(cells.get(key, {}).get(device)) for device in DEVICES):
            continue
        try:
            artifact = api.export(
                name,
                fmt,
                model=model,
                output=work / f"{name}.{precision}{FORMATS[fmt].suffix}",
                image_size=size,
                precision=precision,
            )
        except MvdError as exc:
            cells[key] = {device: {"error": f"export: {exc}"} for device in DEVICES}
            save()
            continue
        target = reference
        if artifact.metadata.get("upsample") == "bilinear":  # as verify: against bilinear
            if bilinear is None:
                swapped = copy.deepcopy(model)
                swapped.set_upsample("bilinear")
                bilinear = TorchRunner(swapped, torch.float64)(x)
            target = bilinear
        if artifact.metadata.get("probabilities"):
            target = softmax(target)
        for device, command in DEVICES.items():
            if _measured(cells.get(key, {}).get(device)):
                continue
            try:
                runner = open_runner(fmt, artifact.path, device=command)
                metrics = compare(target, run_per_sample(runner, x), task)
                cell = {"psnr_db": metrics["psnr_db"], "agreement": metrics.get("agreement")}
            except MvdError as exc:
                cell = {"error": str(exc)}
            cells.setdefault(key, {})[device] = cell
            save()
            print(key, device, cell, flush=True)


def _shown(cell: dict | None) -> str:
    if not cell:
        return ""
    if "error" in cell:
        return "n/a"
    agreement = cell.get("agreement")
    shown = f"{cell['psnr_db']:.1f}"
    return shown + (f" ({agreement:.0%})" if agreement is not None else "")


def write_markdown(data: dict) -> None:
    rows, errors = [], {}
    for name, size in MODELS.items():
        for fmt, precision in FILES:
            cells = data["cells"].get(f"{name} {fmt} {precision}", {})
            rows.append([name, size, fmt, precision, *(_shown(cells.get(d)) for d in DEVICES)])
            for cell in cells.values():
                if "error" in cell:
                    errors.setdefault(cell["error"], {})[f"{name} {fmt} {precision}"] = None
    lines = [
        "# mvd's files on ARM: x86-64 and emulated Cortex-A72 and Cortex-A76",
        "",
        "Written by `python benchmarks/run_arm.py` (docs/arm.md). One model of each family",
        "under stress weights, each file exported by mvd on x86 and run unchanged on each CPU:",
        f"PSNR (dB) against the float64 unfused model on {IMAGES} natural-looking images, and",
        "in brackets the agreement of the decision (top-1, or argmax per pixel). Classifier",
        "files output probabilities and are compared with the reference's softmax; files",
        "that upsample bilinear (no bicubic resize) with the model upsampling bilinear. No",
        "timings: qemu-user's say nothing about the cores it emulates. ExecuTorch runs only",
        "on x86 here: torch's aarch64 wheel on PyPI, which executorch.runtime imports, is its",
        "CUDA build, and coremltools (an executorch requirement) has no aarch64 wheel.",
        "",
        f"- x86-64: {data['machines'].get('x86-64', '')}",
        f"- Cortex-A72 (ARMv8.0, no FP16 arithmetic): {data['machines'].get('Cortex-A72', '')}",
        f"- Cortex-A76 (ARMv8.2-A, FP16, dot product): {data['machines'].get('Cortex-A76', '')}",
        "",
        markdown_table(["model", "input", "format", "precision", *DEVICES], rows),
    ]
    if errors:
        lines += ["", "n/a:", ""]
        lines += [f"- {', '.join(cells)}: {error}" for error, cells in errors.items()]
    (HERE / "ARM.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="keep the cells arm.json has")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text()) if args.resume and RESULTS.exists() else {}
    data.setdefault("cells", {})
    data["machines"] = {"x86-64": stamp_line(machine_stamp())} | {
        device: stamp_line(device_stamp(device_facts(command)))
        for device, command in DEVICES.items()
        if command
    }

    def save() -> None:
        RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        write_markdown(data)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            measure_model(name, _size(MODELS[name]), data["cells"], Path(tmp), save)
    save()


if __name__ == "__main__":
    main()
