"""pytest-benchmark configuration: ``pytest benchmarks/ --benchmark-only``.

Options: ``--bench-tokens N`` (tokens per step; default 64*197 on GPU, 8*197 on CPU),
``--bench-rounds R`` (timed rounds per benchmark; default 50 on GPU, 5 on CPU) and, for the
model-level cases, ``--bench-model``, ``--bench-batch``, ``--bench-img`` (default ViT-B/16 at
batch 64 at 224 px on GPU, ViT-S/16 at batch 4 at 112 px on CPU). The
provenance (device, versions, commit, date) goes into every benchmark's ``extra_info`` and,
through ``pytest_benchmark_update_json``, into the ``--benchmark-json`` file.
"""
import pytest

from benchmarks import common


def pytest_addoption(parser):
    group = parser.getgroup("kron_kernels benchmarks")
    group.addoption("--bench-tokens", type=int, default=None,
                    help="tokens per step (default 64*197 on GPU, 8*197 on CPU)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default 50 on GPU, 5 on CPU)")
    group.addoption("--bench-model", default=None, help="timm model of the model-level cases")
    group.addoption("--bench-batch", type=int, default=None, help="images per step of the model-level cases")
    group.addoption("--bench-img", type=int, default=None, help="image size of the model-level cases")


@pytest.fixture(scope="session")
def bench_device():
    return common.default_device()


@pytest.fixture(scope="session")
def bench_tokens(request, bench_device):
    tokens = request.config.getoption("--bench-tokens")
    return common.default_tokens(bench_device) if tokens is None else tokens


@pytest.fixture(scope="session")
def bench_rounds(request, bench_device):
    rounds = request.config.getoption("--bench-rounds")
    if rounds is None:
        rounds = 50 if bench_device.type == "cuda" else 5
    return rounds


@pytest.fixture(scope="session")
def bench_model_options(request):
    return {key: request.config.getoption(f"--bench-{key}") for key in ("model", "batch", "img")}


@pytest.fixture(scope="session")
def bench_provenance(bench_device):
    return common.provenance(bench_device)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["provenance"] = common.provenance(common.default_device())
