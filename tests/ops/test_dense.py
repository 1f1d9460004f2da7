"""The dense (cuBLAS-first) backend, which ``auto`` takes on CUDA where no GPU measurement
has shown a fused kernel faster (issues 10, 11):

* Kronecker ops: ``W + delta`` in one GEMM, the weight-gradient GEMM of the adapted rows
  only, contracted onto A, U, V;
* ARC, the LoSA mixer and the Compacter adapter: the references' two GEMMs in the
  activations' dtype, in plain autograd.

Compared with the naive reference (``kron_kernels/reference``) and dense float64 formulas,
like the structured backends in ``test_kron.py``, ``test_bottleneck.py``, ``test_adapter.py``."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kron_kernels as kk
from kron_kernels import backend
from kron_kernels.ops import kron as kron_ops
from kron_kernels.ops.bottleneck import dropout_keep_mask
from test_adapter import adapter_fns, make_inputs as adapter_inputs
from test_bottleneck import ARC_SHAPES, LOSA_SHAPES_TORCH, arc_fns, arc_inputs, losa_fns, losa_inputs, on_backend
from test_kron import (SHAPES, SMALL_SHAPES, fused_linear, fused_matmul, fused_slices, make_inputs, make_slice_inputs,
                       ref_linear, ref_matmul, ref_slices)
from kron_kernels.reference import arc as ref_arc
from kron_kernels.reference import fact as ref_fact
from kron_kernels.reference.kadaptation import kron_delta as ref_kron_delta
from test_kron import SCALE
from utils import RTOL, compare_low_precision, compare_with_reference


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_kron_linear_float64(shape):
    x, W, b, A, U, V = make_inputs(shape, weight_grad=True)
    with kk.use_backend("dense"):
        compare_with_reference(fused_linear, ref_linear, [x, W, b, A, U, V], RTOL[torch.float64])


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_kron_matmul_float64(shape):
    x, _, _, A, U, V = make_inputs(shape)
    with kk.use_backend("dense"):
        compare_with_reference(fused_matmul, ref_matmul, [x, A, U, V], RTOL[torch.float64])


def test_dense_kron_linear_slices_float64():
    x, W, b, q, v = make_slice_inputs()
    with kk.use_backend("dense"):
        compare_with_reference(fused_slices, ref_slices, [x, W, b, *q, *v], RTOL[torch.float64])


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_dense_gradcheck(shape):
    x, W, b, A, U, V = make_inputs(shape)
    with kk.use_backend("dense"):
        assert torch.autograd.gradcheck(fused_linear, (x, W, b, A, U, V))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dense_low_precision(dtype):
    x, W, b, A, U, V = make_inputs((32, 4, 4, 24, 24, 1, (64,)), dtype=torch.float32)
    with kk.use_backend("dense"):
        compare_low_precision(fused_linear, ref_linear, [x, W, b, A, U, V], dtype, activations=(0, 1, 2))


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["N0", "B2xN0"])
def test_dense_zero_tokens(lead):
    x, W, b, A, U, V = make_inputs((3, 5, 4, 6, 7, 2, lead))
    with kk.use_backend("dense"):
        y = fused_linear(x, W, b, A, U, V)
        assert y.shape == (*lead, 30)
        gA, gU, gV = torch.autograd.grad(y.sum(), (A, U, V))
    for g in (gA, gU, gV):
        assert torch.equal(g, torch.zeros_like(g))


# ------------------------------------------------ grouped targets (one launch per step for all)
def grouped_inputs(starts, rows_shape=(3, 5), dtype=torch.float64, layout="contiguous", d_out=None):
    """A layer of d_in = 4*6 = 24 with one increment of one shape (m=3, a_out=rows_shape[0],
    p=rows_shape[1], r=2) at each of ``starts``; ``layout="transposed"`` gives the frozen
    weight column-major strides (the rows views must honour any strides)."""
    gen = torch.Generator().manual_seed(3)

    def rnd(*size, grad=True):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)

    rows = rows_shape[0] * rows_shape[1]
    d_out = d_out or max(starts) + rows + 7
    W = rnd(24, d_out, grad=False).t() if layout == "transposed" else rnd(d_out, 24, grad=False)
    x, b = rnd(2, 9, 24), rnd(d_out, grad=False)
    factors = [t for _ in starts for t in (rnd(3, rows_shape[0], 4), rnd(3, rows_shape[1], 2), rnd(3, 6, 2))]
    return x, W.requires_grad_(True), b.requires_grad_(True), factors


def grouped_fns(starts):
    def fused(x, W, b, *f):
        return kk.kron_linear_slices(x, W, b, [(s, *f[3 * k:3 * k + 3]) for k, s in enumerate(starts)], SCALE)

    def reference(x, W, b, *f):
        full = torch.zeros_like(W)
        for k, s in enumerate(starts):
            delta = ref_kron_delta(*f[3 * k:3 * k + 3], SCALE).to(W.dtype)
            full = full.index_add(0, torch.arange(s, s + delta.shape[0], device=W.device), delta)
        return torch.nn.functional.linear(x, W + full, b)

    return fused, reference


# q and v of a fused qkv (one group of 2, a gap between), adjacent slices (step = rows), three
# slices in a progression; not a progression, and out of order (one group per target)
GROUPINGS = [
    pytest.param((0, 30), 1, id="qv-gap"),
    pytest.param((0, 15), 1, id="adjacent"),
    pytest.param((4, 24, 44), 1, id="three"),
    pytest.param((0, 15, 45), 3, id="not-a-progression"),
    pytest.param((30, 0), 2, id="descending"),
]


@pytest.mark.parametrize("starts, n_groups", GROUPINGS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_dense_grouped_targets_float64(starts, n_groups, layout):
    """Targets of one shape whose starts rise by a constant step share every launch of the
    dense composition (``_groups``); any other set runs target by target. Both agree with the
    reference, for every input's gradient (the frozen weight's and bias' too), and for a
    frozen weight of any strides (the rows views are strided views of it)."""
    x, W, b, factors = grouped_inputs(starts, layout=layout)
    acc = torch.float64
    targets = [(s, *factors[3 * k:3 * k + 3]) for k, s in enumerate(starts)]
    assert len(kron_ops._groups(targets, acc)) == n_groups
    fused, reference = grouped_fns(starts)
    with kk.use_backend("dense"):
        compare_with_reference(fused, reference, [x, W, b, *factors], RTOL[torch.float64])


def test_dense_grouped_targets_of_other_shapes_run_one_by_one():
    x, W, b, q, v = make_slice_inputs()  # q and v of different shapes at 0 and 60
    assert len(kron_ops._groups([(0, *q), (60, *v)], torch.float64)) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dense_grouped_targets_low_precision(dtype):
    """The grouped sums ``W + delta`` are formed in fp32 and rounded once as they are stored
    into the 16-bit weight: the low-precision rule holds for the output and every gradient."""
    x, W, b, factors = grouped_inputs((0, 40), rows_shape=(4, 10), dtype=torch.float32)
    fused, reference = grouped_fns((0, 40))
    with kk.use_backend("dense"):
        compare_low_precision(fused, reference, [x, W, b, *factors], dtype, activations=(0, 1, 2))


def test_dense_grouped_forward_rounds_each_sum_once():
    """Under bf16 autocast the dense weight is ``bf16(W + delta)`` on the adapted rows and
    ``bf16(W)`` elsewhere, bit for bit: the sum is taken in fp32 and rounded as it is stored."""
    starts = (0, 30)
    x, W, b, factors = grouped_inputs(starts, dtype=torch.float32)
    targets = [(s, *(f.detach() for f in factors[3 * k:3 * k + 3])) for k, s in enumerate(starts)]
    groups = kron_ops._groups(targets, torch.float32)
    w, _ = kron_ops._dense_weight(x.detach().to(torch.bfloat16).reshape(-1, 24), W.detach(), groups,
                                  W.shape[0], SCALE)
    want = W.detach().clone()
    for s, A, U, V in targets:
        with kk.use_backend("torch"):
            delta = kk.kron_delta(A, U, V, SCALE)  # the same fp32 increment: only the rounding is tested
        want[s:s + delta.shape[0]] += delta
    assert w.dtype == torch.bfloat16 and torch.equal(w, want.to(torch.bfloat16))


class _MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.matmul):
            self.shapes.append(tuple(out.shape))
        return out


def test_dense_weight_gradient_only_for_adapted_rows():
    """On a fused qkv with increments on the q and v rows, the backward forms the weight
    gradient of those 30-row slices (each (30, 24)), never of the whole (90, 24) weight."""
    x, W, b, q, v = make_slice_inputs()
    with kk.use_backend("dense"):
        y = fused_slices(x, W, b, *q, *v)
        g = torch.randn_like(y)
        with _MatmulShapes() as mode:
            torch.autograd.grad(y, [x, *q, *v], g)
    assert (30, 24) in mode.shapes and (90, 24) not in mode.shapes, mode.shapes


def test_auto_takes_dense_on_cuda_and_structured_on_cpu():
    """The choice table (ops/kron.py ``_CUDA_AUTO``): no GPU measurement has decided between the
    dense composition and the Triton kernels, so auto takes the dense one on CUDA (issue 10);
    on CPU auto keeps the structured torch path."""
    assert kron_ops._CUDA_AUTO == "dense"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backend.select("kron_linear", cuda, dense=True, cuda_auto="dense") == "dense"
    assert backend.select("kron_linear", cpu, dense=True, cuda_auto="dense") == "torch"
    assert backend.select("op", cuda, dense=True, cuda_auto="triton") == "triton"
    with kk.use_backend("triton"):
        assert backend.select("kron_linear", cuda, dense=True, cuda_auto="dense") == "triton"


def test_kron_ops_ask_for_the_choice_table(monkeypatch):
    seen = []
    real = backend.select

    def spy(op, device, **kwargs):
        seen.append((op, kwargs.get("dense"), kwargs.get("cuda_auto")))
        return real(op, device, **kwargs)

    monkeypatch.setattr(backend, "select", spy)
    x, W, b, A, U, V = make_inputs(SMALL_SHAPES[0].values[0])
    kk.kron_linear(x, W, b, A, U, V)
    kk.kron_matmul(x, A, U, V)
    assert seen == [("kron_linear", True, "dense"), ("kron_matmul", True, "dense")]


def test_explicit_dense_on_an_op_without_one_raises():
    with kk.use_backend("dense"), pytest.raises(kk.BackendUnavailableError, match="no dense composition for fwht"):
        kk.fwht(torch.randn(2, 8))


def test_select_refuses_a_dense_default_without_a_dense_composition():
    with pytest.raises(ValueError, match="cuda_auto"):
        backend.select("op", torch.device("cuda"), cuda_auto="dense")


# ------------------------------------------------------------- ARC, LoSA, Compacter adapter
@pytest.mark.parametrize("lead, d, r, bias", ARC_SHAPES)
def test_dense_arc_float64(lead, d, r, bias):
    fused, ref = arc_fns(bias)
    compare_with_reference(on_backend("dense", fused), ref, arc_inputs(lead, d, r, bias=bias), RTOL[torch.float64])


def test_dense_arc_dropout_is_the_torch_backends_mask():
    """Same seed, same mask as the torch backend; compared with the reference given that mask."""
    lead, d, r, p, seed = (5, 7), 24, 6, 0.3, 11
    keep = dropout_keep_mask(35, r, p, seed, "cpu", "torch").view(*lead, r).double()
    fused, ref = arc_fns(True, dropout=p, seed=seed, keep=keep)
    compare_with_reference(on_backend("dense", fused), ref, arc_inputs(lead, d, r), RTOL[torch.float64])


class DropoutSpy:
    """Wraps ``F.dropout`` and keeps the mask of its last call (the kept elements)."""

    def __init__(self, monkeypatch):
        self.real, self.calls, self.keep = torch.nn.functional.dropout, [], None
        monkeypatch.setattr(torch.nn.functional, "dropout", self)

    def __call__(self, a, p=0.5, training=True, inplace=False):
        out = self.real(a, p, training, inplace)
        self.calls.append((p, training))
        self.keep = (out != 0) | (a == 0)
        return out


def test_dense_arc_dropout_without_a_seed_is_torch_dropout(monkeypatch):
    """No seed: torch's own dropout on the r-dim intermediate (one fused kernel each way on
    CUDA), and output and every gradient are the reference's for the mask it drew."""
    lead, d, r, p = (5, 7), 24, 6, 0.3
    spy = DropoutSpy(monkeypatch)
    fused = on_backend("dense", lambda x, U, lam, b: kk.arc(x, U, lam, b, p))
    ref = lambda x, U, lam, b: ref_arc.arc(x, U, lam, b, p, spy.keep.view(*lead, r).double())  # noqa: E731
    compare_with_reference(fused, ref, arc_inputs(lead, d, r), RTOL[torch.float64])
    assert spy.calls == [(p, True)] and 0 < spy.keep.double().mean() < 1


