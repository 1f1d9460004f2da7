"""Kronecker-structured increments: ``kron_delta``, ``kron_matmul``, ``kron_linear`` (DESIGN.md 4.1).

With ``A: (m, a_out, a_in)``, ``U: (m, p, r)``, ``V: (m, q, r)`` the increment is

    delta = scale * sum_i kron(A[i], U[i] @ V[i].T)          # (a_out*p, a_in*q)

and it is applied to activations through ``(A (x) B) vec(X) = vec(B X A^T)``: a token row
``x`` viewed as the block matrix ``X: (a_in, q)`` maps to ``Y = scale * sum_i A_i X V_i U_i^T``
viewed as ``(a_out, p)``. Neither this module's torch code nor the Triton kernels ever form
``delta`` for ``kron_matmul`` / ``kron_linear``; the factor gradients come from ``x`` and ``dy``
through the same structure, in O(N * r * m * (p + q + a_in * a_out)) work instead of the
O(N * d_out * d_in) of a dense weight gradient.

The torch backend below orders the work so that every step is one GEMM or one batched GEMM
on views, with no permuted copies (``T``, ``S``, ``P``, ``R`` are the rank-term-major
intermediates, ``(m*r, N*a)``); the Triton kernels (``triton/kron.py``) keep them on chip.

The ``dense`` backend is the cuBLAS-first alternative (issue 10): it *does* form the small
increment (O(m d^2) from the factors, no token dimension), runs one GEMM on ``W + delta`` --
the frozen layer's own cost -- and in the backward ``dx = dy (W + delta)`` and the weight
gradient of the adapted rows only, contracted onto A, U, V. ``auto`` takes it on CUDA until a
GPU measurement decides per shape (``_CUDA_AUTO``); on CPU the structured torch path.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import backend
from ._common import (
    as_kernel_operand, autocast_target, check_scale, check_tensor, compiling, compute_dtype, grad_flags, grad_like,
)

__all__ = [
    "kron_delta",
    "kron_matmul",
    "kron_linear",
    "kron_linear_slices",
    "kron_deltas",
    "KronDeltaFunction",
    "KronDeltasFunction",
    "KronLinearFunction",
]

_FACTOR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# input checks and factor flattening (shared by every backend)
# ----------------------------------------------------------------------------------------
def _check_factors(A, U, V) -> Tuple[int, int, int, int, int, int]:
    """Validate the factor shapes; returns (m, a_out, a_in, p, q, r)."""
    check_tensor("A", A, ndim=3, dtypes=_FACTOR_DTYPES)
    check_tensor("U", U, ndim=3, dtypes=_FACTOR_DTYPES, device=A.device)
    check_tensor("V", V, ndim=3, dtypes=_FACTOR_DTYPES, device=A.device)
    m, a_out, a_in = A.shape
    mu, p, r = U.shape
    mv, q, rv = V.shape
    if min(m, a_out, a_in, p, q, r) < 1:
        raise ValueError(
            f"every factor dimension must be >= 1, got A {tuple(A.shape)}, U {tuple(U.shape)}, V {tuple(V.shape)}"
        )
    if mu != m or mv != m:
        raise ValueError(
            f"A, U and V must hold the same number of Kronecker terms m: A has {m}, U has {mu}, V has {mv}"
        )
    if rv != r:
        raise ValueError(f"U and V must have the same rank r (last dim): U has {r}, V has {rv}")
    return m, a_out, a_in, p, q, r


# ----------------------------------------------------------------------------------------
# torch backend: structured (GEMMs on views of the factors), never the d x d delta
# ----------------------------------------------------------------------------------------
def _rank_major(F_: torch.Tensor) -> torch.Tensor:
    """``(m, k, r) -> (m*r, k)``: row ``i*r + t`` is ``F_[i, :, t]`` (a tiny copy of a factor)."""
    m, k, r = F_.shape
    return F_.transpose(1, 2).reshape(m * r, k)


def _torch_T(x2, V):
    """``T[(i, t), (n, a)] = sum_q V[i, q, t] X_n[a, q]``, i.e. ``X_n V_i`` for every term."""
    q = V.shape[1]
    return _rank_major(V) @ x2.reshape(-1, q).t()  # (m*r, N*a_in)


def _torch_S(T, A):
    """``S[i, (t, n), o] = sum_a A[i, o, a] T[(i, t), (n, a)]`` as one batched GEMM over i."""
    m, a_out, a_in = A.shape
    rows = T.numel() // (m * a_in)  # r*N, named: at N = 0 a -1 would be ambiguous
    return torch.bmm(T.view(m, rows, a_in), A.transpose(1, 2))  # (m, r*N, a_out)


def _torch_kron_term(xa, A, U, V, scale):
    """``scale * x @ delta.T`` in xa's dtype: ``Y[(n, o), p] = sum_{i,t} S[(i, t), (n, o)] U[i, p, t]``.

    Views name every size: with 0 tokens a ``-1`` would be ambiguous (and raise)."""
    m, a_out, p, r = A.shape[0], A.shape[1], U.shape[1], U.shape[2]
    n = xa.shape[0]
    S = _torch_S(_torch_T(xa, V), A)
    return (S.view(m * r, n * a_out).t() @ _rank_major(U)).view(n, a_out * p).mul_(scale)


def _torch_kron_backward(dy, xa, A, U, V, scale, need_dx: bool):
    """``(dx_term, dA, dU, dV)`` of one increment from its output-gradient columns ``dy``."""
    m, a_out, a_in = A.shape
    p, q, r = U.shape[1], V.shape[1], U.shape[2]
    n = xa.shape[0]  # sizes spelled out: with 0 tokens a -1 in a view is ambiguous
    T = _torch_T(xa, V)  # (m*r, N*a_in)
    S = _torch_S(T, A)  # (m, r*N, a_out)
    dy = dy.reshape(n * a_out, p)
    # P[(i, t), (n, o)] = scale * sum_p U[i, p, t] dY_n[o, p]
    P = (_rank_major(U) @ dy.t()).mul_(scale)  # (m*r, N*a_out)
    Pb = P.view(m, r * n, a_out)
    dA = torch.bmm(Pb.transpose(1, 2), T.view(m, r * n, a_in))  # (m, a_out, a_in)
    R = torch.bmm(Pb, A).view(m * r, n * a_in)  # R[(i, t), (n, a)] = sum_o P A[i, o, a]
    dV = (R @ xa.reshape(n * a_in, q)).view(m, r, q).transpose(1, 2)
    dU = (S.view(m * r, n * a_out) @ dy).mul_(scale).view(m, r, p).transpose(1, 2)
    dx = (R.t() @ _rank_major(V)).view(n, a_in * q) if need_dx else None
    return dx, dA, dU, dV


def _torch_forward(x2, weight, bias, targets, d_out, scale):
    acc = compute_dtype(x2.dtype)
    xa = x2.to(acc)
    terms = [(start, _torch_kron_term(xa, A.to(acc), U.to(acc), V.to(acc), scale)) for start, A, U, V in targets]
    if weight is None and bias is None and len(terms) == 1 and terms[0][1].shape[1] == d_out:
        return terms[0][1].to(x2.dtype)  # kron_matmul: the increment is the whole output
    if weight is not None:
        y = F.linear(xa, weight.to(acc), None if bias is None else bias.to(acc))
    else:
        y = torch.zeros((x2.shape[0], d_out), device=x2.device, dtype=acc)
        if bias is not None:
            y += bias.to(acc)
    for start, term in terms:
        y[:, start:start + term.shape[1]] += term
    return y.to(x2.dtype)


def _torch_backward(dy2, x2, weight, targets, scale, need_dx: bool):
    """``(dx, [(dA, dU, dV) per target])`` in the accumulation dtype, from x and dy alone."""
    acc = compute_dtype(x2.dtype)
    xa, dya = x2.to(acc), dy2.to(acc)
    dx = dya @ weight.to(acc) if need_dx and weight is not None else None
    grads = []
    for start, A, U, V in targets:
        A, U, V = A.to(acc), U.to(acc), V.to(acc)
        rows = A.shape[1] * U.shape[1]
        dx_t, dA, dU, dV = _torch_kron_backward(dya[:, start:start + rows], xa, A, U, V, scale, need_dx)
        if dx_t is not None:
            dx = dx_t if dx is None else dx.add_(dx_t)
        grads.append((dA, dU, dV))
    return dx, grads


# ----------------------------------------------------------------------------------------
# the materialised increment and its gradient (kron_delta's torch path, the dense backend),
# for groups of targets: one launch per step for every target of a group
# ----------------------------------------------------------------------------------------
class _Group(NamedTuple):
    """Targets of one factor shape and dtype whose row slices start at ``start + k * step``
    (``k < K``; KAdaptation's q and v rows of a fused qkv: ``0`` and ``2d``), with their
    factors stacked on a leading K (views for ``K = 1``) in the accumulation dtype: every
    step of the dense composition is then one (batched) launch for all of them. On the H200
    (commit 93d8659) the fused steps were bound by the host's launches, not by their kernels:
    a q+v call forward + backward makes 19 launches grouped, 25 target by target
    (``tests/test_launches.py``)."""

    start: int
    step: int
    A: torch.Tensor  # (K, m, a_out, a_in)
    U: torch.Tensor  # (K, m, p, r)
    V: torch.Tensor  # (K, m, q, r)

    @property
    def rows(self) -> int:
        return self.A.shape[2] * self.U.shape[2]


def _stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``(K, ...)`` from K tensors of one shape, in ``dtype``: a view for one tensor already in it."""
    tensors = [t.to(dtype) for t in tensors]
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _group(targets, acc: torch.dtype) -> "_Group":
    step = targets[1][0] - targets[0][0] if len(targets) > 1 else 0
    return _Group(targets[0][0], step, *(_stack([t[i] for t in targets], acc) for i in (1, 2, 3)))


def _groups(targets, acc: torch.dtype) -> List["_Group"]:
    """``targets`` (``(start, A, U, V)``, validated and non-overlapping) as one group when they
    share their factors' shapes and dtypes and their starts rise by a constant step, else one
    group per target (the order of ``targets`` is kept: gradients come back in it)."""
    first = targets[0]
    key = [(tuple(t.shape), t.dtype) for t in first[1:]]
    starts = [t[0] for t in targets]
    step = starts[1] - starts[0] if len(starts) > 1 else 0
    if len(targets) > 1 and step > 0 and all(
        [(tuple(t.shape), t.dtype) for t in target[1:]] == key for target in targets
    ) and all(b - a == step for a, b in zip(starts, starts[1:])):
        return [_group(targets, acc)]
    return [_group([t], acc) for t in targets]


def _rows_view(w: torch.Tensor, g: "_Group") -> torch.Tensor:
    """The K row slices of ``w`` (any 2-D strides) that ``g`` adapts, as one ``(K, a_out, p,
    a_in, q)`` view: rows ``(o, p)``, columns ``(a, q)``."""
    K, _, a_out, a_in = g.A.shape
    p, q = g.U.shape[2], g.V.shape[2]
    s0, s1 = w.stride()
    rows = w.as_strided((K, g.rows, w.shape[1]), (g.step * s0, s0, s1), w.storage_offset() + g.start * s0)
    return rows.unflatten(2, (a_in, q)).unflatten(1, (a_out, p))


def _scaled_bmm(a, b, scale):
    """``scale * (a @ b)`` batched, in one launch: cuBLAS's alpha (``beta = 0`` ignores the
    uninitialised input, NaNs included)."""
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[2]))
    return torch.baddbmm(out, a, b, beta=0, alpha=scale)


