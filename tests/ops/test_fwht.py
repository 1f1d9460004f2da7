"""kk.fwht against dense scipy.linalg.hadamard products, on every backend."""
import importlib
import subprocess
import sys
import textwrap

import pytest
import scipy.linalg
import torch

import kron_kernels as kk
from kron_kernels import backend
from utils import (
    RTOL, TRITON_DEVICES, assert_rel_close, compare_low_precision, compare_with_reference, needs_interpreter,
    outputs_and_grads,
)

fwht_ops = importlib.import_module("kron_kernels.ops.fwht")  # kron_kernels.ops.fwht is the function
EXTENSION_OK, EXTENSION_REASON = backend.extension_status()
needs_extension = pytest.mark.skipif(
    not EXTENSION_OK, reason=f"the compiled extension is not built here: {EXTENSION_REASON}"
)

SCALE = 0.37
MAX_DENSE = 2**10  # beyond this the dense H would be >= 8 MiB in fp64; use its Kronecker factors


def hadamard(n: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.from_numpy(scipy.linalg.hadamard(n)).to(device=device, dtype=dtype)


def fwht_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ H`` with scipy's dense H; for n > 2^10 through H_{ab} = H_a (x) H_b
    (Sylvester: H_{2n} = H_2 (x) H_n), i.e. with X the row as an (a, b) matrix, ``H_a X H_b``
    -- products of dense scipy matrices, no butterfly. Runs in x's dtype (differentiable)."""
    n = x.shape[-1]
    if n <= MAX_DENSE:
        return (x @ hadamard(n, x.dtype, x.device)) * scale
    a = 2 ** ((n.bit_length() - 1) // 2)
    b = n // a
    X = x.reshape(*x.shape[:-1], a, b)
    Y = hadamard(a, x.dtype, x.device) @ X @ hadamard(b, x.dtype, x.device)
    return Y.reshape(x.shape) * scale


def rand(*shape, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def fused(x):
    return kk.fwht(x, SCALE)


def ref(x):
    return fwht_reference(x, SCALE)


# every size 1 ... 2^15 with a few rows (3 rows x 2^15 is still only 100k elements)
ALL_LOGS = list(range(16))
SMALL_LOGS = [0, 1, 2, 3, 4, 5, 7, 8, 10]


def test_reference_factorisation_matches_dense_scipy():
    """The Kronecker path of the reference is scipy's own matrix (checked at 2^11 > MAX_DENSE)."""
    n = 2**11
    x = rand(2, n)
    assert_rel_close(fwht_reference(x), x @ hadamard(n), 1e-12, "H_a X H_b vs x @ H")
    assert torch.equal(hadamard(2**8), torch.kron(hadamard(2**4), hadamard(2**4)))


# ---------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("log_n", ALL_LOGS, ids=[f"n{2**k}" for k in ALL_LOGS])
def test_torch_matches_scipy(log_n):
    x = rand(3, 2**log_n).requires_grad_()
    with kk.use_backend("torch"):
        compare_with_reference(fused, ref, [x], RTOL[torch.float64])


@pytest.mark.parametrize("log_n", [0, 1, 3, 5])
def test_gradcheck_torch(log_n):
    x = rand(2, 3, 2**log_n).requires_grad_()
    with kk.use_backend("torch"):
        assert torch.autograd.gradcheck(fused, (x,))
        assert torch.autograd.gradgradcheck(fused, (x,))


# ---------------------------------------------------------------------------- compiled extension (CPU)
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("log_n", ALL_LOGS, ids=[f"n{2**k}" for k in ALL_LOGS])
def test_extension_cpu_matches_scipy(log_n, dtype):
    # fp32: every output is a sum of n terms of size ~1 in fp32 arithmetic; relative to the
    # output's max |y| ~ sqrt(n), the error stays ~1e-6, far under RTOL (1e-4)
    x = rand(3, 2**log_n, dtype=dtype).requires_grad_()
    with kk.use_backend("cuda"):
        compare_with_reference(fused, ref, [x], RTOL[dtype], ref_dtype=torch.float64)


@needs_extension
def test_extension_cpu_is_auto_choice():
    assert backend.select("fwht", torch.device("cpu"), cuda_ops=frozenset({"cuda", "cpu"})) == "cuda"


@needs_extension
def test_extension_reports_kernels_without_touching_cuda():
    code = """
        import torch
        import kron_kernels._C as C
        info = C.kernels()
        assert "cpu" in info["fwht"], info
        if "cuda" in info["fwht"]:  # a CUDA build: it says for which architectures
            assert info["cuda_archs"], info
        assert info["fwht_max_one_pass_log2"] == 15, info
        assert not torch.cuda.is_initialized(), "loading the extension initialised CUDA"
        print(sorted(info["fwht"]), info["cuda_archs"])
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cpu" in proc.stdout


@needs_extension
@pytest.mark.parametrize(
    "x, out, error, match",
    [
        pytest.param(torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32), TypeError, "x must be",
                     id="int-x"),
        pytest.param(torch.ones(4, 6), torch.ones(4, 6), ValueError, "last dim must be a power of two", id="n6"),
        pytest.param(torch.ones(8, 4).t(), torch.ones(4, 8), ValueError, "x must be contiguous", id="strided-x"),
        pytest.param(torch.ones(4, 8), torch.ones(4, 4), ValueError, "out must have x's shape", id="out-shape"),
        pytest.param(torch.ones(4, 8), torch.ones(4, 8, dtype=torch.float16), ValueError, "out must have", id="out-dtype"),
    ],
)
def test_extension_binding_checks(x, out, error, match):
    """The binding itself refuses bad arguments with Python errors naming them (no crash)."""
    with pytest.raises(error, match=match):
        backend.extension().fwht_out(x, out, 1.0)


# ---------------------------------------------- Triton (interpreter on CPU tensors, or CUDA)
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("log_n", SMALL_LOGS, ids=[f"n{2**k}" for k in SMALL_LOGS])
def test_triton_interpreter_matches_scipy(log_n, device):
    x = rand(5, 2**log_n, dtype=torch.float32, device=device).requires_grad_()
    with kk.use_backend("triton"):
        compare_with_reference(fused, ref, [x], RTOL[torch.float32], ref_dtype=torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("log_n, row_log, strided_log", [(5, 2, 2), (7, 3, 2), (6, 6, 2)],
                         ids=["n32-3passes", "n128-4passes", "n64-1pass"])
def test_triton_multipass_split(log_n, row_log, strided_log, dtype, device):
    """H_ab = (H_a (x) I)(I (x) H_b): the multi-pass path, forced at interpreter-sized rows."""
    from kron_kernels.triton import fwht as triton_fwht

    x = rand(6, 2**log_n, dtype=dtype, device=device)
    got = triton_fwht.fwht_forward(x, SCALE, max_row_log=row_log, max_strided_log=strided_log)
    assert got.dtype == dtype
    # bf16: one rounding of the input (exact here: x is already bf16) and one of the output
    # (2^-8 relative to |y|), the fp32 passes between add ~1e-7
    assert_rel_close(got, ref(x.double()), RTOL[torch.float32] if dtype == torch.float32 else 2**-7)


# ---------------------------------------------------------------------------- every backend
# (implementation, device): every backend on the CPU; the Triton kernels and the extension's
# CUDA kernels on a GPU too (the same small shapes: one row, empty batches, strided views)
BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("cuda", "cpu", id="extension-cpu", marks=needs_extension),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=needs_interpreter),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="extension-cuda", marks=[pytest.mark.gpu, needs_extension]),
]


@pytest.mark.parametrize("impl, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("log_n", [4, 9])
def test_low_precision(impl, device, dtype, log_n):
    """DESIGN.md 6 (utils.compare_low_precision): error vs fp64 <= 2 x that of the dense product
    in the same precision + an atol of a fraction of the unit roundoff, in max-abs, RMS and scale."""
    x = rand(7, 2**log_n, device=device)
    with kk.use_backend(impl):
        compare_low_precision(fused, ref, [x.requires_grad_()], dtype)


@pytest.mark.parametrize("impl, device", BACKENDS)
def test_batch_dims_and_noncontiguous(impl, device):
    base = rand(2, 3, 64, dtype=torch.float32, device=device)
    cases = {
        "batch dims": base[:, :, :32],  # also a non-contiguous slice
        "transposed": base.transpose(0, 1),
        "strided last dim": base[..., ::2],
        "one row": base[0, 0],
        "empty batch": base[:0],
    }
    with kk.use_backend(impl):
        for name, x in cases.items():
            got = kk.fwht(x, SCALE)
            assert got.shape == x.shape and got.dtype == x.dtype, name
            if x.numel():
                assert_rel_close(got, ref(x.double()), RTOL[torch.float32], name)


@pytest.mark.parametrize("impl, device", BACKENDS)
def test_involution_and_scale(impl, device):
    """H H = n I: with scale n^-1/2 the transform is its own inverse; scale multiplies."""
    n = 256
    x = rand(4, n, dtype=torch.float32, device=device)
    with kk.use_backend(impl):
        assert_rel_close(kk.fwht(kk.fwht(x, n**-0.5), n**-0.5), x, 1e-5, "orthonormal involution")
        assert_rel_close(kk.fwht(x, -2.5), -2.5 * kk.fwht(x), 1e-6, "scale")


@pytest.mark.parametrize(
    "x, scale, error, match",
    [
        pytest.param(torch.ones(3, 12), 1.0, ValueError, "x's last dim must be a power of two", id="n12"),
        pytest.param(torch.ones(3, 0), 1.0, ValueError, "x's last dim must be a power of two", id="n0"),
        pytest.param(torch.tensor(1.0), 1.0, ValueError, "x must have at least 1 dims", id="0-d"),
        pytest.param(torch.ones(3, 8, dtype=torch.int64), 1.0, TypeError, "x must have dtype", id="int64"),
        pytest.param(torch.ones(3, 8, dtype=torch.complex64), 1.0, TypeError, "x must have dtype", id="complex"),
        pytest.param([1.0, 2.0], 1.0, TypeError, "x must be a torch.Tensor", id="list"),
        pytest.param(torch.ones(3, 8), torch.tensor(2.0), TypeError, "scale must be a Python number", id="scale-tensor"),
        pytest.param(torch.ones(3, 8), None, TypeError, "scale must be a real number", id="scale-none"),
    ],
)
def test_bad_inputs(x, scale, error, match):
    with pytest.raises(error, match=match):
        kk.fwht(x, scale)


def test_explicit_triton_refuses_float64():
    kk.set_backend("triton")
    with pytest.raises(kk.BackendUnavailableError, match="float64"):
        kk.fwht(torch.ones(2, 8, dtype=torch.float64))


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("impl, device", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 16), (4, 1)], ids=["n16", "n1"])
def test_opcheck(impl, device, shape):
    """The ``kron_kernels::fwht`` custom op (torch.compile's path): schema (n = 1 included: the
    output never aliases x), fake tensor (shape, dtype, strides), autograd registration and AOT
    dispatch, on each implementation."""
    x = rand(*shape, dtype=torch.float32, device=device).requires_grad_()
    torch.library.opcheck(fwht_ops._fwht_op, (x, SCALE, impl))


@pytest.mark.slow  # Inductor's first compile in a process, C++ codegen with a cold cache: ~11 s
@pytest.mark.parametrize("impl, device", BACKENDS)
def test_torch_compile_fullgraph(impl, device, fresh_dynamo):
    """``torch.compile(fullgraph=True)`` captures kk.fwht without a graph break (it raises
    otherwise) and equals eager bit for bit, forward and backward: the graph runs the same
    kernel on the same rows; around it only a copy of the strided input and the slice's
    backward (zeros and a copy), both exact."""
    x = rand(3, 5, 32, dtype=torch.float32, device=device).requires_grad_()

    def fn(x):
        return kk.fwht(x[:, 1:, ::2], SCALE)  # a strided view: the wrapper's reshape is traced

    with kk.use_backend(impl):
        want = outputs_and_grads(fn, [x])
        got = outputs_and_grads(torch.compile(fn, fullgraph=True), [x])
    for name in want:
        assert torch.equal(got[name], want[name]), name


@needs_interpreter
def test_torch_compile_backend_change_recompiles(monkeypatch, fresh_dynamo):
    """The backend is selected in Python, outside the graph: Dynamo guards on it, so a function
    compiled under 'torch' recompiles under 'triton' (and runs the Triton kernel, giving its
    eager result) instead of reusing the stale graph, and the first graph serves 'torch' again."""
    from kron_kernels.triton import fwht as triton_fwht

    calls = []
    forward = triton_fwht.fwht_forward
    monkeypatch.setattr(triton_fwht, "fwht_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    x = rand(4, 64, dtype=torch.float32)
    compiled = torch.compile(lambda x: kk.fwht(x, SCALE), fullgraph=True)
    with kk.use_backend("torch"):
        want_torch = kk.fwht(x, SCALE)
        assert torch.equal(compiled(x), want_torch) and not calls
    with kk.use_backend("triton"):
        want_triton = kk.fwht(x, SCALE)
        assert len(calls) == 1
        assert torch.equal(compiled(x), want_triton) and len(calls) == 2, "the torch graph was reused"
    with kk.use_backend("torch"):
        assert torch.equal(compiled(x), want_torch) and len(calls) == 2


# ---------------------------------------------------------------------------- GPU
GPU_LOGS = list(range(8, 16)) + [17]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gpu_tol(dtype):
    # fp32: as on the CPU. 16-bit: input exact (generated in the dtype), fp32 arithmetic, one
    # rounding of the output: 2^-8 (bf16) / 2^-11 (fp16) relative to |y|, with headroom 2x
    return RTOL[torch.float32] if dtype == torch.float32 else (2**-7 if dtype == torch.bfloat16 else 2**-10)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("log_n", GPU_LOGS, ids=[f"n{2**k}" for k in GPU_LOGS])
def test_gpu_matches_scipy_and_cpu(log_n, dtype, impl):
    if impl == "cuda" and not EXTENSION_OK:
        pytest.skip(EXTENSION_REASON)
    x = rand(37, 2**log_n, dtype=dtype, device="cuda")
    with kk.use_backend(impl):
        got = kk.fwht(x, SCALE)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert_rel_close(got, ref(x.double().cpu()), _gpu_tol(dtype), "vs scipy")
    with kk.use_backend("torch"):  # the CPU path on the same input (fp32 arithmetic too)
        cpu = kk.fwht(x.cpu(), SCALE)
    assert_rel_close(got, cpu, _gpu_tol(dtype), "vs CPU")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_gradients_and_odd_rows(impl):
    if impl == "cuda" and not EXTENSION_OK:
        pytest.skip(EXTENSION_REASON)
    for rows, log_n in ((1, 0), (3, 3), (129, 6), (5, 16)):
        x = rand(rows, 2**log_n, dtype=torch.float32, device="cuda").requires_grad_()
        with kk.use_backend(impl):
            compare_with_reference(fused, lambda t: ref(t.cpu()).cuda(), [x], RTOL[torch.float32],
                                   ref_dtype=torch.float64)


@pytest.mark.gpu
def test_gpu_misaligned_view():
    """A view starting mid-allocation (not 16-byte aligned) still works (the binding copies)."""
    base = rand(4 * 64 + 1, dtype=torch.float16, device="cuda")
    x = base[1:].view(4, 64)
    got = kk.fwht(x, SCALE)
    assert_rel_close(got, ref(x.double().cpu()), _gpu_tol(torch.float16))


class _Selected(Exception):
    """Raised by the spy once the op has chosen its implementation (nothing runs after it)."""


@pytest.mark.parametrize("extension", [True, False], ids=["extension-built", "no-extension"])
def test_auto_on_cuda_selection(monkeypatch, extension):
    """What ``kk.fwht`` itself selects for a CUDA tensor under auto, on the CPU: a fake CUDA tensor
    (FakeTensorMode, no GPU) reaches the op, a spy on ``backend.select`` records the choice and
    stops the call. With the extension built (CUDA kernels for fwht): Triton for 2-byte rows of
    2^10 .. 2^13 (ops/fwht.py's measured choice table), the extension for every other 16-bit or
    fp32 row; float64 (which neither CUDA kernel takes) the torch path. Without it: Triton, and
    torch for float64."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(backend, "extension_status", lambda: (extension, "" if extension else "not built (test)"))
    monkeypatch.setattr(fwht_ops, "_extension_devices",
                        lambda fp64: frozenset({"cpu"}) if fp64 else frozenset({"cuda", "cpu"}))
    real = backend.select

    def spy(*args, **kwargs):
        raise _Selected(real(*args, **kwargs))

    monkeypatch.setattr(backend, "select", spy)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for log_n in (0, 9, 10, 13, 14, 15):
            with FakeTensorMode():
                x = torch.empty(4, 2**log_n, dtype=dtype, device="cuda")
            with pytest.raises(_Selected) as chosen:
                kk.fwht(x, SCALE)
            if dtype == torch.float64:
                want = "torch"
            elif not extension or (dtype != torch.float32 and 10 <= log_n <= 13):
                want = "triton"
            else:
                want = "cuda"
            assert chosen.value.args[0] == want, (dtype, log_n)
