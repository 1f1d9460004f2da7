"""Property-based tests (issue 14 part 4): hypothesis draws shapes, layouts, dtypes and values
for every op and compares it with ``kron_kernels/reference`` -- float64 on the torch (and
dense) backend at ``RTOL[float64]``, float32 on the Triton interpreter at ``RTOL[float32]``
against a float64 reference -- and draws bad arguments for every public op, expecting the
right answer or a clean refusal (ValueError / TypeError / BackendUnavailableError naming the
argument), with the caller's tensors unchanged either way.

Layouts: every tensor argument is drawn contiguous, transposed (last two dims' memory order
swapped), sliced with a step (every other element of a buffer twice as wide) or -- for
parameters, biases and factors -- expanded (stride 0 along the first dim). The layout is
applied *inside* the compared callables, as a differentiable view of a contiguous leaf, so
the gradients reach the leaves and are compared too.

Bounded: the ``kron_kernels-properties`` profile (registered here, not in conftest) is
derandomized, deadline-free and takes few examples per property (fewer on the interpreter),
so the file runs in well under a minute on two cores and identically in CI.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import conftest  # noqa: E402
import kron_kernels as kk  # noqa: E402
from kron_kernels.reference import arc as ref_arc  # noqa: E402
from kron_kernels.reference import compacter as ref_compacter  # noqa: E402
from kron_kernels.reference import fact as ref_fact  # noqa: E402
from kron_kernels.reference import kadaptation as ref_kron  # noqa: E402
from kron_kernels.reference import losa as ref_losa  # noqa: E402
from kron_kernels.reference.fastfood import fastfood_reference  # noqa: E402
import scipy.linalg  # noqa: E402
from utils import RTOL, outputs_and_grads, rel_err  # noqa: E402

settings.register_profile(
    "kron_kernels-properties",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)
PROFILE = settings.get_profile("kron_kernels-properties")
TORCH_EXAMPLES = 25
TRITON_EXAMPLES = 10
BAD_EXAMPLES = 40

needs_interpreter = pytest.mark.skipif(not conftest.INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
REFUSALS = (ValueError, TypeError, kk.BackendUnavailableError)
SCALE = 0.7


def prop_settings(n):
    return settings(PROFILE, max_examples=n)


# ----------------------------------------------------------------------------------------
# layouts: value-preserving, differentiable views with other strides
# ----------------------------------------------------------------------------------------
def lay(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and t.dim() >= 1:
        return torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2]
    return t


class Arg:
    """A drawn tensor argument: its logical shape, layout and whether it may be expanded."""

    def __init__(self, shape, layout, requires_grad=True):
        self.shape, self.layout, self.requires_grad = tuple(shape), layout, requires_grad

    def leaf(self, gen, dtype, scale=1.0):
        shape = self.shape
        if self.layout == "expanded" and len(shape) >= 1:
            shape = (1,) + shape[1:]
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype).requires_grad_(self.requires_grad)

    def view(self, t):
        if self.layout == "expanded" and len(self.shape) >= 1:
            return t.expand(*self.shape)
        return lay(t, self.layout)


def draw_layout(data, param: bool, ndim: int):
    choices = ["contiguous", "strided"]
    if ndim >= 2:
        choices.append("transposed")
    if param and ndim >= 1:
        choices.append("expanded")
    return data.draw(st.sampled_from(choices))


def draw_lead(data, max_n=5):
    """Leading (token / batch) dims: none, empty (0 tokens), N tokens, or a batch of N."""
    kind = data.draw(st.sampled_from(["none", "empty", "tokens", "batch"]))
    n = data.draw(st.integers(1, max_n))
    return {"none": (), "empty": (0,), "tokens": (n,), "batch": (2, n)}[kind]


def close(got, want, tol, name):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    assert rel_err(got, want) <= tol, f"{name}: relative max error {rel_err(got, want):.3e} > {tol:.1e}"


def snapshot(tensors):
    return [t.detach().clone() for t in tensors if isinstance(t, torch.Tensor)]


def assert_unchanged(before, tensors, what="input"):
    after = [t for t in tensors if isinstance(t, torch.Tensor)]
    for i, (b, a) in enumerate(zip(before, after)):
        assert torch.equal(b.isnan(), a.detach().isnan()) and torch.equal(
            b.nan_to_num(), a.detach().nan_to_num()), f"{what} {i} was modified in place"


def check_op(backend, fused, ref, args, leaves, tol, ref_dtype=None):
    """Compare ``fused`` (under ``backend``) with ``ref`` on ``args``' layouts of ``leaves``:
    output and every leaf gradient; the laid-out inputs must come back unchanged."""

    def run_fused(*ls):
        views = [a.view(t) for a, t in zip(args, ls)]
        before = snapshot(views)
        with kk.use_backend(backend):
            out = fused(*views)
        assert_unchanged(before, views)
        return out

    def run_ref(*ls):
        return ref(*[a.view(t) for a, t in zip(args, ls)])

    got = outputs_and_grads(run_fused, leaves)
    ref_leaves = leaves if ref_dtype is None else [t.detach().to(ref_dtype).requires_grad_(t.requires_grad)
                                                   for t in leaves]
    want = outputs_and_grads(run_ref, ref_leaves)
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], tol, name)
    # NaN inputs propagate as NaN (never crash): poison the first activation's first element
    x = leaves[0].detach().clone()
    if x.numel():
        x.view(-1)[0] = float("nan")
        with torch.no_grad():
            with kk.use_backend(backend):
                out = fused(*[a.view(t) for a, t in zip(args, [x, *leaves[1:]])])
            want_out = ref(*[a.view(t.detach()) for a, t in zip(args, [x.to(ref_leaves[0].dtype), *ref_leaves[1:]])])
        assert out.shape == want_out.shape
        assert bool(out.isnan()[want_out.isnan()].all()), "a NaN input did not propagate as NaN"


# ----------------------------------------------------------------------------------------
# per-op cases: draw(data, dtype) -> (fused, ref, args, leaves)
# ----------------------------------------------------------------------------------------
def _gen(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))


def _leaves(gen, args, dtype, scales=None):
    scales = scales or [1.0] * len(args)
    return [a.leaf(gen, dtype, s) for a, s in zip(args, scales)]


def draw_kron_factors(data):
    m, a_out, a_in = (data.draw(st.integers(1, 3)) for _ in range(3))
    p, q, r = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    fac = [Arg(s, draw_layout(data, True, 3)) for s in ((m, a_out, a_in), (m, p, r), (m, q, r))]
    return fac, a_out * p, a_in * q


def case_kron_delta(data, dtype):
    fac, _, _ = draw_kron_factors(data)
    return (lambda A, U, V: kk.kron_delta(A, U, V, SCALE), lambda A, U, V: ref_kron.kron_delta(A, U, V, SCALE),
            fac, _leaves(_gen(data), fac, dtype))


def case_kron_matmul(data, dtype):
    fac, d_out, d_in = draw_kron_factors(data)
    lead = draw_lead(data)
    args = [Arg(lead + (d_in,), draw_layout(data, False, len(lead) + 1))] + fac
    return (lambda x, A, U, V: kk.kron_matmul(x, A, U, V, SCALE),
            lambda x, A, U, V: ref_kron.kron_matmul(x, A, U, V, SCALE), args, _leaves(_gen(data), args, dtype))


def case_kron_linear(data, dtype):
    fac, d_out, d_in = draw_kron_factors(data)
    lead = draw_lead(data)
    frozen = data.draw(st.booleans())
    args = [Arg(lead + (d_in,), draw_layout(data, False, len(lead) + 1)),
            Arg((d_out, d_in), draw_layout(data, True, 2), requires_grad=not frozen),
            Arg((d_out,), draw_layout(data, True, 1), requires_grad=not frozen)] + fac
    return (lambda x, W, b, A, U, V: kk.kron_linear(x, W, b, A, U, V, SCALE),
            lambda x, W, b, A, U, V: ref_kron.kron_linear(x, W, b, A, U, V, SCALE),
            args, _leaves(_gen(data), args, dtype))


def case_kron_linear_slices(data, dtype):
    (fa, d1, d_in) = draw_kron_factors(data)
    m, a_in, q = fa[0].shape[0], fa[0].shape[2], fa[2].shape[1]
    a_out2, p2, r2 = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    fb = [Arg(s, draw_layout(data, True, 3)) for s in ((m, a_out2, a_in), (m, p2, r2), (m, q, r2))]
    d2 = a_out2 * p2
    gap0, gap1, gap2 = (data.draw(st.integers(0, 2)) for _ in range(3))
    s1, s2 = gap0, gap0 + d1 + gap1
    d_out = s2 + d2 + gap2
    if data.draw(st.booleans()):  # targets in either order
        (s1, fa, d1), (s2, fb, d2) = (s2, fb, d2), (s1, fa, d1)
    lead = draw_lead(data)
    args = [Arg(lead + (d_in,), draw_layout(data, False, len(lead) + 1)),
            Arg((d_out, d_in), draw_layout(data, True, 2), requires_grad=False),
            Arg((d_out,), draw_layout(data, True, 1), requires_grad=False)] + fa + fb

    def fused(x, W, b, A1, U1, V1, A2, U2, V2):
        return kk.kron_linear_slices(x, W, b, [(s1, A1, U1, V1), (s2, A2, U2, V2)], SCALE)

    def ref(x, W, b, A1, U1, V1, A2, U2, V2):
        delta = torch.zeros_like(W)
        delta[s1:s1 + d1] = ref_kron.kron_delta(A1, U1, V1, SCALE)
        delta[s2:s2 + d2] = ref_kron.kron_delta(A2, U2, V2, SCALE)
        return F.linear(x, W + delta, b)

    return fused, ref, args, _leaves(_gen(data), args, dtype)


def case_bottleneck_adapter(data, dtype):
    d, k = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 6))
    lead = draw_lead(data)
    bias = data.draw(st.booleans())
    args = [Arg(lead + (d,), draw_layout(data, False, len(lead) + 1)), Arg((k, d), draw_layout(data, True, 2)),
            Arg((k,), draw_layout(data, True, 1)), Arg((d, k), draw_layout(data, True, 2)),
            Arg((d,), draw_layout(data, True, 1))]
    scales = [1.0, d**-0.5, 0.5, k**-0.5, 0.5]
    if not bias:
        args, scales = [args[0], args[1], args[3]], [scales[0], scales[1], scales[3]]
        return (lambda h, wd, wu: kk.bottleneck_adapter(h, wd, None, wu, None),
                lambda h, wd, wu: ref_compacter.bottleneck_adapter(h, wd, None, wu, None),
                args, _leaves(_gen(data), args, dtype, scales))
    return kk.bottleneck_adapter, ref_compacter.bottleneck_adapter, args, _leaves(_gen(data), args, dtype, scales)


def case_arc(data, dtype):
    d, r = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 6))
    lead = draw_lead(data)
    bias = data.draw(st.booleans())
    args = [Arg(lead + (d,), draw_layout(data, False, len(lead) + 1)), Arg((d, r), draw_layout(data, True, 2)),
            Arg((r,), draw_layout(data, True, 1)), Arg((d,), draw_layout(data, True, 1))]
    scales = [1.0, d**-0.5, 1.0, 0.5]
    if not bias:
        return (lambda x, U, lam: kk.arc(x, U, lam, None), lambda x, U, lam: ref_arc.arc(x, U, lam, None),
                args[:3], _leaves(_gen(data), args[:3], dtype, scales[:3]))
    return (lambda x, U, lam, b: kk.arc(x, U, lam, b), lambda x, U, lam, b: ref_arc.arc(x, U, lam, b),
            args, _leaves(_gen(data), args, dtype, scales))


def case_losa(axis):
    def case(data, dtype):
        n, other, r = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
        if axis == "channel":
            shape = draw_lead(data) + (n,)
        else:
            shape = data.draw(st.sampled_from([(), (2,), (0,)])) + (n, other)
        nd = len(shape)
        args = [Arg(shape, draw_layout(data, False, nd)), Arg(shape, draw_layout(data, False, nd)),
                Arg((n, r), draw_layout(data, True, 2)), Arg((r, n), draw_layout(data, True, 2)),
                Arg((), "contiguous")]
        leaves = _leaves(_gen(data), args, dtype, [0.5, 0.5, (2 / n) ** 0.5, r**-0.5, 1.0])
        return (lambda h, z, wd, wu, a: kk.losa_mixer(h, z, wd, wu, a, axis),
                lambda h, z, wd, wu, a: ref_losa.losa_mixer(h, z, wd, wu, a, axis), args, leaves)

    return case


def _fact_ref(x, U, V, cores, split, scale=SCALE):
    k, d = cores.shape[0], U.shape[0]
    outs = [ref_fact.fact_apply(x if split == "rows" else x[..., j * d:(j + 1) * d], U, V, cores[j], scale)
            for j in range(k)]
    return torch.cat(outs, -1) if split == "rows" else sum(outs)


def _draw_fact(data, linear):
    d, r, k = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
    split = data.draw(st.sampled_from(["rows", "cols"]))
    width, d_out = (d, k * d) if split == "rows" else (k * d, d)
    lead = draw_lead(data)
    args = [Arg(lead + (width,), draw_layout(data, False, len(lead) + 1)), Arg((d, r), draw_layout(data, True, 2)),
            Arg((d, r), draw_layout(data, True, 2)), Arg((k, r, r), draw_layout(data, True, 3))]
    scales = [1.0, d**-0.5, r**-0.5, r**-0.5]
    if linear:
        args[1:1] = [Arg((d_out, width), draw_layout(data, True, 2), requires_grad=False),
                     Arg((d_out,), draw_layout(data, True, 1), requires_grad=False)]
        scales[1:1] = [width**-0.5, 0.5]
    return split, args, scales


def case_fact_apply(data, dtype):
    split, args, scales = _draw_fact(data, False)
    return (lambda x, U, V, C: kk.fact_apply(x, U, V, C, SCALE, split=split),
            lambda x, U, V, C: _fact_ref(x, U, V, C, split), args, _leaves(_gen(data), args, dtype, scales))


def case_fact_linear(data, dtype):
    split, args, scales = _draw_fact(data, True)
    return (lambda x, W, b, U, V, C: kk.fact_linear(x, W, b, U, V, C, SCALE, split=split),
            lambda x, W, b, U, V, C: F.linear(x, W, b) + _fact_ref(x, U, V, C, split),
            args, _leaves(_gen(data), args, dtype, scales))


def case_fact_tt(data, dtype):
    d, r, S = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 5)), data.draw(st.integers(0, 4))
    args = [Arg((d, r), draw_layout(data, True, 2)), Arg((d, r), draw_layout(data, True, 2)),
            Arg((S, r, r), draw_layout(data, True, 3))]
    return (lambda U, V, C: kk.fact_tt_delta(U, V, C, SCALE), lambda U, V, C: ref_fact.fact_tt_delta(U, V, C, SCALE),
            args, _leaves(_gen(data), args, dtype))


def case_fact_tk(data, dtype):
    d, r, S = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 5)), data.draw(st.integers(0, 4))
    args = [Arg((d, r), draw_layout(data, True, 2)), Arg((d, r), draw_layout(data, True, 2)),
            Arg((r, r, r), draw_layout(data, True, 3)), Arg((S, r), draw_layout(data, True, 2))]
    return (lambda U, V, C, P: kk.fact_tk_delta(U, V, C, P, SCALE),
            lambda U, V, C, P: ref_fact.fact_tk_delta(U, V, C, P, SCALE), args, _leaves(_gen(data), args, dtype))


def fwht_reference(x, scale):
    n = x.shape[-1]
    return (x @ torch.from_numpy(scipy.linalg.hadamard(n)).to(x.dtype)) * scale


def case_fwht(data, dtype):
    n = 2 ** data.draw(st.integers(0, 6))
    lead = draw_lead(data)
    args = [Arg(lead + (n,), draw_layout(data, False, len(lead) + 1))]
    return (lambda x: kk.fwht(x, SCALE), lambda x: fwht_reference(x, SCALE), args, _leaves(_gen(data), args, dtype))


def case_fastfood(data, dtype):
    D, d = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 20))
    mode, seed = data.draw(st.sampled_from(["stacked", "padded"])), data.draw(st.integers(0, 2**31 - 1))
    B, Pi, G = kk.fastfood_params(D, d, seed, mode)
    args = [Arg((d,), draw_layout(data, False, 1))]
    return (lambda t: kk.fastfood(t, D, seed, mode),
            lambda t: fastfood_reference(t, D, B.to(t.dtype), Pi, G.to(t.dtype)), args,
            _leaves(_gen(data), args, dtype))


CASES = {
    "kron_delta": case_kron_delta,
    "kron_matmul": case_kron_matmul,
    "kron_linear": case_kron_linear,
    "kron_linear_slices": case_kron_linear_slices,
    "bottleneck_adapter": case_bottleneck_adapter,
    "arc": case_arc,
    "losa_channel": case_losa("channel"),
    "losa_token": case_losa("token"),
    "fact_apply": case_fact_apply,
    "fact_linear": case_fact_linear,
    "fact_tt_delta": case_fact_tt,
    "fact_tk_delta": case_fact_tk,
    "fwht": case_fwht,
    "fastfood": case_fastfood,
}
DENSE_OPS = ["kron_matmul", "kron_linear", "kron_linear_slices", "bottleneck_adapter", "arc", "losa_channel",
             "losa_token"]
# ops whose Triton kernels exist (the FacT deltas are torch on every backend, see ops/bottleneck.py)
TRITON_OPS = [op for op in CASES if op not in ("fact_tt_delta", "fact_tk_delta")]


@pytest.mark.parametrize("op", list(CASES))
@prop_settings(TORCH_EXAMPLES)
@given(data=st.data())
def test_torch_float64_matches_reference(op, data):
    fused, ref, args, leaves = CASES[op](data, torch.float64)
    check_op("torch", fused, ref, args, leaves, RTOL[torch.float64])


@pytest.mark.parametrize("op", DENSE_OPS)
@prop_settings(TRITON_EXAMPLES)
@given(data=st.data())
def test_dense_float64_matches_reference(op, data):
    fused, ref, args, leaves = CASES[op](data, torch.float64)
    check_op("dense", fused, ref, args, leaves, RTOL[torch.float64])


@needs_interpreter
@pytest.mark.parametrize("op", TRITON_OPS)
@prop_settings(TRITON_EXAMPLES)
@given(data=st.data())
def test_triton_float32_matches_reference(op, data):
    fused, ref, args, leaves = CASES[op](data, torch.float32)
    check_op("triton", fused, ref, args, leaves, RTOL[torch.float32], ref_dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# bad arguments: the right answer or a clean refusal naming the argument, nothing changed
# ----------------------------------------------------------------------------------------
def _valid_call(op, dtype):
    """``(public fn, {arg: value}, reference(**kwargs) or None)`` for a small valid call."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    A, U, V = r(2, 2, 3), r(2, 3, 2), r(2, 2, 2)  # d_out 6, d_in 6
    x, W, b = r(4, 6), r(6, 6), r(6)
    kron = dict(A=A, U=U, V=V, scale=SCALE)
    fu, fv, fc = r(6, 3), r(6, 3), r(2, 3, 3)
    if op == "kron_delta":
        return kk.kron_delta, dict(kron), lambda A, U, V, scale: ref_kron.kron_delta(A, U, V, scale)
    if op == "kron_matmul":
        return kk.kron_matmul, dict(x=x, **kron), ref_kron.kron_matmul
    if op == "kron_linear":
        return kk.kron_linear, dict(x=x, weight=W, bias=b, **kron), ref_kron.kron_linear
    if op == "kron_linear_slices":
        W2, b2 = r(9, 6), r(9)
        return kk.kron_linear_slices, dict(x=x, weight=W2, bias=b2, targets=[(2, A, U, V)], scale=SCALE), None
    if op == "bottleneck_adapter":
        return (kk.bottleneck_adapter, dict(h=x, w_down=r(3, 6), b_down=r(3), w_up=r(6, 3), b_up=r(6)),
                ref_compacter.bottleneck_adapter)
    if op == "arc":
        return (kk.arc, dict(x=x, U=r(6, 3), lam=r(3), bias=r(6), dropout=0.0, training=True, seed=None),
                lambda x, U, lam, bias, dropout, training, seed: ref_arc.arc(x, U, lam, bias))
    if op == "losa_mixer":
        return (kk.losa_mixer, dict(h=x, z=r(4, 6), W_down=r(6, 3), W_up=r(3, 6), alpha=0.8, axis="channel"),
                ref_losa.losa_mixer)
    if op in ("fact_apply", "fact_linear"):
        kw = dict(x=r(4, 12), U=fu, V=fv, cores=fc, scale=SCALE, dropout=0.0, training=True, split="cols", seed=None)
        if op == "fact_apply":
            return kk.fact_apply, kw, lambda x, U, V, cores, split, scale, **_: _fact_ref(x, U, V, cores, split, scale)
        kw = dict(kw, x=r(4, 6), weight=r(6, 6), bias=r(6), split="rows")
        kw["x"] = r(4, 6)
        kw["weight"], kw["bias"] = r(12, 6), r(12)
        return (kk.fact_linear, kw,
                lambda x, weight, bias, U, V, cores, split, scale, **_: F.linear(x, weight, bias)
                + _fact_ref(x, U, V, cores, split, scale))
    if op == "fact_tt_delta":
        return (kk.fact_tt_delta, dict(U=fu, V=fv, cores=fc, scale=SCALE),
                lambda U, V, cores, scale: ref_fact.fact_tt_delta(U, V, cores, scale))
    if op == "fact_tk_delta":
        return (kk.fact_tk_delta, dict(U=fu, V=fv, C=r(3, 3, 3), P=r(4, 3), scale=SCALE),
                lambda U, V, C, P, scale: ref_fact.fact_tk_delta(U, V, C, P, scale))
    if op == "fwht":
        return kk.fwht, dict(x=r(3, 8), scale=SCALE), fwht_reference
    if op == "fastfood":
        def ref_ff(theta, D, seed, mode, params):
            B, Pi, G = params if params is not None else kk.fastfood_params(D, theta.shape[0], seed, mode)
            return fastfood_reference(theta, D, B.to(theta.dtype), Pi, G.to(theta.dtype))
        return kk.fastfood, dict(theta=r(5), D=12, seed=7, mode="stacked", params=None), ref_ff
    raise AssertionError(op)


