"""kron_delta / kron_matmul / kron_linear against the naive reference, on every backend."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kron_kernels as kk
from kron_kernels.reference import kadaptation as ref
from utils import (RTOL, TRITON_DEVICES, assert_rel_close, compare_low_precision, compare_with_reference,
                   needs_interpreter, outputs_and_grads, to_device)

# (m, a_out, a_in, p, q, r, leading token shape): odd sizes, r = 1, N = 1, MR > 32 (rank chunks)
SHAPES = [
    pytest.param((3, 5, 4, 6, 7, 2, (9,)), id="m3-ao5-ai4-p6-q7-r2-N9"),
    pytest.param((1, 1, 1, 1, 1, 1, (1,)), id="m1-a1-p1-q1-r1-N1"),
    pytest.param((2, 3, 3, 5, 5, 1, (1,)), id="m2-a3-p5-q5-r1-N1"),
    pytest.param((32, 4, 4, 24, 24, 1, (2, 7)), id="m32-d96-r1-B2x7"),
    pytest.param((5, 5, 8, 40, 25, 3, (37,)), id="m5-d200-r3-N37"),
    pytest.param((4, 8, 8, 6, 6, 20, (33,)), id="m4-d48-r20-N33-chunked"),
]
SMALL_SHAPES = SHAPES[:3]


def make_inputs(shape, dtype=torch.float64, seed=0, weight_grad=False):
    m, a_out, a_in, p, q, r, lead = shape
    gen = torch.Generator().manual_seed(seed)

    def rnd(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype)

    x = rnd(*lead, a_in * q).requires_grad_()
    W = rnd(a_out * p, a_in * q).requires_grad_(weight_grad)
    b = rnd(a_out * p).requires_grad_(weight_grad)
    A = rnd(m, a_out, a_in).requires_grad_()
    U = rnd(m, p, r).requires_grad_()
    V = rnd(m, q, r).requires_grad_()
    return x, W, b, A, U, V


SCALE = 0.7


def fused_linear(x, W, b, A, U, V):
    return kk.kron_linear(x, W, b, A, U, V, SCALE)


def ref_linear(x, W, b, A, U, V):
    return ref.kron_linear(x, W, b, A, U, V, SCALE)


def fused_matmul(x, A, U, V):
    return kk.kron_matmul(x, A, U, V, SCALE)


def ref_matmul(x, A, U, V):
    return ref.kron_matmul(x, A, U, V, SCALE)


def fused_delta(A, U, V):
    return kk.kron_delta(A, U, V, SCALE)


def ref_delta(A, U, V):
    return ref.kron_delta(A, U, V, SCALE)


# ---------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trainable-weight"])
def test_kron_linear_torch_float64(shape, weight_grad):
    x, W, b, A, U, V = make_inputs(shape, weight_grad=weight_grad)
    with kk.use_backend("torch"):
        compare_with_reference(fused_linear, ref_linear, [x, W, b, A, U, V], RTOL[torch.float64])


@pytest.mark.parametrize("shape", SHAPES)
def test_kron_matmul_torch_float64(shape):
    x, _, _, A, U, V = make_inputs(shape)
    with kk.use_backend("torch"):
        compare_with_reference(fused_matmul, ref_matmul, [x, A, U, V], RTOL[torch.float64])


@pytest.mark.parametrize("shape", SHAPES)
def test_kron_delta_torch_float64(shape):
    _, _, _, A, U, V = make_inputs(shape)
    with kk.use_backend("torch"):
        compare_with_reference(fused_delta, ref_delta, [A, U, V], RTOL[torch.float64])


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_gradcheck_torch(shape):
    x, W, b, A, U, V = make_inputs(shape, weight_grad=True)
    with kk.use_backend("torch"):
        assert torch.autograd.gradcheck(fused_linear, (x, W, b, A, U, V))
        assert torch.autograd.gradcheck(fused_matmul, (x, A, U, V))
        assert torch.autograd.gradcheck(fused_delta, (A, U, V))


def test_kron_linear_without_bias():
    x, W, _, A, U, V = make_inputs((3, 5, 4, 6, 7, 2, (9,)))
    with kk.use_backend("torch"):
        compare_with_reference(
            lambda x, A, U, V: kk.kron_linear(x, W, None, A, U, V),
            lambda x, A, U, V: ref.kron_linear(x, W, None, A, U, V),
            [x, A, U, V],
            RTOL[torch.float64],
        )


class _LargestAllocation(TorchDispatchMode):
    """Records the largest *new* tensor any aten op produces (views of inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("op", ["kron_matmul", "kron_linear"])
def test_never_materialises_delta(op):
    """With few tokens every structured intermediate is far below d_out*d_in elements,
    so any d x d tensor (the increment or a dense weight gradient) would show up."""
    shape = (32, 32, 32, 24, 24, 1, (4,))  # d = 768, as KAdaptation on ViT-B
    x, W, b, A, U, V = make_inputs(shape, dtype=torch.float32)
    d2 = W.numel()
    with kk.use_backend("torch"):
        with _LargestAllocation() as mode:
            y = kk.kron_matmul(x, A, U, V) if op == "kron_matmul" else kk.kron_linear(x, W, b, A, U, V)
            y.sum().backward()
    assert A.grad is not None and V.grad is not None and x.grad is not None
    assert mode.largest < d2 // 8, f"an op produced {mode.largest} elements (d_out*d_in = {d2})"


# ------------------------------------------- Triton (interpreter on CPU tensors, or CUDA)
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kron_linear_triton_fp32(shape, device):
    inputs = to_device(make_inputs(shape, dtype=torch.float32), device)
    with kk.use_backend("triton"):
        compare_with_reference(fused_linear, ref_linear, inputs, RTOL[torch.float32], torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kron_matmul_triton_fp32(shape, device):
    x, _, _, A, U, V = to_device(make_inputs(shape, dtype=torch.float32), device)
    with kk.use_backend("triton"):
        compare_with_reference(fused_matmul, ref_matmul, [x, A, U, V], RTOL[torch.float32], torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kron_delta_triton_fp32(shape, device):
    _, _, _, A, U, V = to_device(make_inputs(shape, dtype=torch.float32), device)
    with kk.use_backend("triton"):
        compare_with_reference(fused_delta, ref_delta, [A, U, V], RTOL[torch.float32], torch.float64)


@pytest.mark.parametrize("impl, device", [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("dense", "cpu", id="dense"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=needs_interpreter),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_kron_delta_delivers_the_dtype_rounded_once(dtype, impl, device):
    """kron_delta(..., dtype=) (the Compacter modules' PHM weights under autocast): the fp32 increment
    rounded once to ``dtype`` as it is stored -- the torch paths bit for bit what converting
    kron_delta's result gives, the Triton kernel within one unit of the last place (the
    interpreter converts toward zero) -- and the factors' gradients those of that conversion."""
    _, _, _, A, U, V = to_device(make_inputs(SHAPES[3].values[0], dtype=torch.float32), device)
    grad = torch.randn(A.shape[1] * U.shape[1], A.shape[2] * V.shape[1], generator=torch.Generator().manual_seed(4))
    grad = grad.to(device=device, dtype=dtype)
    with kk.use_backend(impl):
        got = kk.kron_delta(A, U, V, 0.5, dtype=dtype)
        want = kk.kron_delta(A, U, V, 0.5).to(dtype)
    assert got.dtype == dtype and got.shape == want.shape
    if impl == "triton" and dtype != torch.float64:
        ulp = torch.finfo(dtype).eps * want.abs().to(torch.float32)
        assert ((got.float() - want.float()).abs() <= ulp + torch.finfo(dtype).tiny).all()
    else:
        assert torch.equal(got, want)
    g_got = torch.autograd.grad(got, (A, U, V), grad)
    g_want = torch.autograd.grad(want, (A, U, V), grad)
    for name, g, w in zip("AUV", g_got, g_want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.int32, "bfloat16", torch.bool, 2])
def test_kron_delta_bad_dtype_names_it(dtype):
    _, _, _, A, U, V = make_inputs(SHAPES[2].values[0], dtype=torch.float32)
    with pytest.raises(TypeError, match=r"^dtype must be a floating torch.dtype or None"):
        kk.kron_delta(A, U, V, dtype=dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[5]])
def test_kron_linear_triton_low_precision(shape, dtype, device):
    x, W, b, A, U, V = to_device(make_inputs(shape, dtype=torch.float32), device)
    with kk.use_backend("triton"):
        compare_low_precision(fused_linear, ref_linear, [x, W, b, A, U, V], dtype, activations=(0, 1, 2))
        compare_low_precision(fused_matmul, ref_matmul, [x, A, U, V], dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kron_linear_triton_small_shared_memory_config(monkeypatch, device):
    """Devices with < 96 KB of shared memory per block (T4) run the forward at BLOCK_N = 8."""
    from kron_kernels.triton import GPUProperties, simulate_gpu
    from kron_kernels.triton import kron as triton_kron

    with simulate_gpu(GPUProperties("T4", (7, 5), 40, 64 * 1024)):
        assert triton_kron._fwd_block_n(torch.device("cuda", 0)) == 8
    with simulate_gpu(GPUProperties("H100", (9, 0), 132, 227 * 1024)):
        assert triton_kron._fwd_block_n(torch.device("cuda", 0)) == 16
    monkeypatch.setattr(triton_kron, "_fwd_block_n", lambda device: 8)
    # N = 37: a tail at BLOCK_N = 8
    inputs = to_device(make_inputs(SHAPES[4].values[0], dtype=torch.float32), device)
    with kk.use_backend("triton"):
        compare_with_reference(fused_linear, ref_linear, inputs, RTOL[torch.float32], torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_non_contiguous_x(device):
    x, W, b, A, U, V = to_device(make_inputs((3, 5, 4, 6, 7, 2, (9,)), dtype=torch.float32), device)
    wide = torch.randn(9, 3 * x.shape[-1], device=device)
    x_strided = wide[:, ::3].requires_grad_()  # column stride 3
    x_transposed = torch.randn(x.shape[-1], 9, device=device).t().requires_grad_()  # row stride 1
    for xn in (x_strided, x_transposed):
        assert not xn.is_contiguous()
        with kk.use_backend("triton"):
            compare_with_reference(fused_linear, ref_linear, [xn, W, b, A, U, V], RTOL[torch.float32], torch.float64)


def test_torch_non_contiguous_and_batch():
    x, W, b, A, U, V = make_inputs((3, 5, 4, 6, 7, 2, (9,)))
    xn = torch.randn(2, x.shape[-1], 9, dtype=torch.float64).transpose(1, 2).requires_grad_()
    with kk.use_backend("torch"):
        compare_with_reference(fused_linear, ref_linear, [xn, W, b, A, U, V], RTOL[torch.float64])


def dense_kron_linear(x, W, b, A, U, V, scale=SCALE):
    """``x @ (W + scale * sum_i kron(A_i, U_i V_i^T)).T + b`` with the increment built by
    torch.kron, term by term: independent of reference/kadaptation.py's 5-D einsum."""
    delta = sum(torch.kron(A[i], U[i] @ V[i].t()) for i in range(A.shape[0]))
    return torch.nn.functional.linear(x, W + scale * delta.to(W.dtype), b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_and_torch_backends_bf16_with_batch_dims(device):
    """bf16 x/W/b with batch dims (2, 3) and fp32 factors on both backends. They are not
    bitwise equal (the Triton path rounds the increment plus bias to bf16 before the frozen
    GEMM adds onto it, and the interpreter's fp32->bf16 cast truncates), so each is held to
    the float64 result instead:
    * the torch backend computes in fp32 and rounds once (round-to-nearest), so every element
      is within half a bf16 ulp of the exact value, ``u |y|`` with u = 2^-8, plus fp32 noise
      bounded by 1e-5 times the magnitude ``|x| @ (|W| + |delta|).T + |b|``;
    * both backends, output and gradients, obey the low-precision rule
      (utils.compare_low_precision: at most twice the naive bf16 reference's error)."""
    inputs = to_device(make_inputs((3, 5, 4, 6, 7, 2, (2, 3)), dtype=torch.float32), device)
    xb, Wb, bb = (t.detach().to(torch.bfloat16) for t in inputs[:3])
    A, U, V = (t.detach() for t in inputs[3:])
    exact = dense_kron_linear(*(t.double() for t in (xb, Wb, bb, A, U, V)))
    magnitude = dense_kron_linear(*(t.double().abs() for t in (xb, Wb, bb, A, U, V)))
    with kk.use_backend("torch"):
        y = fused_linear(xb, Wb, bb, A, U, V)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 30)
    excess = (y.double() - exact).abs() - (2**-8 * exact.abs() + 1e-5 * magnitude)
    assert excess.max() <= 0, f"torch backend: an element is off by more than one rounding ({excess.max():.2e})"
    for name in ("triton", "torch"):
        with kk.use_backend(name):
            got = compare_low_precision(fused_linear, ref_linear, inputs, torch.bfloat16, activations=(0, 1, 2))
        assert got["out"].dtype == torch.bfloat16 and got["out"].shape == (2, 3, 30), name


# ------------------------------------------------------------------- row-slice targets
def make_slice_inputs(dtype=torch.float64, seed=1, lead=(2, 9)):
    """A fused-qkv-like layer: d_in = 4*6 = 24, three 30-row slices, increments on the first
    (m=3, a_out=5, p=6) and the last (m=2, a_out=3, p=10, r=3)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*size, grad=True):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)

    x = rnd(*lead, 24)
    W, b = rnd(90, 24, grad=False), rnd(90, grad=False)
    q = (rnd(3, 5, 4), rnd(3, 6, 2), rnd(3, 6, 2))
    v = (rnd(2, 3, 2), rnd(2, 10, 3), rnd(2, 12, 3))
    return x, W, b, q, v


def fused_slices(x, W, b, Aq, Uq, Vq, Av, Uv, Vv):
    return kk.kron_linear_slices(x, W, b, [(0, Aq, Uq, Vq), (60, Av, Uv, Vv)], SCALE)


def ref_slices(x, W, b, Aq, Uq, Vq, Av, Uv, Vv):
    full = torch.zeros_like(W)
    full = full.index_add(0, torch.arange(0, 30, device=W.device), ref.kron_delta(Aq, Uq, Vq, SCALE).to(W.dtype))
    full = full.index_add(0, torch.arange(60, 90, device=W.device), ref.kron_delta(Av, Uv, Vv, SCALE).to(W.dtype))
    return torch.nn.functional.linear(x, W + full, b)


def test_kron_linear_slices_torch_float64():
    x, W, b, q, v = make_slice_inputs()
    with kk.use_backend("torch"):
        compare_with_reference(fused_slices, ref_slices, [x, W, b, *q, *v], RTOL[torch.float64])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kron_linear_slices_triton_fp32(device):
    x, W, b, q, v = make_slice_inputs(torch.float32)
    inputs = to_device([x, W, b, *q, *v], device)
    with kk.use_backend("triton"):
        compare_with_reference(fused_slices, ref_slices, inputs, RTOL[torch.float32], torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kron_linear_slices_triton_low_precision(dtype, device):
    x, W, b, q, v = make_slice_inputs(torch.float32)
    inputs = to_device([x, W, b, *q, *v], device)
    with kk.use_backend("triton"):
        compare_low_precision(fused_slices, ref_slices, inputs, dtype, activations=(0, 1, 2))


@pytest.mark.parametrize("impl, dtype, device", [
    pytest.param("torch", torch.float64, "cpu", id="torch-fp64"),
    pytest.param("triton", torch.float32, "cpu", id="triton-fp32-interpreter", marks=needs_interpreter),
    pytest.param("triton", torch.float32, "cuda", id="triton-fp32-cuda", marks=pytest.mark.gpu),
    pytest.param("dense", torch.float32, "cuda", id="dense-fp32-cuda", marks=pytest.mark.gpu),
])
def test_kron_linear_slices_matches_kron_linear_on_full_rows(impl, dtype, device):
    """One target covering every row: kron_linear_slices computes what kron_linear does, and
    both (output and every gradient) match the dense torch.kron formula in float64."""
    x, W, b, A, U, V = to_device(make_inputs((3, 5, 4, 6, 7, 2, (9,)), dtype=dtype, weight_grad=True), device)
    with kk.use_backend(impl):
        full = kk.kron_linear(x, W, b, A, U, V, SCALE)
        sliced = kk.kron_linear_slices(x, W, b, [(0, A, U, V)], SCALE)
        assert torch.equal(full, sliced)
        for op in (fused_linear, lambda x, W, b, A, U, V: kk.kron_linear_slices(x, W, b, [(0, A, U, V)], SCALE)):
            compare_with_reference(op, dense_kron_linear, [x, W, b, A, U, V], RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize(
    "targets, match",
    [
        pytest.param(lambda q, v: [(0, *q), (20, *v)], "overlap", id="overlap"),
        pytest.param(lambda q, v: [(0, *q), (61, *v)], "within the 90 output rows", id="out-of-range"),
        pytest.param(lambda q, v: [(0, *q), (60, q[0], q[1], v[2])], "number of Kronecker terms", id="bad-factors"),
        pytest.param(lambda q, v: [], "non-empty sequence", id="empty"),
        pytest.param(lambda q, v: [(0, q[0], q[1])], r"targets\[0\] must be", id="short"),
        pytest.param(lambda q, v: [(0.5, *q)], "must lie within", id="float-start"),
    ],
)
def test_kron_linear_slices_bad_targets(targets, match):
    x, W, b, q, v = make_slice_inputs(torch.float32)
    with pytest.raises(ValueError, match=match):
        kk.kron_linear_slices(x, W, b, targets(q, v))


def test_kron_linear_slices_target_input_widths_must_agree():
    x, W, b, q, v = make_slice_inputs(torch.float32)
    other = (torch.randn(3, 5, 2), torch.randn(3, 6, 2), torch.randn(3, 6, 2))  # a_in*q = 12, not 24
    with pytest.raises(ValueError, match="same input width"):
        kk.kron_linear_slices(x, W, b, [(0, *q), (60, *other)])


# ---------------------------------------------------------------------------- dtype rules
def test_autocast_runs_in_autocast_dtype():
    """fp32 inputs under bf16 autocast: x, W and b are cast to bf16 as nn.Linear's would be,
    the output is bf16, the gradients keep their inputs' fp32; and the values obey the
    low-precision rule against the float64 result on the bf16-cast x, W, b (the op itself
    does the cast: ``cast_activations=False``)."""
    x, W, b, A, U, V = make_inputs((3, 5, 4, 6, 7, 2, (9,)), dtype=torch.float32)

    def under_autocast(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear(*args)

    got = compare_low_precision(under_autocast, ref_linear, [x, W, b, A, U, V], torch.bfloat16,
                                activations=(0, 1, 2), cast_activations=False)
    assert got["out"].dtype == torch.bfloat16
    assert [got[f"grad[{i}]"].dtype for i in (0, 3, 4, 5)] == [torch.float32] * 4


# ---------------------------------------------------------------------------- bad inputs
def _bad_cases():
    x, W, b, A, U, V = make_inputs((3, 5, 4, 6, 7, 2, (9,)), dtype=torch.float32)
    return [
        pytest.param(lambda: kk.kron_matmul(x, A[0], U, V), ValueError, "A must be 3-D", id="A-2d"),
        pytest.param(lambda: kk.kron_matmul(x, A, U[:2], V), ValueError, "number of Kronecker terms", id="m-mismatch"),
        pytest.param(lambda: kk.kron_matmul(x, A, U, V[..., :1]), ValueError, "same rank", id="r-mismatch"),
        pytest.param(lambda: kk.kron_matmul(x[:, :-1], A, U, V), ValueError, "x's last dim", id="x-width"),
        pytest.param(lambda: kk.kron_matmul(x.long(), A, U, V), TypeError, "x must have dtype", id="x-int"),
        pytest.param(lambda: kk.kron_matmul(x, A.int(), U, V), TypeError, "A must have dtype", id="A-int"),
        pytest.param(lambda: kk.kron_matmul(x.to("meta"), A, U, V), ValueError, "x is on meta", id="x-device"),
        pytest.param(lambda: kk.kron_matmul(x, A, U, V, scale=torch.tensor(1.0)), TypeError, "scale", id="scale"),
        pytest.param(lambda: kk.kron_linear(x, W[:, :-1], b, A, U, V), ValueError, "weight must have shape", id="W-shape"),
        pytest.param(lambda: kk.kron_linear(x, W.double(), b, A, U, V), TypeError, "weight has dtype", id="W-dtype"),
        pytest.param(lambda: kk.kron_linear(x, W, b[:-1], A, U, V), ValueError, "bias must have shape", id="b-shape"),
        pytest.param(lambda: kk.kron_linear(x, None, b, A, U, V), ValueError, "weight is required", id="W-none"),
        pytest.param(lambda: kk.kron_delta(A, U[:, :, :0], V[:, :, :0]), ValueError, ">= 1", id="r0"),
    ]


@pytest.mark.parametrize("call, exc, match", _bad_cases())
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_refuses_float64_clearly(device):
    x, W, b, A, U, V = to_device(make_inputs((3, 5, 4, 6, 7, 2, (9,))), device)
    with kk.use_backend("triton"), pytest.raises(kk.BackendUnavailableError, match="float64"):
        kk.kron_matmul(x, A, U, V)


# ---------------------------------------------------------------------------- GPU
GPU_SHAPES = [
    pytest.param((32, 32, 32, 24, 24, 1, (64 * 197,)), id="vitb-d768-n32-r1"),
    pytest.param((32, 32, 32, 24, 24, 4, (64 * 197,)), id="vitb-d768-n32-r4"),
    pytest.param((32, 32, 32, 32, 32, 1, (64 * 197,)), id="vitl-d1024-n32-r1"),
    pytest.param((32, 32, 32, 32, 32, 4, (8, 197)), id="vitl-d1024-n32-r4-B8"),
]


# auto takes the dense composition on CUDA (ops/kron.py ``_CUDA_AUTO``), so the implementations
# are named: the structured Triton kernels and the dense (cuBLAS-first) composition
GPU_IMPLS = ["triton", "dense"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_fp32(shape, impl):
    x, W, b, A, U, V = to_device(make_inputs(shape, torch.float32), "cuda")
    # fp32 activations use IEEE dots: error ~ sqrt(d) * 2^-24 relative, well under 1e-4 (a TF32
    # dot, 2^-11 per product, would not be)
    with kk.use_backend(impl):
        compare_with_reference(fused_linear, ref_linear, [x, W, b, A, U, V], RTOL[torch.float32], torch.float64)
        compare_with_reference(fused_matmul, ref_matmul, [x, A, U, V], RTOL[torch.float32], torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_kron_delta_fp32(shape):
    """kron_delta has no dense composition: Triton (auto's choice on CUDA) and explicitly."""
    _, _, _, A, U, V = to_device(make_inputs(shape, torch.float32), "cuda")
    for impl in ("auto", "triton"):
        with kk.use_backend(impl):
            compare_with_reference(fused_delta, ref_delta, [A, U, V], RTOL[torch.float32], torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_bf16(shape, impl):
    x, W, b, A, U, V = to_device(make_inputs(shape, torch.float32), "cuda")
    with kk.use_backend(impl):
        compare_low_precision(fused_linear, ref_linear, [x, W, b, A, U, V], torch.bfloat16, activations=(0, 1, 2))
        compare_low_precision(fused_matmul, ref_matmul, [x, A, U, V], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_beyond_int32_offsets():
    """x with more than 2^31 elements (2.8M ViT-B tokens in bf16, 4.3 GB): the kernels' token
    offsets must be int64. The Triton kernels' output and dx on the last 512 tokens, and the
    factor gradients of a cotangent that is zero on every other token (so only those tokens
    contribute), against the float64 reference on those tokens alone. 2^-6 (relative to the
    largest element) covers two bf16 roundings of out and dx (the kron term's buffer, then the
    frozen GEMM's output) and TF32 products; an int32 offset gives garbage or a fault."""
    m, a, p, r, tail = 32, 32, 24, 1, 512
    d = a * p
    n = 2**31 // d + 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * d * 2:
        pytest.skip(f"needs {5 * n * d * 2 / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB are")
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    x.requires_grad_()
    _, W, b, A, U, V = to_device(make_inputs((m, a, a, p, p, r, (1,)), dtype=torch.float32), "cuda")
    W, b = W.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16)
    g_tail = torch.randn(tail, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(torch.bfloat16)
    with kk.use_backend("triton"):
        y = kk.kron_linear(x, W, b, A, U, V, SCALE)
    dy = torch.zeros_like(y)
    dy[-tail:] = g_tail.cuda()
    gx, gA, gU, gV = torch.autograd.grad(y, (x, A, U, V), dy)
    del dy
    leaves = [x.detach()[-tail:].double()] + [t.detach().double() for t in (A, U, V)]
    leaves = [t.requires_grad_() for t in leaves]
    want = ref.kron_linear(leaves[0], W.double(), b.double(), *leaves[1:], SCALE)
    want_grads = torch.autograd.grad(want, leaves, g_tail.double().cuda())
    assert_rel_close(y[-tail:], want, 2**-6, "out (last tokens)")
    for name, got, w in zip(("dx (last tokens)", "dA", "dU", "dV"), (gx[-tail:], gA, gU, gV), want_grads):
        assert_rel_close(got, w, 2**-6, name)


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_torch_compile_fullgraph_torch_backend(fresh_dynamo):
    """The ops trace into one graph (forward and backward) with no graph break."""
    x, W, b, q, v = make_slice_inputs(torch.float32)

    def fn(x, Aq, Uq, Vq, Av, Uv, Vv):
        return kk.kron_linear_slices(x, W, b, [(0, Aq, Uq, Vq), (60, Av, Uv, Vv)], SCALE)

    def exact(x, Aq, Uq, Vq, Av, Uv, Vv):
        return ref_slices(x, W.double(), b.double(), Aq, Uq, Vq, Av, Uv, Vv)

    with kk.use_backend("torch"):
        got = outputs_and_grads(torch.compile(fn, fullgraph=True), [x, *q, *v])
    want = outputs_and_grads(exact, [t.double() for t in (x, *q, *v)])  # the float64 reference
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float32], name)


# ----------------------------------------------------------------------------------------
# kron_deltas: K increments sharing A, built together
# ----------------------------------------------------------------------------------------
def deltas_inputs(K=3, shape=(3, 5, 4, 6, 7, 2), dtype=torch.float64, seed=4):
    m, a_out, a_in, p, q, r = shape
    gen = torch.Generator().manual_seed(seed)

    def rnd(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    return rnd(m, a_out, a_in), [rnd(m, p, r) for _ in range(K)], [rnd(m, q, r) for _ in range(K)]


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6, 7, 2), (4, 1, 4, 8, 1, 1)], ids=["m3-r2", "phm-down-rank1"])
def test_kron_deltas_float64(K, shape):
    """Each of the K increments and every factor's gradient (A's the sum over the K) against
    the reference's kron_delta, one increment at a time."""
    A, Us, Vs = deltas_inputs(K, shape)

    def fused(A, *UV):
        return torch.stack(kk.kron_deltas(A, UV[:K], UV[K:], SCALE))

    def reference(A, *UV):
        return torch.stack([ref.kron_delta(A, U, V, SCALE) for U, V in zip(UV[:K], UV[K:])])

    compare_with_reference(fused, reference, [A, *Us, *Vs], RTOL[torch.float64])


def test_kron_deltas_gradcheck():
    A, Us, Vs = deltas_inputs(2, (2, 2, 3, 2, 3, 2))
    assert torch.autograd.gradcheck(lambda A, *UV: torch.stack(kk.kron_deltas(A, UV[:2], UV[2:], SCALE)),
                                    (A, *Us, *Vs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kron_deltas_round_once_as_stored(dtype):
    """``dtype=``: the fp32 increments rounded once as they are stored (bit for bit)."""
    A, Us, Vs = deltas_inputs(3, dtype=torch.float32)
    got = kk.kron_deltas(A, Us, Vs, SCALE, dtype=dtype)
    want = kk.kron_deltas(A, Us, Vs, SCALE)
    assert all(g.dtype == dtype and torch.equal(g, w.to(dtype)) for g, w in zip(got, want))


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_kron_deltas_has_no_kernel_backend(backend_name):
    A, Us, Vs = deltas_inputs(2)
    with kk.use_backend(backend_name), pytest.raises(kk.BackendUnavailableError, match="kron_deltas"):
        kk.kron_deltas(A, Us, Vs)


@pytest.mark.parametrize("call, error, match", [
    (lambda A, Us, Vs: kk.kron_deltas(A, Us[0], Vs), TypeError, "Us must be a non-empty sequence"),
    (lambda A, Us, Vs: kk.kron_deltas(A, [], []), TypeError, "Us must be a non-empty sequence"),
    (lambda A, Us, Vs: kk.kron_deltas(A, Us, Vs[:2]), ValueError, "one factor per increment: 3 and 2"),
    (lambda A, Us, Vs: kk.kron_deltas(A, Us, [Vs[0], Vs[1], Vs[2][:, :4]]), ValueError,
     "every U .and every V. must share one shape"),
    (lambda A, Us, Vs: kk.kron_deltas(A, Us, [Vs[0], Vs[1], Vs[2][:, :, :1]]), ValueError,
     r"same rank r.*\(increment 2\)"),
    (lambda A, Us, Vs: kk.kron_deltas(A[:2], Us, Vs), ValueError, r"same number of Kronecker terms.*\(increment 0\)"),
    (lambda A, Us, Vs: kk.kron_deltas(A, Us, Vs, dtype=torch.int32), TypeError, "dtype must be a floating"),
    (lambda A, Us, Vs: kk.kron_deltas(A, Us, Vs, scale="2"), TypeError, "scale must be a real number"),
], ids=["not-a-sequence", "empty", "lengths", "V-shapes", "ranks", "terms", "dtype", "scale"])
def test_kron_deltas_bad_arguments(call, error, match):
    A, Us, Vs = deltas_inputs(3)
    with pytest.raises(error, match=match):
        call(A, Us, Vs)