def _outer(g: "_Group") -> torch.Tensor:
    """``B = U V^T`` per term of every target of ``g``, ``(K, m, p*q)``: one batched GEMM."""
    K, m, p, r = g.U.shape
    q = g.V.shape[2]
    return torch.bmm(g.U.reshape(K * m, p, r), g.V.reshape(K * m, q, r).transpose(1, 2)).view(K, m, p * q)


def _products(g: "_Group", scale: float = 1.0):
    """``(B, P)``: ``B = U V^T`` (:func:`_outer`) and ``P = scale * A^T B``, the increments as
    ``(K, a_out, a_in, p, q)`` (rows ``(o, a)``, columns ``(p, q)``; m contracted by one
    batched GEMM)."""
    K, m, a_out, a_in = g.A.shape
    B = _outer(g)
    P = _scaled_bmm(g.A.reshape(K, m, a_out * a_in).transpose(1, 2), B, scale)
    return B, P.view(K, a_out, a_in, g.U.shape[2], g.V.shape[2])


def _torch_delta(A, U, V, scale, out_dtype=None):
    """``scale * sum_i kron(A[i], U[i] @ V[i].T)`` in ``out_dtype`` (default the factors'),
    rows ``(o, p)``, columns ``(a, q)``: two GEMMs and the permuting copy (which converts)."""
    _, P = _products(_group([(0, A, U, V)], A.dtype), scale)
    delta = P[0].permute(0, 2, 1, 3)
    if out_dtype is not None and out_dtype != delta.dtype:
        delta = delta.to(out_dtype, memory_format=torch.contiguous_format)
    return delta.reshape(A.shape[1] * U.shape[1], A.shape[2] * V.shape[1])


