"""pytest-benchmark configuration: ``pytest benchmarks/ --benchmark-only``.

Options: ``--bench-tokens N`` (tokens per step; default 64*197 on GPU, 8*197 on CPU),
``--bench-rounds R`` (timed rounds per benchmark; default 50 on GPU, 5 on CPU) and, for the
model-level cases, ``--bench-model``, ``--bench-batch``, ``--bench-img`` (default ViT-B/16 at
batch 64 at 224 px on GPU, ViT-S/16 at batch 4 at 112 px on CPU). Which cases run:
``--bench-cases PATTERN[,PATTERN]`` (repeatable) keeps the cases whose label contains one of the
patterns, picked from the full case lists (``fwht-n1024-bfloat16``, ``fastfood-d16384-D86000000``,
``kron_linear-d768``; model steps by their id, ``kadaptation``); without it the fwht and fastfood
suites run their default target rows, and ``--bench-full`` every row (``common.fwht_cases`` /
``common.fastfood_cases``: the cases outside the default carry the ``bench_full`` mark). The
provenance (device, versions, commit, date) goes into every benchmark's ``extra_info`` and,
through ``pytest_benchmark_update_json``, into the ``--benchmark-json`` file.
"""
from pathlib import Path

import pytest

from benchmarks import common

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("kron_kernels benchmarks")
    group.addoption("--bench-tokens", type=int, default=None,
                    help="tokens per step (default 64*197 on GPU, 8*197 on CPU)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default 50 on GPU, 5 on CPU)")
    group.addoption("--bench-model", default=None, help="timm model of the model-level cases")
    group.addoption("--bench-batch", type=int, default=None, help="images per step of the model-level cases")
    group.addoption("--bench-img", type=int, default=None, help="image size of the model-level cases")
    group.addoption("--bench-cases", action="append", default=[], metavar="PATTERN[,PATTERN]",
                    help="run only the cases whose label contains one of the patterns, from the full case "
                    "lists (e.g. fwht-n1024-bfloat16,fastfood-d16384-D86000000); repeatable")
    group.addoption("--bench-full", action="store_true",
                    help="fwht and fastfood: every row length and (d, D), not only the default target rows")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_full: a benchmark case outside the default suite (--bench-full runs it)")


def _label(item) -> str:
    """The case label a benchmark item is selected by: its Case's group, else its parameter id."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return item.name
    case = callspec.params.get("case")
    return case.group if isinstance(case, common.Case) else callspec.id


def pytest_collection_modifyitems(config, items):
    """--bench-cases / --bench-full / the default suites, for the items under benchmarks/ only
    (a conftest's hook sees every item of the session)."""
    patterns = common.parse_case_patterns(config.getoption("--bench-cases"))
    full = config.getoption("--bench-full")
    keep, drop = [], []
    for item in items:
        ours = HERE in Path(str(item.path)).resolve().parents
        default = item.get_closest_marker("bench_full") is None
        selected = not ours or common.bench_selected(_label(item), default, patterns, full)
        (keep if selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