def test_dense_fact_dropout_without_a_seed_is_torch_dropout(monkeypatch):
    """The same for FacT's dense composition: one dropout over the ``(N k, r)`` intermediate
    (rows ``(n, slot)``), the reference's per-slot chain given each slot's part of that mask."""
    n, d, r, k, p = 11, 16, 3, 3, 0.25
    gen = torch.Generator().manual_seed(2)
    x, U, V, cores = (torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
                      for s in ((n, d), (d, r), (d, r), (k, r, r)))
    spy = DropoutSpy(monkeypatch)
    fused = on_backend("dense", lambda x, U, V, c: kk.fact_apply(x, U, V, c, 0.7, p))

    def ref(x, U, V, c):
        keep = spy.keep.view(n, k, r).double()
        return torch.cat([ref_fact.fact_apply(x, U, V, c[j], 0.7, p, keep[:, j]) for j in range(k)], dim=-1)

    compare_with_reference(fused, ref, [x, U, V, cores], RTOL[torch.float64])
    assert spy.calls == [(p, True)]


@pytest.mark.parametrize("shape, r, axis", LOSA_SHAPES_TORCH)
def test_dense_losa_float64(shape, r, axis):
    fused, ref = losa_fns(axis)
    compare_with_reference(on_backend("dense", fused), ref, losa_inputs(shape, r, axis), RTOL[torch.float64])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dense_adapter_float64(bias):
    fused, ref = adapter_fns(bias)
    compare_with_reference(on_backend("dense", fused), ref, adapter_inputs((3, 7), 48, 5, bias=bias),
                           RTOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["arc", "losa-channel", "losa-token", "adapter"])
