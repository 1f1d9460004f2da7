"""Backend selection: explicit choices win or fail clearly; auto falls back."""
import pytest
import torch

import kron_kernels as kk
from kron_kernels import backend

CPU = torch.device("cpu")


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("KRON_KERNELS_BACKEND", raising=False)
    assert kk.get_backend() == "auto"
    assert backend.select("kron_matmul", CPU) == "torch"


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        kk.set_backend("cudnn")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("KRON_KERNELS_BACKEND", "torch")
    assert kk.get_backend() == "torch"
    monkeypatch.setenv("KRON_KERNELS_BACKEND", "TRITON")
    assert kk.get_backend() == "triton"
    monkeypatch.setenv("KRON_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="KRON_KERNELS_BACKEND='fast'"):
        kk.get_backend()


def test_set_backend_beats_environment(monkeypatch):
    monkeypatch.setenv("KRON_KERNELS_BACKEND", "triton")
    kk.set_backend("torch")
    assert kk.get_backend() == "torch"


def test_use_backend_restores():
    kk.set_backend("torch")
    with kk.use_backend("triton"):
        assert kk.get_backend() == "triton"
    assert kk.get_backend() == "torch"


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kk.set_backend("triton")
    with pytest.raises(kk.BackendUnavailableError, match="TRITON_INTERPRET"):
        backend.select("kron_matmul", CPU)


def test_explicit_cuda_without_kernel_raises():
    kk.set_backend("cuda")
    x = torch.randn(2, 4)
    A, U, V = torch.randn(1, 2, 2), torch.randn(1, 2, 1), torch.randn(1, 2, 1)
    with pytest.raises(kk.BackendUnavailableError, match="backend 'cuda' has no compiled kernel for kron_matmul"):
        kk.kron_matmul(x, A, U, V)


def test_triton_refusal_falls_back_under_auto():
    assert backend.select("op", CPU, triton_refuses="float64") == "torch"
    kk.set_backend("triton")
    with pytest.raises(kk.BackendUnavailableError, match="float64"):
        backend.select("op", CPU, triton_refuses="float64")


def test_torch_backend_serves_everything():
    kk.set_backend("torch")
    assert backend.select("anything", torch.device("meta"), cuda_ops=frozenset({"meta"})) == "torch"


CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "cuda_auto, extension, expected",
    [
        (None, True, "cuda"),  # default precedence: the extension where it has the op
        (None, False, "triton"),
        ("triton", True, "triton"),  # the choice table measured Triton faster
        ("triton", False, "triton"),
        ("dense", True, "dense"),
    ],
)
def test_auto_on_cuda_follows_the_choice_table(monkeypatch, cuda_auto, extension, expected):
    monkeypatch.setattr(backend, "extension_status", lambda: (extension, "" if extension else "missing"))
    got = backend.select("op", CUDA, cuda_ops=frozenset({"cuda"}), dense=cuda_auto == "dense", cuda_auto=cuda_auto)
    assert got == expected


def test_triton_choice_falls_back_to_the_extension_when_triton_refuses(monkeypatch):
    monkeypatch.setattr(backend, "extension_status", lambda: (True, ""))
    assert backend.select("op", CUDA, cuda_ops=frozenset({"cuda"}), triton_refuses="fp64", cuda_auto="triton") == "cuda"


def test_fwht_choice_table():
    """Triton where the H200 measured it faster than the extension (2-byte rows of 2^10..2^13),
    the extension's default elsewhere (ops/fwht.py)."""
    import importlib

    fwht_ops = importlib.import_module("kron_kernels.ops.fwht")  # kron_kernels.ops.fwht is the function

    for log_n in range(0, 16):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.empty(1, 1 << log_n, dtype=dtype)
            want = "triton" if dtype != torch.float32 and 10 <= log_n <= 13 else None
            assert fwht_ops._cuda_auto(x, 1 << log_n) == want, (log_n, dtype)