def _group_grads(G, g: "_Group", scale, B=None):
    """``(dA, dU, dV)``, each stacked over the K targets of ``g`` (``(K, m, a_out, a_in)``,
    ``(K, m, p, r)``, ``(K, m, q, r)``), in the accumulation dtype from ``G: (K, rows,
    d_in)``, the gradient of the materialised increments (any float dtype): one copy that
    permutes G to ``(o, a, p, q)`` and converts it, then four batched GEMMs over ``m`` (five
    without the forward's ``B``; the scale in cuBLAS's alpha), O(K * m * d_out * d_in)."""
    K, m, a_out, a_in = g.A.shape
    p, r, q = g.U.shape[2], g.U.shape[3], g.V.shape[2]
    Gc = torch.empty((K, a_out, a_in, p, q), dtype=g.A.dtype, device=g.A.device)
    Gc = Gc.copy_(G.reshape(K, a_out, p, a_in, q).permute(0, 1, 3, 2, 4)).view(K, a_out * a_in, p * q)
    B = _outer(g) if B is None else B
    dA = _scaled_bmm(B, Gc.transpose(1, 2), scale).view(K, m, a_out, a_in)
    dB = _scaled_bmm(g.A.reshape(K, m, a_out * a_in), Gc, scale).view(K * m, p, q)
    dU = torch.bmm(dB, g.V.reshape(K * m, q, r)).view(K, m, p, r)
    dV = torch.bmm(dB.transpose(1, 2), g.U.reshape(K * m, p, r)).view(K, m, q, r)
    return dA, dU, dV


# ----------------------------------------------------------------------------------------
# dense backend: cuBLAS-first (the small increment materialised, dense GEMMs)
# ----------------------------------------------------------------------------------------
# Which implementation ``auto`` takes on CUDA (DESIGN.md 5: a choice table next to the op,
# with the measurement behind it). kron_matmul / kron_linear / kron_linear_slices: the dense
# composition and the structured Triton kernels have not yet been timed against each other
# on a GPU. The H200 run of commit 349dfe8 (shared/gpu/2026-11-27-H200: the Triton
# Kronecker and bottleneck kernels at 4-15% of memory bandwidth, slower than cuBLAS
# compositions in most comparisons) is the only evidence, so until a measurement decides per
# shape class, auto takes the dense composition on CUDA (issue 10); the structured kernels
# stay available as backend "triton" (and, on CPU, the structured torch path is the default:
# it measured 3.6x faster than the materialising reference, benchmarks/results/CPU).
_CUDA_AUTO = "dense"


def _dense_weight(x2, weight, groups, d_out, scale):
    """``(W + delta, [B = U V^T per group])``: ``weight`` (or zeros) plus every target's
    increment on its rows, in x2's dtype -- what the papers' code multiplies by, the
    increments formed from the small factors in the accumulation dtype and each sum ``W +
    delta`` rounded once to x2's dtype (as the reference under autocast). Launches: the
    weight's copy in x2's dtype (the cast a frozen Linear makes under autocast), then per
    group two batched GEMMs and one add that writes the rounded sums over the adapted rows."""
    if weight is None and len(groups) == 1 and groups[0].A.shape[0] == 1 and groups[0].rows == d_out:
        g = groups[0]  # kron_matmul: the increment is the whole weight
        B, P = _products(g, scale)
        delta = P[0].permute(0, 2, 1, 3).to(x2.dtype, memory_format=torch.contiguous_format)
        return delta.reshape(d_out, x2.shape[1]), [B]
    w = (torch.zeros((d_out, x2.shape[1]), device=x2.device, dtype=x2.dtype) if weight is None
         else weight.to(x2.dtype, copy=True))
    src = w if weight is None else weight
    products = []
    for g in groups:
        B, P = _products(g)
        # computed in the accumulation dtype (the inputs' common dtype), rounded once as stored
        torch.add(_rows_view(src, g), P.permute(0, 1, 3, 2, 4), alpha=scale, out=_rows_view(w, g))
        products.append(B)
    return w, products