def test_dense_bottleneck_low_precision(op, dtype):
    if op == "arc":
        (fused, ref), inputs, acts = arc_fns(True), arc_inputs((64, 3), 96, 50, dtype=torch.float32), (0,)
    elif op == "adapter":
        (fused, ref), inputs, acts = adapter_fns(True), adapter_inputs((64, 3), 96, 8, dtype=torch.float32), (0,)
    else:
        axis = op.split("-")[1]
        (fused, ref), inputs, acts = losa_fns(axis), losa_inputs((4, 48, 96), 16, axis, dtype=torch.float32), (0, 1)
    compare_low_precision(on_backend("dense", fused), ref, inputs, dtype, activations=acts)


def test_bottleneck_choice_tables():
    """auto on CUDA takes what won on the H200 (ops/bottleneck.py, ops/adapter.py): the dense
    composition for ARC, LoSA and the Compacter adapter, the Triton kernels for FacT."""
    from kron_kernels.ops import adapter as adapter_ops
    from kron_kernels.ops import bottleneck as bottleneck_ops

    assert bottleneck_ops._CUDA_AUTO == {"arc": "dense", "losa_mixer": "dense", "fact_apply": "triton",
                                         "fact_linear": "triton"}
    assert adapter_ops._CUDA_AUTO == "dense"
    seen = []
    real = backend.select

    def spy(op, device, **kwargs):
        seen.append((op, kwargs.get("dense", False), kwargs.get("cuda_auto", "triton")))
        return real(op, device, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "select", spy)
        fused, _ = arc_fns(True)
        fused(*arc_inputs((3,), 8, 2))
        fused, _ = losa_fns("token")
        fused(*losa_inputs((2, 5, 6), 3, "token"))
        fused, _ = adapter_fns(True)
        fused(*adapter_inputs((3,), 8, 2))
    assert seen == [("arc", True, "dense"), ("losa_mixer", True, "dense"), ("bottleneck_adapter", True, "dense")]


def test_explicit_dense_on_fact_takes_the_dense_composition():
    """FacT has a dense composition (measured against its Triton kernels on the next GPU run;
    auto stays on Triton on CUDA): an explicit dense backend takes it, with no autograd Function."""
    from kron_kernels.ops import bottleneck as bottleneck_ops

    x = torch.randn(3, 8, requires_grad=True)
    U, V, cores = torch.randn(8, 2), torch.randn(8, 2), torch.randn(1, 2, 2)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = bottleneck_ops._dense_fact
        mp.setattr(bottleneck_ops, "_dense_fact", lambda *args: calls.append(1) or real(*args))
        with kk.use_backend("dense"):
            out = kk.fact_apply(x, U, V, cores)
        with kk.use_backend("torch"):
            want = kk.fact_apply(x, U, V, cores)
    assert calls == [1]
    torch.testing.assert_close(out, want)


def test_explicit_dense_without_a_composition_raises():
    with kk.use_backend("dense"), pytest.raises(kk.BackendUnavailableError, match="no dense composition for fwht"):
        kk.fwht(torch.randn(3, 8))
