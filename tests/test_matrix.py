"""The format matrix: a fine-tuned checkpoint of each family through every format, and
FastViT through every precision of every format, each cell a full `verify` under
stress weights (the fused artifact against the unfused model in float64). `make
matrix` runs the whole zoo; this is the part CI runs.
"""

from __future__ import annotations

import pytest
import torch
from test_user_models import LAYOUTS, fine_tuned, verified

from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.verify import verify

pytestmark = pytest.mark.slow


def _artifact_rows(report) -> dict[str, object]:
    return {p.candidate: p for p in report.pairs if p.format is not None}


@pytest.mark.parametrize(
    ("name", "layout", "classes", "size"),
    [
        ("fastvit_t8", "official", 10, (64, 64)),
        ("levit_128s", "official", 10, (256, 256)),
        ("efficientvit_b0", "timm", 37, (64, 64)),
        ("seaformer_tiny", "official", 12, (64, 64)),
        ("sepvit_lite", "official", 3, (64, 64)),
        ("efficientvit_seg_b0_cityscapes", "official", 4, (64, 64)),
        ("seaformer_seg_tiny_ade20k", "official", 5, (64, 64)),
        ("levit_128s", "timm", 6, (192, 256)),
    ],
)
def test_every_family_fine_tuned_through_every_format(tmp_path, name, layout, classes, size):
    """A user's checkpoint of each family (its own head size, official or timm layout),
    through every format at its default precision (CoreML fp16, as on device)."""
    _, model = fine_tuned(name, classes, size)
    path = tmp_path / "ft.pth"
    torch.save(LAYOUTS[layout](name, model), path)
    # A square LeViT checkpoint tells its own size; the others are told theirs.
    square_levit = name.startswith("levit") and size[0] == size[1]
    hint = None if square_levit else "x".join(map(str, size))
    report = verify(name, weights=path, formats=tuple(FORMATS), image_size=hint, num_images=3)
    verified(report, tuple(FORMATS))
    assert report.image_size == size
    rows = _artifact_rows(report)
    assert {p.format for p in rows.values()} == set(FORMATS)
    for row in rows.values():
        if row.precision == "fp32":
            assert row.metrics["max_rel"] < 1e-4, row
        else:
            assert row.format == "coreml" and row.estimated == (not FORMATS["coreml"].runs_here())


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