def _dense_forward(x2, weight, bias, targets, d_out, scale, keep_weight=False):
    """One GEMM on ``W + delta``: as cheap as the frozen layer's forward plus an O(d^2) build.
    With ``keep_weight`` returns ``(y, W + delta, groups, [B per group])`` for the backward."""
    groups = _groups(targets, compute_dtype(x2.dtype))
    w, products = _dense_weight(x2, weight, groups, d_out, scale)
    y = F.linear(x2, w, bias)
    return (y, w, groups, products) if keep_weight else y


def _dense_backward(dy2, x2, weight, targets, scale, need_dx: bool, w=None, groups=None, products=()):
    """``dx = dy (W + delta)`` (with ``w``, the forward's ``W + delta``; else rebuilt: O(d^2)
    work), and per group the weight-gradient GEMMs of *its rows only* (``dy[:, rows]^T x``, in
    x's dtype as a Linear's weight gradient under autocast, into one buffer), contracted onto
    A, U, V in the accumulation dtype (``_group_grads``). ``groups``/``products``: the
    forward's (else formed again)."""
    if groups is None:
        groups = _groups(targets, compute_dtype(x2.dtype))
    dx = None
    if need_dx:
        if w is None:
            w, products = _dense_weight(x2, weight, groups, dy2.shape[1], scale)
        dx = dy2 @ w
    grads = []
    for i, g in enumerate(groups):
        K = g.A.shape[0]
        if K == 1:
            G = (dy2[:, g.start:g.start + g.rows].t() @ x2).unsqueeze(0)
        else:
            G = x2.new_empty((K, g.rows, x2.shape[1]))
            for k in range(K):
                start = g.start + k * g.step
                torch.mm(dy2[:, start:start + g.rows].t(), x2, out=G[k])
        dA, dU, dV = _group_grads(G, g, scale, products[i] if i < len(products) else None)
        grads += [(dA[k], dU[k], dV[k]) for k in range(K)]
    return dx, grads


# ----------------------------------------------------------------------------------------
# autograd Functions (thin: dispatch to a backend's forward/backward)
# ----------------------------------------------------------------------------------------
def _triton_kron():
    from ..triton import kron as triton_kron  # imported on first use: never at package import

    return triton_kron


def _linear_forward(x2, weight, bias, factors, starts, d_out, scale, impl, keep_weight=False):
    """The forward of :class:`KronLinearFunction` and of the ``kron_kernels::kron_linear``
    custom op; with ``keep_weight`` (dense only) ``(y, W + delta, groups, products)``
    (_dense_forward)."""
    targets = list(zip(starts, factors[0::3], factors[1::3], factors[2::3]))
    if keep_weight:
        return _dense_forward(x2, weight, bias, targets, d_out, scale, keep_weight=True)
    if impl == "triton":
        forward = _triton_kron().kron_linear_forward
    else:
        forward = _dense_forward if impl == "dense" else _torch_forward
    return forward(x2, weight, bias, targets, d_out, scale)


def _linear_backward(dy2, x2, weight, factors, starts, scale, impl, needs, dense_weight=None, groups=None,
                     products=()):
    """``[dx, dweight, dbias, *dfactors]`` (None where ``needs``, one bool per input, is False):
    the backward of :class:`KronLinearFunction` and of the custom op (``dense_weight``,
    ``groups``, ``products``: the dense forward's ``W + delta``, stacked factors and ``B``s,
    reused)."""
    targets = list(zip(starts, factors[0::3], factors[1::3], factors[2::3]))
    acc = compute_dtype(x2.dtype)
    dy2 = dy2.contiguous()
    if impl == "triton":
        dx, grads = _triton_kron().kron_linear_backward(dy2, x2, weight, targets, scale, needs[0])
    elif impl == "dense":
        dx, grads = _dense_backward(dy2, x2, weight, targets, scale, needs[0], dense_weight, groups, products)
    else:
        dx, grads = _torch_backward(dy2, x2, weight, targets, scale, needs[0])
    dweight = dbias = None
    if weight is not None and needs[1]:
        dweight = grad_like(dy2.to(acc).t() @ x2.to(acc), weight)
    if needs[2]:
        dbias = dy2.to(acc).sum(0).to(x2.dtype)
    # each factor's gradient in its factor's dtype and strides (the torch backend's dU, dV
    # are transposed views of rank-major results; DDP copies mismatched ones every step)
    dfactors = [
        grad_like(g, f) if needed else None
        for g, f, needed in zip((g for triple in grads for g in triple), factors, needs[3:])
    ]
    return [None if dx is None else dx.to(x2.dtype), dweight, dbias, *dfactors]


