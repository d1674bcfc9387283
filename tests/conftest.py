import functools
import http.server
import os
import threading
from typing import ClassVar

import numpy as np
import pytest
import torch

from mobilevit_deploy.exporters import ExportJob
from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.exporters.metadata import artifact_metadata
from mobilevit_deploy.images import natural_images, to_model_input
from mobilevit_deploy.stress import apply_stress_weights
from mobilevit_deploy.zoo import get_spec

# `make test` runs two xdist workers on this machine's two cores: one thread each (and
# in the processes the tests start). At two threads, one worker's idle OpenMP threads
# spin against the other's: test_weights.py and test_fastvit.py took 8m49s on two
# workers, 17 s at one thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for torch, restored afterwards.

    The float64 references of `verify` and `reparam` run depthwise convs through
    torch's slow per-group conv, whose OpenMP regions crawl when another process
    shares the cores (measured: seconds become minutes on a busy 2-core machine).
    `bench` also sets the process-wide thread count; restoring it keeps tests apart.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stressed(name: str, size: int = 64, seed: int = 0) -> torch.nn.Module:
    """A model of `name` under stress weights calibrated on natural-looking images.

    Seeded build: the same model whichever tests ran before.
    """
    spec = get_spec(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = spec.build()
    calibration = torch.from_numpy(to_model_input(natural_images(4, size, seed + 100), spec))
    return apply_stress_weights(model, calibration, seed)


def bare_module_job(module: torch.nn.Module, path, example: np.ndarray, fmt: str) -> ExportJob:
    """An fp32 export job for a module outside the zoo: the record of the zoo's
    FastViT-T8 stands in, the format's options are its defaults."""
    spec = get_spec("fastvit_t8")
    meta = artifact_metadata(
        spec,
        provenance=None,
        image_size=example.shape[2:],
        batch=1,
        reparameterized=False,
        precision="fp32",
        fmt=fmt,
    )
    return ExportJob(module, path, example, "fp32", FORMATS[fmt].options(), meta, spec)


class _TwoLogits(torch.nn.Module):
    """Two channels through a 1x1 convolution, pooled, then a Linear that adds them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1, bias=False)
        self.fc = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2, 3).reshape(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def capped_logits_case() -> tuple[torch.nn.Module, np.ndarray, np.ndarray, list]:
    """(module, calibration, input, expected logits) where an int8 file whose output is
    int8 caps the top logit at the largest value calibration saw: calibration lights one
    channel at a time (a logit of 1 at most) and the input both (2), with every tensor
    before the last within its calibrated range."""
    one_hot = np.zeros((2, 3, 8, 8), dtype=np.float32)
    one_hot[0, 0], one_hot[1, 1] = 1.0, 1.0
    return _TwoLogits().eval(), np.concatenate([one_hot] * 4), one_hot[:1] + one_hot[1:], [[2, 0]]


def test_inputs(name: str, size: int = 64, count: int = 4, seed: int = 0) -> np.ndarray:
    return to_model_input(natural_images(count, size, seed), get_spec(name))


test_inputs.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test may touch the user's download cache."""
    monkeypatch.setenv("MVD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# The int8 target tests export at when they give none: the floor that int8 had before
# the search. Under stress weights at these sizes all-int8 misses the default target
# (FastViT-T8 at 64x64: 24.3 dB against 25), and the search that follows costs minutes
# of TFLite and ExecuTorch exports per file; the tests of the search and of the
# default itself (test_int8_search) are marked `default_int8_target`.
TESTS_INT8_TARGET_DB = 15.0


@pytest.fixture(autouse=True)
def _tests_int8_target(request, monkeypatch):
    if request.node.get_closest_marker("default_int8_target") is None:
        from mobilevit_deploy import api

        monkeypatch.setattr(api, "DEFAULT_INT8_TARGET_DB", TESTS_INT8_TARGET_DB)


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory and records each requested path, to prove a cache was hit."""

    hits: ClassVar[list[str]] = []

    def do_GET(self):
        self.hits.append(self.path)
        super().do_GET()

    def log_message(self, *_args):
        pass


@pytest.fixture
def weights_server(tmp_path):
    """(directory, base URL) of an HTTP server on 127.0.0.1: the only 'model hub' here."""
    root = tmp_path / "www"
    root.mkdir()
    CountingHandler.hits = []
    handler = functools.partial(CountingHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
