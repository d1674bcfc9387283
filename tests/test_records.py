"""A file read alone: mvd's record from each format without the sidecar, and the facts of
files other tools made (records.py)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import bare_module_job
from onnx import TensorProto, helper
from torch import nn

from mobilevit_deploy import records
from mobilevit_deploy.api import load_model
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.exporters import ExportJob
from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.exporters.metadata import INIT_SEED, artifact_metadata
from mobilevit_deploy.exporters.onnx_precision import to_fp16
from mobilevit_deploy.files import sidecar_path
from mobilevit_deploy.weights import Provenance
from mobilevit_deploy.zoo import get_spec

SIZE = 64


class _Small(nn.Module):
    """A convolution, pooled, and a linear head: a model another tool might export."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


class _ChannelsLast(nn.Module):
    """The small model taking NHWC, as a hand-made mobile file would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2))


def _example(layout: str = "NCHW") -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    return x.transpose(0, 2, 3, 1).copy() if layout == "NHWC" else x


def _mvd_file(module, path, fmt: str):
    """An mvd export of `module` (conftest.bare_module_job), its sidecar removed."""
    job = bare_module_job(module.eval(), path, _example(), fmt)
    metadata = FORMATS[fmt].load("exporter")(job)
    sidecar_path(path).unlink()
    return metadata.to_dict()


def _torch_onnx(module, path, example, dynamic: bool = False) -> None:
    """A plain torch.onnx.export, as a user or timm's onnx_export.py writes one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.from_numpy(example),),
            str(path),
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "n"}} if dynamic else None,
        )


# --- the format of a path ------------------------------------------------------------


def test_the_format_is_the_suffix_and_a_package_may_end_in_a_slash(tmp_path):
    for fmt in FORMATS.values():
        path = tmp_path / f"m{fmt.suffix}"
        path.mkdir() if fmt.package else path.write_bytes(b"")
        assert records.format_of(path) == fmt.name
    assert records.format_of(f"{tmp_path}/m.mlpackage/") == "coreml"
    assert records.format_of(tmp_path / "M.ONNX".lower()) == "onnx"


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("m.pt", "file", "not an exported model file"),
        ("m.onnx", None, "no such file"),
        ("m.mlpackage", "file", "must be a directory"),
        ("m.tflite", "dir", "must be a file"),
    ],
)
def test_a_path_that_is_no_exported_file_is_one_line(tmp_path, name, make, message):
    path = tmp_path / name
    if make == "file":
        path.write_text("x")
    elif make == "dir":
        path.mkdir()
    with pytest.raises(BadInput, match=message) as caught:
        records.file_facts(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "fmt",
    [
        "onnx",
        "tflite",
        pytest.param("executorch", marks=pytest.mark.slow),  # imports torch's exporter
        pytest.param("coreml", marks=pytest.mark.slow),  # imports coremltools
    ],
)
def test_a_damaged_file_is_one_line_naming_it(tmp_path, fmt):
    path = tmp_path / f"m{FORMATS[fmt].suffix}"
    if FORMATS[fmt].package:
        path.mkdir()  # a package without its manifest
    else:
        path.write_text("not a model")
    for read in (records.read_record, records.file_facts):
        with pytest.raises(BadInput, match=f"{path.name}: not a readable {fmt} file") as caught:
            read(path)
        assert "\n" not in str(caught.value)


# --- ONNX ---------------------------------------------------------------------------


def test_an_mvd_onnx_record_reads_without_its_sidecar(tmp_path):
    path = tmp_path / "m.onnx"
    written = _mvd_file(_Small(), path, "onnx")
    assert records.read_record(path) == written
    assert written["init_seed"] == INIT_SEED  # bare_module_job: no weights


def test_a_plain_torch_onnx_export_has_no_record_and_says_what_it_is(tmp_path):
    path = tmp_path / "fastvit.onnx"
    model = load_model("fastvit_t8", image_size=SIZE)  # unfused, as a user exports it
    _torch_onnx(model, path, _example())
    assert records.read_record(path) is None
    facts = records.file_facts(path)
    assert facts == {
        "format": "onnx",
        "input_name": "pixel_values",
        "input_shape": [1, 3, SIZE, SIZE],
        "input_dtype": "float32",
        "input_type": "tensor",
        "layout": "NCHW",
        "image_size": (SIZE, SIZE),
        "batch": 1,
        "output_names": ["logits"],
        "outputs": [{"name": "logits", "shape": [1, 1000], "dtype": "float32"}],
        "precision": "fp32",
        "precision_evidence": "float32 weights",
        "details": {},
    }


def test_another_tools_metadata_is_not_a_record(tmp_path):
    """Any exporter may fill metadata_props, even with keys like mvd's."""
    path = tmp_path / "m.onnx"
    _torch_onnx(_Small(), path, _example())
    graph = onnx.load(str(path))
    for key, value in {"model": "resnet", "format": "onnx"}.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))
    assert records.read_record(path) is None