class KronLinearFunction(torch.autograd.Function):
    """``y = x @ weight.T + bias`` plus, for each target ``(start, A, U, V)``, ``x @ delta.T``
    added to output rows ``[start, start + a_out*p)``; on 2-D ``x``. ``weight``/``bias`` may
    be None. The factors arrive flattened as ``*factors = A_0, U_0, V_0, A_1, ...``."""

    @staticmethod
    def forward(ctx, x2, weight, bias, scale, impl, d_out, starts, *factors):
        ctx.scale, ctx.impl, ctx.starts = scale, impl, starts
        if impl != "dense":
            ctx.save_for_backward(x2, weight, *factors)
            return _linear_forward(x2, weight, bias, factors, starts, d_out, scale, impl)
        # the dense path keeps its W + delta (x's dtype, as autograd keeps a Linear's weight
        # under autocast, and as the reference does), its stacked factors and B = U V^T instead
        # of rebuilding them: on the H200 the fused steps were bound by the host's launches
        # (commit 93d8659)
        y, w, groups, products = _linear_forward(x2, weight, bias, factors, starts, d_out, scale, impl,
                                                 keep_weight=True)
        ctx.group_starts = [(g.start, g.step) for g in groups]
        kept = [t for g, B in zip(groups, products) for t in (g.A, g.U, g.V, B)]
        ctx.save_for_backward(x2, weight, w, *factors, *kept)
        return y

    @staticmethod
    def backward(ctx, dy2):
        groups = products = None
        if ctx.impl == "dense":
            x2, weight, w, *rest = ctx.saved_tensors
            n_factors = 3 * len(ctx.starts)
            factors, kept = rest[:n_factors], rest[n_factors:]
            groups = [_Group(start, step, *kept[4 * i:4 * i + 3]) for i, (start, step) in enumerate(ctx.group_starts)]
            products = kept[3::4]
        else:
            (x2, weight, *factors), w = ctx.saved_tensors, None
        need = ctx.needs_input_grad
        dx, dweight, dbias, *dfactors = _linear_backward(
            dy2, x2, weight, factors, ctx.starts, ctx.scale, ctx.impl, need[:3] + need[7:], dense_weight=w,
            groups=groups, products=products or (),
        )
        return (dx, dweight, dbias, None, None, None, None, *dfactors)


# the same computation as PyTorch custom ops, for torch.compile (see ops._common.compiling)
@torch.library.custom_op("kron_kernels::kron_linear", mutates_args=())
def _kron_linear_op(
    x2: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], factors: List[torch.Tensor],
    starts: List[int], d_out: int, scale: float, impl: str,
) -> torch.Tensor:
    return _linear_forward(x2, weight, bias, factors, starts, d_out, scale, impl)


@_kron_linear_op.register_fake
def _(x2, weight, bias, factors, starts, d_out, scale, impl):
    return x2.new_empty((x2.shape[0], d_out))


@torch.library.custom_op("kron_kernels::kron_linear_backward", mutates_args=())
def _kron_linear_backward_op(
    dy2: torch.Tensor, x2: torch.Tensor, weight: Optional[torch.Tensor], factors: List[torch.Tensor],
    starts: List[int], scale: float, impl: str, needs: List[bool],
) -> List[torch.Tensor]:
    """The gradients ``needs`` asks for, in the order ``[dx, dweight, dbias, *dfactors]``. A
    custom op's outputs may not alias one another: the dense path's grouped targets get their
    factors' gradients as views of one stacked buffer, so all but the first of a buffer are
    copied here (eager autograd keeps the views)."""
    grads, seen = [], set()
    for g in _linear_backward(dy2, x2, weight, factors, starts, scale, impl, needs):
        if g is not None:
            storage = g.untyped_storage().data_ptr()
            grads.append(g.clone() if storage in seen else g)
            seen.add(storage)
    return grads


@_kron_linear_backward_op.register_fake
def _(dy2, x2, weight, factors, starts, scale, impl, needs):
    likes = [x2.new_empty(x2.shape), weight, dy2.new_empty(dy2.shape[1:]), *factors]
    return [torch.empty_like(like) for like, needed in zip(likes, needs) if needed]


def _kron_linear_setup(ctx, inputs, output):
    x2, weight, bias, factors, starts, d_out, scale, impl = inputs
    ctx.save_for_backward(x2, weight, *factors)
    ctx.starts, ctx.scale, ctx.impl, ctx.has_bias = starts, scale, impl, bias is not None


def _kron_linear_autograd(ctx, dy2):
    x2, weight, *factors = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [bool(need[0]), weight is not None and bool(need[1]), ctx.has_bias and bool(need[2]),
             *grad_flags(need[3], len(factors))]
    grads = iter(_kron_linear_backward_op(dy2, x2, weight, factors, ctx.starts, ctx.scale, ctx.impl, needs))
    dx, dweight, dbias, *dfactors = [next(grads) if needed else None for needed in needs]
    return dx, dweight, dbias, dfactors, None, None, None, None


_kron_linear_op.register_autograd(_kron_linear_autograd, setup_context=_kron_linear_setup)


def _delta_forward(A, U, V, scale, impl, out_dtype):
    """The increment in ``out_dtype`` by the Triton kernel (which stores it so), or (torch and
    dense backends) by two torch GEMMs and the converting permute."""
    if impl == "triton":
        return _triton_kron().kron_delta_forward(A, U, V, scale, out_dtype)
    acc = compute_dtype(A.dtype)
    return _torch_delta(A.to(acc), U.to(acc), V.to(acc), scale, out_dtype)


def _delta_backward(grad, A, U, V, scale):
    """The factors' gradients (``_group_grads`` converts ``grad`` of any dtype in its copy)."""
    acc = compute_dtype(A.dtype)
    dA, dU, dV = _group_grads(grad.unsqueeze(0), _group([(0, A, U, V)], acc), scale)
    return grad_like(dA[0], A), grad_like(dU[0], U), grad_like(dV[0], V)


