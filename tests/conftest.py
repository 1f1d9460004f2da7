"""Test configuration.

* Without CUDA, Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``; the variable
  must be set before any kernel module is imported (Triton reads it when ``@triton.jit``
  decorates), hence here, at the top of the conftest. With CUDA (``pytest -m gpu`` on a GPU
  machine) the kernels are compiled for real and the interpreter tests are skipped.
* Every ``torch.empty``-family allocation made *by the package* returns NaN-filled memory,
  so an unwritten output tile fails the comparison instead of passing by luck.
* ``KRON_KERNELS_FAILURE_LOG=<file>`` appends each failure's report to the file as it happens.
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

sys.path.insert(0, os.path.dirname(__file__))


def pytest_runtest_logreport(report):
    """With ``KRON_KERNELS_FAILURE_LOG`` set (benchmarks/gpu_session.sh), each failure's report
    is appended to that file as it happens: a GPU call killed at its time limit still leaves
    the reasons (pytest prints them only at the end of the session)."""
    path = os.environ.get("KRON_KERNELS_FAILURE_LOG")
    # under xdist the worker writes; the controller's replay of its report (``report.node``) not
    if path and report.failed and getattr(report, "node", None) is None:
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def _poisoned(alloc):
    def wrapper(*args, **kwargs):
        out = alloc(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("kron_kernels") and (out.is_floating_point() or out.is_complex()):
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture(autouse=True)
def nan_poison_empty(monkeypatch):
    """torch.empty / empty_like / empty_strided called from kron_kernels return NaN-filled tensors."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    yield


@pytest.fixture(autouse=True)
def fresh_backend():
    """Each test starts with no backend selected in code (so the environment's default holds)."""
    from kron_kernels import backend

    backend._state.__dict__.pop("name", None)
    yield
    backend._state.__dict__.pop("name", None)


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo for a torch.compile test. Dynamo caches which callables are torch
    functions by id on first use: built while ``nan_poison_empty``'s wrapper of
    ``torch.empty_like`` is in place, the map would make that wrapper a graph break; it is
    rebuilt here, and again after."""
    from torch._dynamo import trace_rules

    torch._dynamo.reset()
    trace_rules.clear_lru_cache()
    yield
    torch._dynamo.reset()
    trace_rules.clear_lru_cache()