def test_a_free_batch_and_channels_last_are_read(tmp_path):
    path = tmp_path / "nhwc.onnx"
    _torch_onnx(_ChannelsLast(_Small()), path, _example("NHWC"), dynamic=True)
    facts = records.file_facts(path)
    assert facts["input_shape"] == ["n", SIZE, SIZE, 3]
    assert (facts["layout"], facts["image_size"], facts["batch"]) == ("NHWC", (SIZE, SIZE), "n")


def test_onnx_precision_from_the_weights(tmp_path):
    path = tmp_path / "m.onnx"
    _torch_onnx(_Small(), path, _example())
    onnx.save(to_fp16(onnx.load(str(path))), str(tmp_path / "h.onnx"))
    facts = records.file_facts(tmp_path / "h.onnx")
    assert (facts["precision"], facts["precision_evidence"]) == ("fp16", "float16 weights")


def _int8_graph(path, qdq: bool) -> None:
    """y = x @ W with W stored in int8, dequantized by a node (QDQ) or cast (an int8
    weight alone, as a weight-only tool may write)."""
    inits = [helper.make_tensor("w", TensorProto.INT8, [4, 2], list(range(8)))]
    if qdq:
        inits.append(helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]))
        expand = helper.make_node("DequantizeLinear", ["w", "s"], ["wf"])
    else:
        expand = helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [expand, helper.make_node("MatMul", ["x", "wf"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])],
        inits,
    )
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize(
    ("qdq", "evidence"), [(True, "DequantizeLinear nodes"), (False, "int8 weights")]
)
def test_onnx_int8_from_qdq_nodes_or_int8_weights(tmp_path, qdq, evidence):
    path = tmp_path / "q.onnx"
    _int8_graph(path, qdq)
    facts = records.file_facts(path)
    assert (facts["precision"], facts["precision_evidence"]) == ("int8", evidence)
    assert facts["layout"] == "NCHW" and facts["image_size"] == (2, 4)


def test_a_file_with_two_inputs_is_refused(tmp_path):
    path = tmp_path / "two.onnx"
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(BadInput, match=r"has 2 inputs \(a, b\)"):
        records.file_facts(path)


@pytest.mark.parametrize(
    ("shape", "layout", "size"),
    [
        ([1, 3, 224, 160], "NCHW", (224, 160)),
        ([2, 224, 160, 3], "NHWC", (224, 160)),
        ([1, 3, None, None], "NCHW", None),
        ([1, 4, 64, 64], "unknown", None),
        ([1, 3, 64], "unknown", None),
    ],
)
def test_the_layout_the_shape_implies(shape, layout, size):
    assert records.layout_of(shape) == layout
    assert records.image_size_of(shape, layout) == size


# --- the record's fields that rebuild a reference ----------------------------------


def _metadata(spec, model=None, provenance=None, precision="fp32", fmt="onnx"):
    return artifact_metadata(
        spec,
        model=model,
        provenance=provenance,
        image_size=(SIZE, SIZE),
        batch=1,
        reparameterized=False,
        precision=precision,
        fmt=fmt,
    )


def test_the_record_names_the_feature_stages_and_the_seed_of_a_model_without_weights():
    spec = get_spec("fastvit_t8")
    features = dataclasses.replace(spec, features=(1, 3))
    meta = _metadata(features, model=features.build()).to_dict()
    assert meta["features"] == [1, 3] and meta["init_seed"] == INIT_SEED
    given = Provenance("ft.pth", "ab" * 32, "train")
    meta = _metadata(spec, provenance=given).to_dict()
    assert "features" not in meta and "init_seed" not in meta  # set only when they apply


# --- TFLite, ExecuTorch, CoreML ------------------------------------------------------


@pytest.mark.slow
def test_tflite_record_without_sidecar_and_a_foreign_channels_last_file(tmp_path):
    import litert_torch

    from mobilevit_deploy.runtimes.litert import LiteRTRunner

    path = tmp_path / "m.tflite"
    written = _mvd_file(_Small(), path, "tflite")
    assert records.read_record(path) == written
    assert records.file_facts(path)["layout"] == written["input_layout"]

    model, x = _ChannelsLast(_Small()).eval(), _example()
    foreign = tmp_path / "hand.tflite"
    litert_torch.convert(model, (torch.from_numpy(_example("NHWC")),)).export(str(foreign))
    assert records.read_record(foreign) is None
    facts = records.file_facts(foreign)
    assert facts["input_shape"] == [1, SIZE, SIZE, 3] and facts["layout"] == "NHWC"
    assert facts["outputs"][0]["shape"] == [1, 5] and facts["precision"] == "fp32"
    # the runner reads the layout from the file alone, and feeds it NHWC
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 2, 3, 1).copy())).numpy()
    np.testing.assert_allclose(LiteRTRunner(foreign)(x), want, rtol=1e-4, atol=1e-5)


def _facts_at(tmp_path, fmt: str, precision: str, **options) -> dict:
    """The facts of an mvd export of the small model at `precision`."""
    path = tmp_path / f"{precision}{FORMATS[fmt].suffix}"
    job = bare_module_job(_Small().eval(), path, _example(), fmt)
    job = dataclasses.replace(
        job,
        precision=precision,
        calibration=np.repeat(_example(), 4, axis=0) if precision == "int8" else None,
        options=FORMATS[fmt].options(**options),
    )
    FORMATS[fmt].load("exporter")(job)
    return records.file_facts(path)