class KronDeltaFunction(torch.autograd.Function):
    """The materialised increment. Its backward is two GEMMs on the (permuted) gradient,
    O(m * d_out * d_in) and independent of the token count, so it runs in torch everywhere."""

    @staticmethod
    def forward(ctx, A, U, V, scale, impl, out_dtype):
        ctx.save_for_backward(A, U, V)
        ctx.scale = scale
        return _delta_forward(A, U, V, scale, impl, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        A, U, V = ctx.saved_tensors
        return (*_delta_backward(grad, A, U, V, ctx.scale), None, None, None)


@torch.library.custom_op("kron_kernels::kron_delta", mutates_args=())
def _kron_delta_op(
    A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, scale: float, impl: str, out_dtype: torch.dtype,
) -> torch.Tensor:
    return _delta_forward(A, U, V, scale, impl, out_dtype)


@_kron_delta_op.register_fake
def _(A, U, V, scale, impl, out_dtype):
    return A.new_empty((A.shape[1] * U.shape[1], A.shape[2] * V.shape[1]), dtype=out_dtype)


def _kron_delta_setup(ctx, inputs, output):
    A, U, V, scale, impl, out_dtype = inputs
    ctx.save_for_backward(A, U, V)
    ctx.scale = scale


def _kron_delta_autograd(ctx, grad):
    # plain torch GEMMs: traced into the compiled backward graph, where Inductor may fuse them
    A, U, V = ctx.saved_tensors
    return (*_delta_backward(grad, A, U, V, ctx.scale), None, None, None)


_kron_delta_op.register_autograd(_kron_delta_autograd, setup_context=_kron_delta_setup)


# ----------------------------------------------------------------------------------------
# public functional API
# ----------------------------------------------------------------------------------------
def kron_delta(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, scale: float = 1.0, *,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``scale * sum_i kron(A[i], U[i] @ V[i].T)``, shape ``(a_out*p, a_in*q)``, in ``dtype``
    (None: A's, also under autocast), computed in the factors' precision and rounded once as
    it is stored -- a consumer that would convert it anyway passes its dtype (the Compacter
    modules pass the autocast dtype, saving a conversion launch each way).

    Use it to merge an increment into a frozen weight or to inspect it; to *apply* an
    increment to activations use :func:`kron_matmul` / :func:`kron_linear`, which never build it.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    _check_factors(A, U, V)
    scale = check_scale(scale)
    refuses = None
    if torch.float64 in (A.dtype, U.dtype, V.dtype):
        refuses = ("its kernels compute in float32, got float64 factors "
                   f"(A: {A.dtype}, U: {U.dtype}, V: {V.dtype})")
    # the dense backend's composition of this op is its torch path (it materialises anyway)
    impl = backend.select("kron_delta", A.device, triton_refuses=refuses, dense=True)
    A, U, V = (as_kernel_operand(t) for t in (A, U, V))
    # the increment is built in the factors' precision even under autocast: it is small, and
    # the projection that consumes it runs at autocast precision anyway
    out_dtype = A.dtype if dtype is None else dtype
    with torch.autocast(device_type=A.device.type, enabled=False):
        if compiling():
            return _kron_delta_op(A, U, V, scale, impl, out_dtype)
        return KronDeltaFunction.apply(A, U, V, scale, impl, out_dtype)


class KronDeltasFunction(torch.autograd.Function):
    """K increments sharing ``A``, ``(K, a_out*p, a_in*q)``, from U and V stacked inside:
    one chain of launches for all K (:func:`kron_deltas`)."""

    @staticmethod
    def forward(ctx, A, scale, out_dtype, *UV):
        K = len(UV) // 2
        acc = compute_dtype(A.dtype)
        U, V = _stack(UV[:K], acc), _stack(UV[K:], acc)
        a = A.to(acc)
        g = _Group(0, 0, a.unsqueeze(0).expand(K, *a.shape), U, V)
        B, P = _products(g, scale)
        ctx.save_for_backward(A, U, V, B, *UV)
        ctx.scale = scale
        m, a_out, a_in = A.shape
        p, q = U.shape[2], V.shape[2]
        # the permuting copy converts: every increment rounded once, as it is stored
        out = torch.empty((K, a_out, p, a_in, q), dtype=out_dtype, device=A.device)
        return out.copy_(P.permute(0, 1, 3, 2, 4)).view(K, a_out * p, a_in * q)

    @staticmethod
    def backward(ctx, grad):
        A, U, V, B, *UV = ctx.saved_tensors
        K = U.shape[0]
        a = A.to(U.dtype)
        dA, dU, dV = _group_grads(grad, _Group(0, 0, a.unsqueeze(0).expand(K, *a.shape), U, V), ctx.scale, B)
        # A is shared by all K: its gradient is the sum of theirs; U_k, V_k get views of the stack
        dUs = [grad_like(dU[k], like) for k, like in enumerate(UV[:K])]
        dVs = [grad_like(dV[k], like) for k, like in enumerate(UV[K:])]
        return (grad_like(dA.sum(0), A), None, None, *dUs, *dVs)


def kron_deltas(A: torch.Tensor, Us: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor], scale: float = 1.0, *,
                dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
    """``(kron_delta(A, Us[k], Vs[k], scale, dtype=dtype) for k < K)`` -- K increments that
    share ``A`` (Compacter's PHM weights of one shape, every layer of a model), built together:
    U and V stacked, two batched GEMMs and one converting copy forward, seven launches backward,
    for all K (K of :func:`kron_delta` make K, or 3K in torch, forward and 6K backward). The
    results are views of one ``(K, a_out*p, a_in*q)`` buffer; gradients reach every factor.
    Every ``Us[k]`` must have one shape, every ``Vs[k]`` one shape. Plain torch GEMMs on every
    device (cuBLAS on a GPU): on the H200 (commit 93d8659) the Compacter step was bound by the
    host's launches, not its kernels."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    for name, seq in (("Us", Us), ("Vs", Vs)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence) or not seq:
            raise TypeError(f"{name} must be a non-empty sequence of tensors, got {type(seq).__name__}")
    if len(Us) != len(Vs):
        raise ValueError(f"Us and Vs must hold one factor per increment: {len(Us)} and {len(Vs)}")
    for k, (U, V) in enumerate(zip(Us, Vs)):
        try:
            _check_factors(A, U, V)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (increment {k})") from None
        if U.shape != Us[0].shape or V.shape != Vs[0].shape or (U.dtype, V.dtype) != (Us[0].dtype, Vs[0].dtype):
            raise ValueError(f"every U (and every V) must share one shape and dtype: increment {k} has U "
                             f"{tuple(U.shape)} {U.dtype}, V {tuple(V.shape)} {V.dtype}, increment 0 U "
                             f"{tuple(Us[0].shape)} {Us[0].dtype}, V {tuple(Vs[0].shape)} {Vs[0].dtype}")
    scale = check_scale(scale)
    # one implementation, plain torch (the dense backend's kind); no Triton or extension kernel
    impl = backend.select("kron_deltas", A.device, dense=True,
                          triton_refuses="it has no Triton kernel (its batched GEMMs run in torch)")
    out_dtype = A.dtype if dtype is None else dtype
    with torch.autocast(device_type=A.device.type, enabled=False):
        if compiling():  # one custom op per increment: Dynamo traces no autograd Function here
            return tuple(_kron_delta_op(A, U, V, scale, impl, out_dtype) for U, V in zip(Us, Vs))
        return stacked_deltas(KronDeltasFunction.apply(A, scale, out_dtype, *Us, *Vs))


def stacked_deltas(stacked: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """:func:`kron_deltas`' results, views of ``stacked`` (whose gradient is theirs, stacked:
    one launch); ``result[0].kk_stacked`` is ``stacked`` (a consumer can hook its gradient)."""
    deltas = stacked.unbind(0)
    deltas[0].kk_stacked = stacked
    return deltas


class _IncrementsLinearFunction(torch.autograd.Function):
    """``x2 @ (weight + increments on their row slices)^T + bias`` with materialised increments
    given (in x2's dtype): the dense backend's GEMMs with the increments built elsewhere (a
    :class:`~kron_kernels.nn._bank.DeltaBank`); their gradients are the weight gradient of
    their rows, ``dy[:, rows]^T x``, one GEMM each."""

    @staticmethod
    def forward(ctx, x2, weight, bias, starts, *increments):
        w = weight.to(x2.dtype, copy=True)  # the cast a frozen Linear makes under autocast
        for start, inc in zip(starts, increments):
            rows = slice(start, start + inc.shape[0])
            # the sum taken in the inputs' common dtype (fp32), rounded once as it is stored
            torch.add(weight[rows], inc, out=w[rows])
        ctx.save_for_backward(x2, w, weight if weight.requires_grad else None)
        ctx.starts, ctx.rows = starts, [inc.shape[0] for inc in increments]
        return F.linear(x2, w, bias)

    @staticmethod
    def backward(ctx, dy2):
        x2, w, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dy2 @ w if need[0] else None
        acc = compute_dtype(x2.dtype)
        dweight = grad_like(dy2.to(acc).t() @ x2.to(acc), weight) if need[1] else None
        dbias = dy2.sum(0) if need[2] else None
        dincs = [dy2[:, s:s + rows].t() @ x2 if needed else None
                 for s, rows, needed in zip(ctx.starts, ctx.rows, need[4:])]
        return (dx, dweight, dbias, None, *dincs)


def linear_with_increments(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           increments: Sequence[Tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``x @ (weight + increments)^T + bias`` for materialised increments ``[(start, delta)]``
    on output row slices (``delta: (rows, in_features)``, in the dtype the projection runs in:
    the autocast dtype under autocast, else x's), as :func:`kron_linear_slices`'s dense backend
    computes it -- one copy of the weight with each ``W + delta`` rounded once, one GEMM, and
    in the backward ``dx`` and each increment's gradient ``dy[:, rows]^T x``. The entry point of
    the KAdaptation layers whose increments a model-level bank builds for every layer at once
    (:class:`~kron_kernels.nn._bank.DeltaBank`); the frozen ``weight``/``bias`` take
    gradients only if they require them."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2, device=x.device)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x's last dim must be weight's in_features = {d_in}, got x of shape {tuple(x.shape)}")
    cast = autocast_target(x)
    dt = x.dtype if cast is None else cast
    for k, (start, inc) in enumerate(increments):
        check_tensor(f"increments[{k}]", inc, ndim=2, dtypes=(dt,), device=x.device)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + inc.shape[0] > d_out \
                or inc.shape[1] != d_in:
            raise ValueError(f"increments[{k}] of shape {tuple(inc.shape)} at row {start} must lie within the "
                             f"weight's {(d_out, d_in)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        bias = bias.to(dt)
    x = x.to(dt)
    lead = x.shape[:-1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        y2 = _IncrementsLinearFunction.apply(x.reshape(-1, d_in), weight, bias, [s for s, _ in increments],
                                             *(inc for _, inc in increments))
    return y2.reshape(*lead, d_out)


def dense_serves(op: str, x: torch.Tensor) -> bool:
    """Whether ``op`` (``kron_linear``/``kron_matmul``) would run its dense composition on ``x``:
    the backend in force resolved as the op resolves it (auto on CUDA: the choice table)."""
    refuses = "float64 activations" if x.dtype == torch.float64 else None
    return backend.select(op, x.device, triton_refuses=refuses, dense=True, cuda_auto=_CUDA_AUTO) == "dense"


def _kron_apply(x, weight, bias, targets, d_out, scale, op):
    """Validate, apply autocast, flatten batch dims and run :class:`KronLinearFunction`.

    ``targets`` is a list of ``(start, A, U, V)``; ``d_out`` the output width."""
    device = targets[0][1].device if isinstance(targets[0][1], torch.Tensor) else None
    d_in = None
    flat, starts, spans = [], [], []
    for k, (start, A, U, V) in enumerate(targets):
        where = "" if len(targets) == 1 else f" (target {k})"
        try:
            m, a_out, a_in, p, q, r = _check_factors(A, U, V)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc}{where}") from None
        if A.device != device:
            raise ValueError(f"A{where} is on {A.device}, expected {device} (all factors must share a device)")
        if d_in is not None and a_in * q != d_in:
            raise ValueError(f"every target must take the same input width: a_in*q = {a_in * q}{where}, not {d_in}")
        d_in = a_in * q
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + a_out * p > d_out:
            raise ValueError(
                f"target rows [{start}, {start}+{a_out * p}){where} must lie within the {d_out} output rows"
            )
        spans.append((start, start + a_out * p))
        starts.append(start)
        flat += [A, U, V]
    for (s0, e0), (s1, e1) in zip(sorted(spans), sorted(spans)[1:]):
        if s1 < e0:
            raise ValueError(f"target rows [{s0}, {e0}) and [{s1}, {e1}) overlap")
    check_tensor("x", x, min_ndim=1, device=device)
    if x.shape[-1] != d_in:
        A, V = targets[0][1], targets[0][3]
        raise ValueError(
            f"x's last dim must be a_in*q = {d_in} (from A {tuple(A.shape)} and V {tuple(V.shape)}), "
            f"got x of shape {tuple(x.shape)}"
        )
    if weight is not None:
        check_tensor("weight", weight, ndim=2, device=device)
        if tuple(weight.shape) != (d_out, d_in):
            raise ValueError(f"weight must have shape (d_out, d_in) = ({d_out}, {d_in}), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=device)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    scale = check_scale(scale)
    cast = autocast_target(x)  # x, bias (and, but for the dense path, weight) run in it
    for name, t in (("weight", weight), ("bias", bias)):
        if cast is None and t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast one of them (or use autocast)")
    if cast is not None:
        x, bias = x.to(cast), (None if bias is None else bias.to(cast))
    refuses = None
    if x.dtype == torch.float64:
        refuses = "its kernels take float16/bfloat16/float32 activations, got float64"
    impl = backend.select(op, x.device, triton_refuses=refuses, dense=True, cuda_auto=_CUDA_AUTO)
    if cast is not None and weight is not None and impl != "dense":
        # the dense path forms W + delta from the weight as it is and rounds the sum once
        # (as the reference under autocast): casting W first would round twice and cost a launch
        weight = weight.to(cast)
    # the kernels read the bias and the factors through bare pointers (x and weight keep their
    # strides: the kernels and cuBLAS take them)
    bias = as_kernel_operand(bias)
    flat = [as_kernel_operand(f) for f in flat]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if compiling():
            y2 = _kron_linear_op(x2, weight, bias, flat, list(starts), d_out, scale, impl)
        else:
            y2 = KronLinearFunction.apply(x2, weight, bias, scale, impl, d_out, tuple(starts), *flat)
    return y2.reshape(*lead, d_out)


def kron_matmul(x: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x @ kron_delta(A, U, V, scale).T`` for ``x: (..., a_in*q)``, without materialising the delta."""
    _check_factors(A, U, V)
    return _kron_apply(x, None, None, [(0, A, U, V)], A.shape[1] * U.shape[1], scale, "kron_matmul")


def kron_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``x @ (weight + kron_delta(A, U, V, scale)).T + bias``, fused; ``weight``/``bias`` are
    typically frozen (they get gradients only if they require them)."""
    if weight is None:
        raise ValueError("weight is required for kron_linear (use kron_matmul for the increment alone)")
    _check_factors(A, U, V)
    return _kron_apply(x, weight, bias, [(0, A, U, V)], A.shape[1] * U.shape[1], scale, "kron_linear")


def kron_linear_slices(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: Sequence[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float = 1.0,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with Kronecker increments on row slices of the output, fused.

    ``targets`` is a sequence of ``(start, A, U, V)``: the increment ``kron_delta(A, U, V,
    scale)`` is added to output rows ``[start, start + a_out*p)``; slices must not overlap,
    and rows no target covers are the plain linear layer's. This is KAdaptation on the q and
    v rows of a fused qkv projection, in one pass: one frozen GEMM (cuBLAS adds it onto the
    increments in its epilogue) and one Kronecker kernel per target writing straight into
    its rows, forward and backward.
    """
    if weight is None:
        raise ValueError("weight is required for kron_linear_slices")
    check_tensor("weight", weight, ndim=2)
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not targets:
        raise ValueError("targets must be a non-empty sequence of (start, A, U, V)")
    for k, target in enumerate(targets):
        if not isinstance(target, (tuple, list)) or len(target) != 4:
            raise ValueError(f"targets[{k}] must be a (start, A, U, V) tuple")
    return _kron_apply(x, weight, bias, [tuple(t) for t in targets], weight.shape[0], scale, "kron_linear")
