"""Fuzzed checkpoints: whatever the bytes, the loader loads or says why in one line.

Never another exception type, never a hang, never a huge allocation from a header
that declares one. Every case goes through `read_checkpoint` and, when it reads, the
strict load into the model.
"""

import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mobilevit_deploy.errors import CheckpointMismatch, MvdError
from mobilevit_deploy.weights import load_into_spec, read_checkpoint
from mobilevit_deploy.zoo import get_spec

FUZZ = settings(
    max_examples=int(os.environ.get("MVD_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SMALL = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "steps": torch.tensor(7)}


def _load(path) -> None:
    """The whole user path; only MvdError may escape."""
    try:
        read_checkpoint(path)
        load_into_spec(get_spec("fastvit_t8"), path)
    except MvdError:
        pass


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    torch.save({"state_dict": SMALL}, root / "small.pt")
    save_file(SMALL, str(root / "small.safetensors"))
    return {p.suffix: p.read_bytes() for p in root.iterdir()}


@pytest.mark.timeout(120)
@FUZZ
@given(
    suffix=st.sampled_from([".pt", ".safetensors"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    cut=st.floats(0.0, 1.0),
)
def test_flipped_and_truncated_bytes(valid_files, tmp_path, suffix, flips, cut):
    data = bytearray(valid_files[suffix])
    for where, value in flips:
        data[int(where * len(data))] = value
    data = data[: max(1, int(cut * len(data)))] if cut < 1 else data
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(bytes(data))
    _load(path)


@pytest.mark.timeout(120)
@FUZZ
@given(
    top=st.recursive(
        st.one_of(st.integers(), st.text(max_size=5), st.none(), st.just(torch.zeros(2))),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=6,
    )
)
def test_wrong_containers(tmp_path, top):
    path = tmp_path / "container.pt"
    torch.save(top, path)
    _load(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_or_boolean_weights_are_refused_by_name(tmp_path, dtype):
    """The old test accepted "an error or a cast" and could not fail: load_state_dict
    copies any dtype into float32, so garbage loaded silently."""
    state = {k: v.to(dtype) for k, v in get_spec("fastvit_t8").build().state_dict().items()}
    path = tmp_path / "dtype.pt"
    torch.save(state, path)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointMismatch, match=rf"not float values: stem\.0\.\S+ \({name}\)"):
        load_into_spec(get_spec("fastvit_t8"), path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_float32(tmp_path, dtype):
    source = get_spec("fastvit_t8").build().state_dict()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in source.items()}
    path = tmp_path / "half.pt"
    torch.save(state, path)
    model = load_into_spec(get_spec("fastvit_t8"), path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in state.items())


def test_a_header_declaring_a_huge_tensor_is_refused_without_allocating_it(tmp_path):
    """8 exabytes declared, 16 bytes present: refused at once, nothing allocated."""
    header = b'{"w":{"dtype":"F32","shape":[1000000000,1000000000,2],"data_offsets":[0,16]}}'
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(MvdError):
        read_checkpoint(path)


def test_a_header_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(MvdError):
        read_checkpoint(path)


def test_random_files_of_every_size(tmp_path):
    rng = np.random.default_rng(0)
    for n, size in enumerate([1, 7, 64, 511, 4096, 65536]):
        for suffix in (".pt", ".pth", ".safetensors"):
            path = tmp_path / f"r{n}{suffix}"
            path.write_bytes(rng.bytes(size))
            with pytest.raises(MvdError):
                read_checkpoint(path)


def test_every_one_byte_file_is_a_clear_error(tmp_path):
    """CI's fuzzer found b"J" and b"K" (pickle BININT opcodes cut short): torch's legacy
    unpickler raised struct.error straight through. Every single byte is now checked
    (a printable one is a one-character text file, and said to be)."""
    path = tmp_path / "one.pt"
    for value in range(256):
        path.write_bytes(bytes([value]))
        with pytest.raises(MvdError, match=r"not a readable checkpoint|refused|is a text file"):
            read_checkpoint(path)