@pytest.mark.slow
def test_tflite_precision_from_the_tensors(tmp_path):
    assert _facts_at(tmp_path, "tflite", "fp16")["precision"] == "fp16"
    facts = _facts_at(tmp_path, "tflite", "int8", int8_mode="dynamic")
    assert facts["precision"] == "int8" and facts["details"] == {"int8_mode": "dynamic"}


@pytest.mark.slow
def test_executorch_precision_from_the_program_and_its_xnnpack_graphs(tmp_path):
    """fp16 and int8 programs take and give float32; the values inside say which."""
    for precision in ("fp16", "int8"):
        facts = _facts_at(tmp_path, "executorch", precision)
        assert facts["input_dtype"] == "float32" and facts["precision"] == precision


@pytest.mark.slow
def test_executorch_record_without_sidecar_and_a_foreign_program(tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = tmp_path / "m.pte"
    written = _mvd_file(_Small(), path, "executorch")
    assert records.read_record(path) == written

    model, x = _Small().eval(), torch.from_numpy(_example())
    program = to_edge_transform_and_lower(
        torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
    foreign = tmp_path / "plain.pte"
    foreign.write_bytes(program.buffer)
    assert records.read_record(foreign) is None
    facts = records.file_facts(foreign)
    assert facts["input_shape"] == [1, 3, SIZE, SIZE] and facts["layout"] == "NCHW"
    assert facts["outputs"] == [{"name": None, "shape": [1, 5], "dtype": "float32"}]
    assert facts["precision"] == "fp32"


@pytest.fixture(scope="module")
def t8_package(tmp_path_factory):
    """An mvd package of FastViT-T8 at 64x64 (fp16, tensor input), its sidecar removed,
    and a copy of it whose record is gone too (a package another tool made)."""
    from mobilevit_deploy.runtimes.coreml import _load_spec

    folder = tmp_path_factory.mktemp("coreml")
    path = folder / "t8.mlpackage"
    model = load_model("fastvit_t8", image_size=SIZE)
    spec = model.mvd_spec
    metadata = _metadata(spec, model=model, precision="fp16", fmt="coreml")
    options = FORMATS["coreml"].options(image_input=False)  # what CoreMLRunner feeds
    job = ExportJob(model, path, _example(), "fp16", options, metadata, spec)
    written = FORMATS["coreml"].load("exporter")(job).to_dict()
    sidecar_path(path).unlink()
    foreign = folder / "plain.mlpackage"
    import coremltools as ct

    proto = _load_spec(path)
    for key in [k for k in proto.description.metadata.userDefined if k.startswith("mvd.")]:
        del proto.description.metadata.userDefined[key]
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    ct.models.utils.save_spec(proto, str(foreign), weights_dir=str(weights))
    return path, foreign, written


@pytest.mark.slow
def test_coreml_record_reads_without_its_sidecar(t8_package):
    from mobilevit_deploy.runtimes.coreml import CoreMLRunner, check_package

    path, _, written = t8_package
    assert records.read_record(path) == written
    assert check_package(path, [(1, 1000)])["problems"] == []
    runner = CoreMLRunner(path)  # reads the package; predicting needs macOS
    assert runner.input_name == "input" and runner.probabilities == "classLabel_probs"
    assert runner.labels == [str(i) for i in range(1000)]


@pytest.mark.slow
def test_a_coreml_package_without_record_says_what_it_is(t8_package):
    from mobilevit_deploy.runtimes.coreml import check_package

    _, foreign, written = t8_package
    assert records.read_record(foreign) is None
    facts = records.file_facts(foreign)
    assert facts["input_shape"] == [1, 3, SIZE, SIZE] and facts["input_type"] == "tensor"
    assert facts["output_names"] == ["classLabel", "classLabel_probs"]
    assert facts["precision"] == "fp16"
    assert facts["details"]["min_target"] == "iOS16"
    assert len(facts["details"]["class_labels"]) == 1000
    with pytest.raises(BadInput, match="carries no mvd record"):
        check_package(foreign, [(1, 1000)])
    assert check_package(foreign, [(1, 1000)], record=written)["problems"] == []


@pytest.mark.slow
def test_a_coreml_image_input_is_read_as_one(t8_package, tmp_path):
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2

    from mobilevit_deploy.runtimes.coreml import _load_spec

    path, foreign, _ = t8_package
    proto = _load_spec(foreign)
    image = proto.description.input[0].type
    image.imageType.width, image.imageType.height = SIZE, SIZE
    image.imageType.colorSpace = FeatureTypes_pb2.ImageFeatureType.RGB
    out = tmp_path / "image.mlpackage"
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    ct.models.utils.save_spec(proto, str(out), weights_dir=str(weights))
    facts = records.file_facts(out)
    assert (facts["input_type"], facts["input_dtype"]) == ("image", "uint8")
    assert facts["input_shape"] == [1, 3, SIZE, SIZE] and facts["image_size"] == (SIZE, SIZE)
