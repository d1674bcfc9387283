"""The format matrix (issue 5): one variant of each family through ONNX, CoreML and TFLite
at fp32, and FastViT through every precision of every format, each cell a full
`verify` under stress weights (the fused artifact against the unfused model in
float64). `make matrix` runs the whole zoo; this is the part CI runs.
"""

from __future__ import annotations

import pytest

from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.verify import verify

pytestmark = pytest.mark.slow

ONE_PER_FAMILY = [
    ("fastvit_t8", 64),
    ("levit_128s", 224),
    ("efficientvit_b0", 64),
    ("seaformer_tiny", 64),
    ("sepvit_lite", 64),
    ("efficientvit_seg_b0_cityscapes", 128),
    ("seaformer_seg_tiny_ade20k", 128),
]


def _artifact_rows(report) -> dict[str, object]:
    return {p.candidate: p for p in report.pairs if p.candidate.split()[0] in FORMATS}


@pytest.mark.parametrize(("name", "size"), ONE_PER_FAMILY)
def test_every_family_through_every_format_at_fp32(name, size):
    report = verify(
        name,
        formats=("onnx", "coreml", "tflite"),
        precisions=("fp32",),
        image_size=size,
        num_images=4,
    )
    rows = _artifact_rows(report)
    assert set(rows) == {"onnx fused", "coreml fused (fp32, estimated)", "tflite fused"}
    assert report.passed, (report.problems, {k: v.metrics["max_rel"] for k, v in rows.items()})
    assert rows["tflite fused"].metrics["max_rel"] < 1e-4
    on_device = verify(name, formats=("coreml",), image_size=size, num_images=4)  # fp16
    assert on_device.passed, on_device.problems
    assert set(_artifact_rows(on_device)) == {"coreml fused (fp16, estimated)"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fastvit_through_every_precision_of_every_format(fmt):
    precisions = FORMATS[fmt].precisions
    report = verify("fastvit_t8", formats=(fmt,), precisions=precisions, image_size=64)
    rows = _artifact_rows(report)
    assert len(rows) == len(precisions)
    assert report.passed, (report.problems, {k: v.metrics for k, v in rows.items()})
    for row in rows.values():
        floor = {"fp32": 100.0, "fp16": 40.0, "int8": 15.0}[row.precision]
        assert row.metrics["psnr_db"] >= floor, row