BAD_OPS = ["kron_delta", "kron_matmul", "kron_linear", "kron_linear_slices", "bottleneck_adapter", "arc",
           "losa_mixer", "fact_apply", "fact_linear", "fact_tt_delta", "fact_tk_delta", "fwht", "fastfood"]
# replacements for one argument, as functions of its valid value
BAD_ANY = {
    "None": lambda v: None,
    "str": lambda v: "0.5",
    "bool": lambda v: True,
    "float": lambda v: 0.5,
    "nan": lambda v: float("nan"),
    "inf": lambda v: float("inf"),
    "negative": lambda v: -1,
    "zero": lambda v: 0,
    "huge": lambda v: 2**40,
    "list": lambda v: [1.0, 2.0],
}
BAD_TENSOR = {
    "int64": lambda t: t.to(torch.int64),
    "complex": lambda t: t.to(torch.complex128),
    "other float dtype": lambda t: t.to(torch.float32 if t.dtype == torch.float64 else torch.float64),
    "last dim - 1": lambda t: t[..., :-1] if t.dim() else t,
    "first dim - 1": lambda t: t[:-1] if t.dim() else t,
    "extra dim": lambda t: t.unsqueeze(0),
    "flattened": lambda t: t.reshape(-1),
    "0-d": lambda t: torch.tensor(1.5, dtype=t.dtype),
    "NaN inside": lambda t: t.masked_fill(torch.zeros_like(t, dtype=torch.bool).view(-1).index_fill(
        0, torch.tensor([0]), True).view(t.shape), float("nan")) if t.numel() else t,
    "empty": lambda t: t[:0] if t.dim() else t,
}
SHAPE_CHANGES = ("last dim - 1", "first dim - 1", "extra dim", "flattened", "0-d", "empty")
BAD_TARGETS = {
    "empty list": lambda ts: [],
    "float start": lambda ts: [(2.5,) + tuple(ts[0][1:])],
    "bool start": lambda ts: [(True,) + tuple(ts[0][1:])],
    "negative start": lambda ts: [(-1,) + tuple(ts[0][1:])],
    "past the end": lambda ts: [(4,) + tuple(ts[0][1:])],
    "overlap": lambda ts: [ts[0], (3,) + tuple(ts[0][1:])],
    "three items": lambda ts: [tuple(ts[0][:3])],
    "string": lambda ts: "targets",
    "bad factor": lambda ts: [(2, ts[0][1].to(torch.int64)) + tuple(ts[0][2:])],
}


def _same(got, want, name="out"):
    """Equal up to tolerance, with NaN exactly where the reference has NaN."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan = want.isnan()
    assert torch.equal(got.isnan() | nan, got.isnan()), f"{name}: a NaN of the reference is not NaN"
    if want.numel():
        close(got.masked_fill(nan, 0).double(), want.masked_fill(nan, 0).double(), 1e-4, name)


def _names_argument(message: str, name: str) -> bool:
    if name == "targets":  # a bad entry may be named by its factor (A, U, V)
        return re.search(r"\b(targets?|A|U|V)\b", message) is not None
    return re.search(rf"\b{re.escape(name)}\b", message) is not None


def check_bad_argument(backend, op, dtype, data):
    fn, kwargs, ref = _valid_call(op, dtype)
    name = data.draw(st.sampled_from(sorted(kwargs)), label="argument")
    value = kwargs[name]
    pool = dict(BAD_ANY)
    if isinstance(value, torch.Tensor):
        pool.update(BAD_TENSOR)
    if name == "targets":
        pool.update(BAD_TARGETS)
    how = data.draw(st.sampled_from(sorted(pool)), label="replacement")
    kwargs[name] = pool[how](value)
    tensors = [t for v in kwargs.values() for t in (v if isinstance(v, (list, tuple)) else [v])
               for t in (t if isinstance(t, (list, tuple)) else [t]) if isinstance(t, torch.Tensor)]
    before = snapshot(tensors)
    try:
        with kk.use_backend(backend):
            got = fn(**kwargs)
    except REFUSALS as exc:
        # a shape that no longer matches another tensor's may be reported on either of them
        named = [name] + ([k for k, v in kwargs.items() if isinstance(v, torch.Tensor)] if how in SHAPE_CHANGES else [])
        assert any(_names_argument(str(exc), n) for n in named), (
            f"{name} = {how}: refused without naming {name!r}: {exc}")
        assert_unchanged(before, tensors)
        return
    # accepted: then it must be the right answer, and the caller's tensors untouched
    assert_unchanged(before, tensors)
    assert isinstance(got, torch.Tensor)
    if ref is None or name in ("dropout", "training", "seed") and kwargs.get("dropout", 0.0) != 0.0:
        return
    try:
        want = ref(**{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                      for k, v in kwargs.items()})
    except Exception as exc:  # noqa: BLE001 -- the reference cannot say what the answer is
        raise AssertionError(f"{name} = {how} was accepted although it has no reference answer ({exc!r})")
    _same(got, want)


@pytest.mark.parametrize("op", BAD_OPS)
@prop_settings(BAD_EXAMPLES)
@given(data=st.data())
def test_bad_arguments_torch(op, data):
    check_bad_argument("torch", op, torch.float64, data)


@needs_interpreter
@pytest.mark.parametrize("op", [op for op in BAD_OPS if op not in ("fact_tt_delta", "fact_tk_delta")])
@prop_settings(TRITON_EXAMPLES)
@given(data=st.data())
def test_bad_arguments_triton(op, data):
    check_bad_argument("triton", op, torch.float32, data)


# regression examples of the defects this suite found (fixed in ops/_common.check_scale)
@pytest.mark.parametrize("op, name, value, error", [
    ("kron_delta", "scale", "0.5", TypeError),  # a string was parsed as a number
    ("fwht", "scale", True, TypeError),  # a bool was taken as 1.0
    ("kron_linear", "scale", float("inf"), ValueError),  # an infinite scale only gives inf/NaN
    ("fact_apply", "scale", float("nan"), ValueError),
    ("losa_mixer", "alpha", None, TypeError),  # was refused as "scale must be ..."
    ("losa_mixer", "alpha", float("nan"), ValueError),
])
def test_found_defects_stay_fixed(op, name, value, error):
    fn, kwargs, _ = _valid_call(op, torch.float64)
    kwargs[name] = value
    with kk.use_backend("torch"), pytest.raises(error, match=rf"\b{name}\b"):
        fn(**kwargs)
