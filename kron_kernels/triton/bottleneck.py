"""Triton kernels for the fused low-rank bottleneck family (DESIGN.md 4.5):

    out = [x1 +] scale * drop(middle((x1 [+ x2]) @ D [+ b_D])) @ Up^T [+ bias]

``D: (d, r)`` is the down-projection, ``Up^T: (r, d)`` the up-projection (ARC ties it to
``D^T``), ``b_D: (r,)`` an optional down-projection bias, the middle is an ``r x r`` core
(FacT), a diagonal (ARC) or GELU (LoSA, the Compacter adapter), ``drop`` an optional dropout
on the r-dim intermediate, ``scale`` a (possibly trainable) scalar, and the residual is ``x1``
(ARC, the adapter: the input; LoSA: ``h``, with ``x2 = z``). The Compacter adapter
``h + GELU(h W_d^T + b_d) W_u^T + b_u`` is the instance ``D = W_d^T``, ``b_D = b_d``, GELU,
``Up = W_u``, ``bias = b_u``, scale 1 (``ops/adapter.py``).

Rows and features. The kernels see the activations as ``n_rows`` rows of ``d`` features,
row ``n`` at ``(n // n_inner) * stride_outer + (n % n_inner) * stride_inner`` and feature
``k`` at ``k * stride_feat``. The channel mode is ``n_inner = 1`` (row ``n`` of a 2-D view);
the token mode mixes a ``(B, T, C)`` tensor along ``T`` with rows ``(b, c)`` and features
``t`` -- the same kernels read it through its strides, with no transposed copy.

Forward: one program per ``BLOCK_N`` rows streams the features twice -- first to reduce
``pre = x @ D`` (``BLOCK_N x R_PAD``, in registers), then to write ``out`` chunk by chunk --
so the r-dim intermediate never leaves the chip.

Backward, with ``g = dout``, ``y = middle(pre)``, ``m`` the scaled keep mask, ``a = y * m``:

    dm = g Up                    dscale = sum(dm * a)           d_a = scale * dm
    d_y = d_a * m                core: dcore = pre^T d_y, d_pre = d_y core^T
                                 diag: ddiag = sum_rows(d_y * pre), d_pre = d_y * diag
                                 gelu: d_pre = d_y * GELU'(pre)
    dx1 = [g +] d_pre D^T        dD^T = d_pre^T x     dUp^T = (scale a)^T g     dbias = sum_rows g
    dx2 = d_pre D^T              db_D = sum_rows d_pre
                                 (tied Up = D: dD^T and dUp^T accumulate into one buffer)

``G`` persistent programs walk the row blocks (block ``pid``, ``pid + G``, ...; on CUDA ``G``
is tuned with the tile: ``PROGRAMS_PER_SM``, triton/_autotune.py); each recomputes ``pre`` and
``dm`` in one pass over the features, then in a second pass writes ``dx`` and adds its share
of the weight gradients to its own slice of ``(G, ...)`` fp32 partial-sum buffers, summed by
the launcher with torch: deterministic, no atomics.

Small ranks: ``tl.dot`` needs every dimension >= 16, so the launchers zero-pad ``r`` to
``R_PAD = max(16, next_pow2(r))`` (weights as ``(R_PAD, d)`` row-major ``D^T`` and ``Up^T``,
the core ``(R_PAD, R_PAD)``, the diagonal ``(R_PAD,)``). Padded columns have ``pre = 0``
(the down bias is zero-padded too), ``GELU(0) = 0``, a zero diagonal/core and a zero up row, so
they contribute nothing and need no masks; rows past ``n_rows`` and features past ``d`` load as
0 (with a down bias their ``pre`` is ``b_D``, but their ``g`` is 0, so ``dm``, ``d_y`` and
``d_pre`` are, and every weight gradient's share of them: no row mask either).

Dropout: the keep decision of intermediate element ``(n, j)`` is ``tl.rand(seed, n * r + j) >=
p`` -- a counter-based (Philox) draw, so the backward regenerates exactly the forward's mask
from ``(seed, n, j)`` and nothing is stored; :func:`dropout_keep_mask` writes the same mask
out (for tests; the torch backend draws its own mask from a seeded ``torch.Generator``).

FacT, several slots per call (``_fact_fwd_kernel`` / ``_fact_bwd_kernel``; DESIGN.md 4.2).
``k`` slots share ``U, V: (d, r)`` and have their own cores ``C_j: (r, r)``; ``s`` is a Python
float. With ``m_j`` the scaled keep mask of slot ``j`` (1 without dropout):

    rows:  x (N, d)    -> out (N, k d),  out_j = a_j V^T,  a_j = s m_j (pre C_j),  pre = x U
    cols:  x (N, k d)  -> out (N, d),    out = (sum_j a_j) V^T,  a_j = s m_j (pre_j C_j),  pre_j = x_j U

``pre`` (rows) is reduced once per row block and reused by every slot: ``x @ U`` once for
q, k and v. Backward, with ``g = dout`` (rows: ``g_j`` its ``j``-th d-chunk; cols: ``g_j = g``)
and ``x_j`` (cols: the ``j``-th chunk; rows: ``x_j = x``, ``pre_j = pre``):

    dt_j = g_j V            d_a_j = s m_j dt_j         (the gradient of pre_j C_j)
    dC_j = pre_j^T d_a_j    d_pre_j = d_a_j C_j^T
    rows:  d_pre = sum_j d_pre_j,  dx = d_pre U^T,      dU = x^T d_pre
    cols:  dx_j = d_pre_j U^T,     dU = sum_j x_j^T d_pre_j
    dV = sum_j g_j^T a_j    (cols: g^T sum_j a_j)

Persistent programs walk row blocks as above; the weight gradients go to each one's own
zero-initialised fp32 slices ``(G, R_PAD, d)`` of ``dU^T``, ``dV^T`` and ``(G, k, R_PAD, R_PAD)``
of the cores (read-modify-write behind a CTA barrier), summed by the launcher. The dropout
counter of element ``(n, j, t)`` of the ``(N, k, r)`` intermediate is ``(n k + j) r + t``: the
``(N k, r)`` keep mask of :func:`dropout_keep_mask` viewed as ``(N, k, r)``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _autotune, dot_precision, gpu_properties, on_device

__all__ = ["bottleneck_forward", "bottleneck_backward", "fact_forward", "fact_backward", "dropout_keep_mask",
           "MIDDLES"]

# constexpr: compiled kernels may read module globals only when they are tl.constexpr
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_CORE = tl.constexpr(0)
_DIAG = tl.constexpr(1)
_GELU = tl.constexpr(2)
MIDDLES = {"core": 0, "diag": 1, "gelu": 2}


@triton.jit
def _gelu_and_grad(z):
    """Exact GELU ``z * Phi(z)`` and its derivative ``Phi(z) + z * phi(z)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z * cdf, cdf + z * pdf


@triton.jit
def _keep(seed, offs_rows, offs_r, R, p_drop):
    """The dropout keep mask of intermediate elements (rows, j): Philox on ``n * r + j``."""
    return tl.rand(seed, offs_rows[:, None] * R + offs_r[None, :]) >= p_drop


@triton.jit
def _row_offsets(row0, n_inner, stride_outer, stride_inner, BLOCK_N: tl.constexpr, ROWS_BLOCKED: tl.constexpr):
    """int64 element offsets (N * stride can exceed 2^31 elements) of rows ``row0 + [0, BLOCK_N)``.

    ``ROWS_BLOCKED`` (``n_inner % BLOCK_N == 0``, e.g. the token mode's C = 768 rows per
    batch): the block's rows share one outer index, so they are ``base + i * stride_inner``
    -- written so that the compiler sees the rows' contiguity (stride_inner = 1 in token
    mode) and coalesces the loads along them rather than along the strided token axis.
    """
    if ROWS_BLOCKED:
        outer = row0 // n_inner
        inner0 = tl.multiple_of(row0 % n_inner, BLOCK_N)
        inner = inner0.to(tl.int64) + tl.arange(0, BLOCK_N)
        return outer.to(tl.int64) * stride_outer + inner * stride_inner
    offs_n = row0 + tl.arange(0, BLOCK_N)
    outer = (offs_n // n_inner).to(tl.int64)
    inner = (offs_n % n_inner).to(tl.int64)
    return outer * stride_outer + inner * stride_inner


@triton.jit
def _load_rows(ptr, rows, offs_d, stride_d, mask):
    """A ``(rows, features)`` activation tile in fp32 (masked-off elements 0)."""
    tile = tl.load(ptr + rows[:, None] + offs_d[None, :].to(tl.int64) * stride_d, mask=mask, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _load_x(x_ptr, x2_ptr, rows_x, rows_x2, offs_d, stride_xd, stride_x2d, mask, HAS_X2: tl.constexpr):
    """The bottleneck's input tile ``x1 [+ x2]`` in fp32."""
    x = _load_rows(x_ptr, rows_x, offs_d, stride_xd, mask)
    if HAS_X2:
        x += _load_rows(x2_ptr, rows_x2, offs_d, stride_x2d, mask)
    return x


@triton.jit
def _bottleneck_fwd_kernel(
    x_ptr, x2_ptr, down_t_ptr, up_t_ptr, core_ptr, diag_ptr, scale_ptr, bias_ptr, down_bias_ptr, out_ptr,
    n_rows, n_inner, D, R, seed, p_drop, drop_scale,
    N_BUCKET,  # the row-count class, read only by the autotuner's key
    stride_xo, stride_xi, stride_xd, stride_x2o, stride_x2i, stride_x2d, stride_oo, stride_oi, stride_od,
    MIDDLE: tl.constexpr, HAS_X2: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DOWN_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ROWS_BLOCKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows_x = _row_offsets(pid * BLOCK_N, n_inner, stride_xo, stride_xi, BLOCK_N, ROWS_BLOCKED)
    rows_x2 = _row_offsets(pid * BLOCK_N, n_inner, stride_x2o, stride_x2i, BLOCK_N, ROWS_BLOCKED)
    rows_out = _row_offsets(pid * BLOCK_N, n_inner, stride_oo, stride_oi, BLOCK_N, ROWS_BLOCKED)
    offs_r = tl.arange(0, R_PAD)

    pre = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = _load_x(x_ptr, x2_ptr, rows_x, rows_x2, offs_d, stride_xd, stride_x2d,
                       mask_n[:, None] & mask_d[None, :], HAS_X2)
        down = tl.load(down_t_ptr + offs_r[None, :] * D + offs_d[:, None], mask=mask_d[:, None], other=0.0)
        pre = tl.dot(x, down, acc=pre, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    if HAS_DOWN_BIAS:
        pre += tl.load(down_bias_ptr + offs_r)[None, :]

    if MIDDLE == _CORE:
        core = tl.load(core_ptr + offs_r[:, None] * R_PAD + offs_r[None, :])
        a = tl.dot(pre, core, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    elif MIDDLE == _DIAG:
        a = pre * tl.load(diag_ptr + offs_r)[None, :]
    else:
        a, _gelu_grad = _gelu_and_grad(pre)
    if HAS_DROPOUT:
        a = tl.where(_keep(seed, offs_n, offs_r, R, p_drop), a * drop_scale, 0.0)
    a = a * tl.load(scale_ptr)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_nd = mask_n[:, None] & mask_d[None, :]
        up = tl.load(up_t_ptr + offs_r[:, None] * D + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        out = tl.dot(a, up, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if HAS_RESIDUAL:
            out += _load_rows(x_ptr, rows_x, offs_d, stride_xd, mask_nd)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
        tl.store(out_ptr + rows_out[:, None] + offs_d[None, :].to(tl.int64) * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def _bottleneck_bwd_kernel(
    x_ptr, x2_ptr, dout_ptr, down_t_ptr, up_t_ptr, core_ptr, diag_ptr, scale_ptr, down_bias_ptr,
    dx_ptr, dx2_ptr,
    ddown_t_part_ptr, dup_t_part_ptr, dcore_part_ptr, ddiag_part_ptr, dscale_part_ptr, dbias_part_ptr,
    ddown_bias_part_ptr,
    n_rows, n_inner, D, R, seed, p_drop, drop_scale,
    N_BUCKET,  # the row-count class, read only by the autotuner's key
    stride_xo, stride_xi, stride_xd, stride_x2o, stride_x2i, stride_x2d,
    stride_go, stride_gi, stride_gd, stride_dxo, stride_dxi, stride_dxd,
    MIDDLE: tl.constexpr, HAS_X2: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, TIED: tl.constexpr, NEED_DX: tl.constexpr, NEED_DX2: tl.constexpr, NEED_DW: tl.constexpr,
    ROWS_BLOCKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the launcher's grid only
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(n_rows, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    # this program's slices of the partial-sum buffers
    ddown_t_part_ptr += pid.to(tl.int64) * R_PAD * D
    dup_t_part_ptr += pid.to(tl.int64) * R_PAD * D
    dbias_part_ptr += pid.to(tl.int64) * D
    scale = tl.load(scale_ptr)
    if MIDDLE == _CORE:
        core = tl.load(core_ptr + offs_r[:, None] * R_PAD + offs_r[None, :])
    if MIDDLE == _DIAG:
        diag = tl.load(diag_ptr + offs_r)
    if HAS_DOWN_BIAS:
        down_bias = tl.load(down_bias_ptr + offs_r)
    dcore_acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    ddiag_acc = tl.zeros((R_PAD,), dtype=tl.float32)
    dscale_acc = tl.zeros((R_PAD,), dtype=tl.float32)
    ddown_bias_acc = tl.zeros((R_PAD,), dtype=tl.float32)

    for blk in range(pid, num_blocks, num_programs):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        row0 = blk * BLOCK_N
        rows_x = _row_offsets(row0, n_inner, stride_xo, stride_xi, BLOCK_N, ROWS_BLOCKED)
        rows_x2 = _row_offsets(row0, n_inner, stride_x2o, stride_x2i, BLOCK_N, ROWS_BLOCKED)
        rows_g = _row_offsets(row0, n_inner, stride_go, stride_gi, BLOCK_N, ROWS_BLOCKED)
        rows_dx = _row_offsets(row0, n_inner, stride_dxo, stride_dxi, BLOCK_N, ROWS_BLOCKED)

        # pass 1: pre = x D and dm = g Up, both reductions over the features
        pre = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        dm = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_nd = mask_n[:, None] & mask_d[None, :]
            x = _load_x(x_ptr, x2_ptr, rows_x, rows_x2, offs_d, stride_xd, stride_x2d, mask_nd, HAS_X2)
            g = tl.load(dout_ptr + rows_g[:, None] + offs_d[None, :].to(tl.int64) * stride_gd,
                        mask=mask_nd, other=0.0).to(tl.float32)
            offs_dr = offs_r[None, :] * D + offs_d[:, None]  # (BLOCK_D, R_PAD) views of D and Up
            down = tl.load(down_t_ptr + offs_dr, mask=mask_d[:, None], other=0.0)
            up = tl.load(up_t_ptr + offs_dr, mask=mask_d[:, None], other=0.0)
            pre = tl.dot(x, down, acc=pre, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            dm = tl.dot(g, up, acc=dm, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if HAS_DOWN_BIAS:
            pre += down_bias[None, :]

        # the r-dim chain, recomputed: y = middle(pre), a = y * mask
        if MIDDLE == _CORE:
            y = tl.dot(pre, core, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        elif MIDDLE == _DIAG:
            y = pre * diag[None, :]
        else:
            y, gelu_grad = _gelu_and_grad(pre)
        if HAS_DROPOUT:
            mask_scale = tl.where(_keep(seed, offs_n, offs_r, R, p_drop), drop_scale, 0.0)
            a = y * mask_scale
            d_y = dm * scale * mask_scale
        else:
            a = y
            d_y = dm * scale
        if MIDDLE == _CORE:
            d_pre = tl.dot(d_y, tl.trans(core), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        elif MIDDLE == _DIAG:
            d_pre = d_y * diag[None, :]
        else:
            d_pre = d_y * gelu_grad
        if NEED_DW:
            dscale_acc += tl.sum(dm * a, axis=0)
            if MIDDLE == _CORE:
                dcore_acc = tl.dot(tl.trans(pre), d_y, acc=dcore_acc, input_precision=DOT_PRECISION,
                                   out_dtype=tl.float32)
            if MIDDLE == _DIAG:
                ddiag_acc += tl.sum(d_y * pre, axis=0)
            if HAS_DOWN_BIAS:
                ddown_bias_acc += tl.sum(d_pre, axis=0)
        a_scaled = a * scale  # the up-projection's input

        # pass 2: dx = [g +] d_pre D^T, and this block's share of dD^T, dUp^T, dbias.
        # The program's first block overwrites its (uninitialised) partial slice -- its loads are
        # masked off (features < 0) and return 0 -- so every element of the slice is written;
        # later blocks add to it (features < D). (A scalar bound, not a block & scalar mask: the
        # interpreter mistypes a block & scalar mask.)
        d_summed = tl.where(blk == pid, 0, D)
        # Threads re-read partial-sum elements that other threads of this program stored for the
        # previous block (load and dot layouts differ): a CTA barrier orders those stores first.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_nd = mask_n[:, None] & mask_d[None, :]
            offs_rd = offs_r[:, None] * D + offs_d[None, :]  # (R_PAD, BLOCK_D) tiles of r-by-d matrices
            g = tl.load(dout_ptr + rows_g[:, None] + offs_d[None, :].to(tl.int64) * stride_gd,
                        mask=mask_nd, other=0.0).to(tl.float32)
            if NEED_DX or NEED_DX2:
                down_t = tl.load(down_t_ptr + offs_rd, mask=mask_d[None, :], other=0.0)
                dx = tl.dot(d_pre, down_t, input_precision=DOT_PRECISION, out_dtype=tl.float32)
                if NEED_DX2:
                    tl.store(dx2_ptr + rows_dx[:, None] + offs_d[None, :].to(tl.int64) * stride_dxd,
                             dx.to(dx2_ptr.dtype.element_ty), mask=mask_nd)
                if NEED_DX:
                    if HAS_RESIDUAL:
                        dx += g
                    tl.store(dx_ptr + rows_dx[:, None] + offs_d[None, :].to(tl.int64) * stride_dxd,
                             dx.to(dx_ptr.dtype.element_ty), mask=mask_nd)
            if NEED_DW:
                x = _load_x(x_ptr, x2_ptr, rows_x, rows_x2, offs_d, stride_xd, stride_x2d, mask_nd, HAS_X2)
                mask_summed = (offs_d < d_summed)[None, :]
                ddown_t = tl.load(ddown_t_part_ptr + offs_rd, mask=mask_summed, other=0.0)
                ddown_t = tl.dot(tl.trans(d_pre), x, acc=ddown_t, input_precision=DOT_PRECISION,
                                 out_dtype=tl.float32)
                if TIED:  # Up = D: both gradients land in one buffer
                    ddown_t = tl.dot(tl.trans(a_scaled), g, acc=ddown_t, input_precision=DOT_PRECISION,
                                     out_dtype=tl.float32)
                else:
                    dup_t = tl.load(dup_t_part_ptr + offs_rd, mask=mask_summed, other=0.0)
                    dup_t = tl.dot(tl.trans(a_scaled), g, acc=dup_t, input_precision=DOT_PRECISION,
                                   out_dtype=tl.float32)
                    tl.store(dup_t_part_ptr + offs_rd, dup_t, mask=mask_d[None, :])
                tl.store(ddown_t_part_ptr + offs_rd, ddown_t, mask=mask_d[None, :])
                dbias = tl.load(dbias_part_ptr + offs_d, mask=offs_d < d_summed, other=0.0)
                tl.store(dbias_part_ptr + offs_d, dbias + tl.sum(g, axis=0), mask=mask_d)

    if NEED_DW:
        tl.store(dscale_part_ptr + pid * R_PAD + offs_r, dscale_acc)
        if MIDDLE == _CORE:
            tl.store(dcore_part_ptr + pid.to(tl.int64) * R_PAD * R_PAD + offs_r[:, None] * R_PAD + offs_r[None, :],
                     dcore_acc)
        if MIDDLE == _DIAG:
            tl.store(ddiag_part_ptr + pid * R_PAD + offs_r, ddiag_acc)
        if HAS_DOWN_BIAS:
            tl.store(ddown_bias_part_ptr + pid * R_PAD + offs_r, ddown_bias_acc)


@triton.jit
def _fact_down(src_ptr, rows, col0, stride_d, mask_n, w_t_ptr, D,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr):
    """``src[rows, col0 : col0 + D] @ W`` as a ``(BLOCK_N, R_PAD)`` fp32 tile; ``W^T`` is the
    zero-padded ``(R_PAD, D)`` row-major matrix at ``w_t_ptr``."""
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        tile = _load_rows(src_ptr, rows, col0 + offs_d, stride_d, mask_n[:, None] & mask_d[None, :])
        w = tl.load(w_t_ptr + offs_r[None, :] * D + offs_d[:, None], mask=mask_d[:, None], other=0.0)
        acc = tl.dot(tile, w, acc=acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _fact_core(core_ptr, slot, R_PAD: tl.constexpr):
    offs_r = tl.arange(0, R_PAD)
    return tl.load(core_ptr + slot * R_PAD * R_PAD + offs_r[:, None] * R_PAD + offs_r[None, :])


@triton.jit
def _fact_drop(t, seed, offs_n, slot, K, R, p_drop, drop_scale, scale, HAS_DROPOUT: tl.constexpr,
               R_PAD: tl.constexpr):
    """``s * m_slot * t`` on a ``(BLOCK_N, R_PAD)`` tile of slot ``slot``'s intermediate (the
    counter ``(n k + slot) r + j`` keys the mask by row, slot and rank index)."""
    if HAS_DROPOUT:
        keep = _keep(seed, offs_n * K + slot, tl.arange(0, R_PAD), R, p_drop)
        t = tl.where(keep, t * (scale * drop_scale), 0.0)
    else:
        t = t * scale
    return t


@triton.jit
def _fact_up_store(a, v_t_ptr, bias_ptr, out_ptr, rows_out, col0, stride_od, mask_n, D,
                   HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                   R_PAD: tl.constexpr):
    """``out[rows, col0 : col0 + D] = a @ V^T [+ bias[col0 : col0 + D]]``."""
    offs_r = tl.arange(0, R_PAD)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        v_t = tl.load(v_t_ptr + offs_r[:, None] * D + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        out = tl.dot(a, v_t, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + col0 + offs_d, mask=mask_d, other=0.0)[None, :]
        tl.store(out_ptr + rows_out[:, None] + (col0 + offs_d)[None, :].to(tl.int64) * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _fact_outer(t, src_ptr, rows_src, stride_sd, part_ptr, w_t_ptr, dst_ptr, rows_dst, stride_dd, col0, mask_n, D,
                NEED_DST: tl.constexpr, NEED_PART: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_D: tl.constexpr, R_PAD: tl.constexpr):
    """One pass over features ``[col0, col0 + D)``: ``part (R_PAD, D) += t^T @ src`` (a weight
    gradient) and ``dst = t @ W^T`` (an input gradient), for a ``(BLOCK_N, R_PAD)`` ``t``."""
    offs_r = tl.arange(0, R_PAD)
    # threads re-read partial sums other threads of this program stored in an earlier pass
    # (load and dot layouts differ): a CTA barrier orders those stores first
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_nd = mask_n[:, None] & mask_d[None, :]
        offs_rd = offs_r[:, None] * D + offs_d[None, :]
        if NEED_DST:
            w_t = tl.load(w_t_ptr + offs_rd, mask=mask_d[None, :], other=0.0)
            dst = tl.dot(t, w_t, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            tl.store(dst_ptr + rows_dst[:, None] + (col0 + offs_d)[None, :].to(tl.int64) * stride_dd,
                     dst.to(dst_ptr.dtype.element_ty), mask=mask_nd)
        if NEED_PART:
            src = _load_rows(src_ptr, rows_src, col0 + offs_d, stride_sd, mask_nd)
            part = tl.load(part_ptr + offs_rd, mask=mask_d[None, :], other=0.0)
            part = tl.dot(tl.trans(t), src, acc=part, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            tl.store(part_ptr + offs_rd, part, mask=mask_d[None, :])


@triton.jit
def _fact_dcore_add(dcore_part_ptr, slot, pre, d_a, DOT_PRECISION: tl.constexpr, R_PAD: tl.constexpr):
    """``dC_slot += pre^T d_a`` in this program's partial sums."""
    offs_r = tl.arange(0, R_PAD)
    ptrs = dcore_part_ptr + slot * R_PAD * R_PAD + offs_r[:, None] * R_PAD + offs_r[None, :]
    tl.debug_barrier()  # as in _fact_outer: other threads stored these elements for the previous block
    acc = tl.load(ptrs)
    acc = tl.dot(tl.trans(pre), d_a, acc=acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    tl.store(ptrs, acc)


@triton.jit
def _fact_fwd_kernel(
    x_ptr, u_t_ptr, v_t_ptr, core_ptr, bias_ptr, out_ptr,
    n_rows, D, K, R, seed, p_drop, drop_scale, scale,
    N_BUCKET,  # the row-count class, read only by the autotuner's key
    stride_xn, stride_xd, stride_on, stride_od,
    SPLIT_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows_x = offs_n.to(tl.int64) * stride_xn
    rows_out = offs_n.to(tl.int64) * stride_on
    if SPLIT_ROWS:
        pre = _fact_down(x_ptr, rows_x, 0, stride_xd, mask_n, u_t_ptr, D, DOT_PRECISION, BLOCK_N, BLOCK_D, R_PAD)
        for j in range(K):
            t = tl.dot(pre, _fact_core(core_ptr, j, R_PAD), input_precision=DOT_PRECISION, out_dtype=tl.float32)
            a = _fact_drop(t, seed, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)
            _fact_up_store(a, v_t_ptr, bias_ptr, out_ptr, rows_out, j * D, stride_od, mask_n, D,
                           HAS_BIAS, DOT_PRECISION, BLOCK_D, R_PAD)
    else:
        a = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for j in range(K):
            pre = _fact_down(x_ptr, rows_x, j * D, stride_xd, mask_n, u_t_ptr, D,
                             DOT_PRECISION, BLOCK_N, BLOCK_D, R_PAD)
            t = tl.dot(pre, _fact_core(core_ptr, j, R_PAD), input_precision=DOT_PRECISION, out_dtype=tl.float32)
            a += _fact_drop(t, seed, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)
        _fact_up_store(a, v_t_ptr, bias_ptr, out_ptr, rows_out, 0, stride_od, mask_n, D,
                       HAS_BIAS, DOT_PRECISION, BLOCK_D, R_PAD)


@triton.jit
def _fact_bwd_kernel(
    x_ptr, dout_ptr, u_t_ptr, v_t_ptr, core_ptr, dx_ptr, du_t_part_ptr, dv_t_part_ptr, dcore_part_ptr,
    n_rows, D, K, R, seed, p_drop, drop_scale, scale,
    N_BUCKET,  # the row-count class, read only by the autotuner's key
    stride_xn, stride_xd, stride_gn, stride_gd, stride_dxn, stride_dxd,
    SPLIT_ROWS: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the launcher's grid only
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(n_rows, BLOCK_N)
    du_t_part_ptr += pid.to(tl.int64) * R_PAD * D
    dv_t_part_ptr += pid.to(tl.int64) * R_PAD * D
    dcore_part_ptr += pid.to(tl.int64) * K * R_PAD * R_PAD
    for blk in range(pid, num_blocks, num_programs):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        rows_x = offs_n.to(tl.int64) * stride_xn
        rows_g = offs_n.to(tl.int64) * stride_gn
        rows_dx = offs_n.to(tl.int64) * stride_dxn
        if SPLIT_ROWS:
            pre = _fact_down(x_ptr, rows_x, 0, stride_xd, mask_n, u_t_ptr, D, DOT_PRECISION, BLOCK_N, BLOCK_D, R_PAD)
            d_pre = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
            for j in range(K):
                core = _fact_core(core_ptr, j, R_PAD)
                dt = _fact_down(dout_ptr, rows_g, j * D, stride_gd, mask_n, v_t_ptr, D,
                                DOT_PRECISION, BLOCK_N, BLOCK_D, R_PAD)
                d_a = _fact_drop(dt, seed, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)
                d_pre = tl.dot(d_a, tl.trans(core), acc=d_pre, input_precision=DOT_PRECISION, out_dtype=tl.float32)
                if NEED_DW:
                    _fact_dcore_add(dcore_part_ptr, j, pre, d_a, DOT_PRECISION, R_PAD)
                    t = tl.dot(pre, core, input_precision=DOT_PRECISION, out_dtype=tl.float32)
                    a = _fact_drop(t, seed, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)
                    _fact_outer(a, dout_ptr, rows_g, stride_gd, dv_t_part_ptr, v_t_ptr, dx_ptr, rows_dx, stride_dxd,
                                j * D, mask_n, D, False, True, DOT_PRECISION, BLOCK_D, R_PAD)
            _fact_outer(d_pre, x_ptr, rows_x, stride_xd, du_t_part_ptr, u_t_ptr, dx_ptr, rows_dx, stride_dxd,
                        0, mask_n, D, NEED_DX, NEED_DW, DOT_PRECISION, BLOCK_D, R_PAD)
        else:
            dt = _fact_down(dout_ptr, rows_g, 0, stride_gd, mask_n, v_t_ptr, D, DOT_PRECISION, BLOCK_N, BLOCK_D, R_PAD)
            a_sum = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
            for j in range(K):
                core = _fact_core(core_ptr, j, R_PAD)
                pre = _fact_down(x_ptr, rows_x, j * D, stride_xd, mask_n, u_t_ptr, D,
                                 DOT_PRECISION, BLOCK_N, BLOCK_D, R_PAD)
                d_a = _fact_drop(dt, seed, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)
                d_pre = tl.dot(d_a, tl.trans(core), input_precision=DOT_PRECISION, out_dtype=tl.float32)
                if NEED_DW:
                    _fact_dcore_add(dcore_part_ptr, j, pre, d_a, DOT_PRECISION, R_PAD)
                    t = tl.dot(pre, core, input_precision=DOT_PRECISION, out_dtype=tl.float32)
                    a_sum += _fact_drop(t, seed, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)
                _fact_outer(d_pre, x_ptr, rows_x, stride_xd, du_t_part_ptr, u_t_ptr, dx_ptr, rows_dx, stride_dxd,
                            j * D, mask_n, D, NEED_DX, NEED_DW, DOT_PRECISION, BLOCK_D, R_PAD)
            if NEED_DW:
                _fact_outer(a_sum, dout_ptr, rows_g, stride_gd, dv_t_part_ptr, v_t_ptr, dx_ptr, rows_dx, stride_dxd,
                            0, mask_n, D, False, True, DOT_PRECISION, BLOCK_D, R_PAD)


@triton.jit
def _dropout_keep_kernel(keep_ptr, n_rows, R, seed, p_drop, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    keep = _keep(seed, offs_n, offs_r, R, p_drop)
    mask = (offs_n < n_rows)[:, None] & (offs_r < R)[None, :]
    tl.store(keep_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :], keep.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
# On CUDA the forwards tune their tiles per (feature width, R_PAD, row-count class, layout,
# dtypes): triton/_autotune.py. ROWS_BLOCKED follows from the tile the autotuner tries.
_bottleneck_fwd_autotuned = triton.autotune(
    configs=_autotune.row_tile_configs(), key=["D", "R_PAD", "N_BUCKET", "n_inner", "MIDDLE", "HAS_X2"],
    prune_configs_by={"early_config_prune": _autotune.prune_row_tiles("R_PAD", "x_ptr")},
)(triton.heuristics({"ROWS_BLOCKED": lambda a: _rows_blocked(a["n_inner"], a["BLOCK_N"])})(_bottleneck_fwd_kernel))
_fact_fwd_autotuned = triton.autotune(
    configs=_autotune.row_tile_configs(), key=["D", "K", "R_PAD", "N_BUCKET", "SPLIT_ROWS"],
    prune_configs_by={"early_config_prune": _autotune.prune_row_tiles("R_PAD", "x_ptr")},
)(_fact_fwd_kernel)


def _bottleneck_partial_bytes(args) -> int:
    """A backward program's fp32 partial-sum slices: ``dD^T``, ``dUp^T`` (R_PAD x d each), the
    bias's d, and the r-sized ones (core, diagonal, scale, down bias)."""
    r_pad, d = args["R_PAD"], args["D"]
    return 4 * ((2 * r_pad + 1) * d + r_pad * r_pad + 3 * r_pad)


def _fact_partial_bytes(args) -> int:
    """A FacT backward program's fp32 partial-sum slices: ``dU^T``, ``dV^T`` and k cores."""
    r_pad = args["R_PAD"]
    return 4 * (2 * r_pad * args["D"] + args["K"] * r_pad * r_pad)


# the persistent backwards tune their tile and programs per SM (triton/_autotune.py); FacT's
# partial sums are zeroed buffers that every block adds into, so each timed run starts from zeros
_bottleneck_bwd_autotuned = triton.autotune(
    configs=_autotune.backward_tile_configs(),
    key=["D", "R_PAD", "N_BUCKET", "n_inner", "MIDDLE", "HAS_X2", "HAS_DOWN_BIAS", "HAS_DROPOUT", "TIED", "NEED_DX",
         "NEED_DX2", "NEED_DW"],
    prune_configs_by={"early_config_prune": _autotune.prune_backward_tiles("R_PAD", "x_ptr",
                                                                           _bottleneck_partial_bytes)},
)(triton.heuristics({"ROWS_BLOCKED": lambda a: _rows_blocked(a["n_inner"], a["BLOCK_N"])})(_bottleneck_bwd_kernel))
_fact_bwd_autotuned = triton.autotune(
    configs=_autotune.backward_tile_configs(),
    key=["D", "K", "R_PAD", "N_BUCKET", "SPLIT_ROWS", "HAS_DROPOUT", "NEED_DX", "NEED_DW"],
    prune_configs_by={"early_config_prune": _autotune.prune_backward_tiles("R_PAD", "x_ptr", _fact_partial_bytes)},
    reset_to_zero=["du_t_part_ptr", "dv_t_part_ptr", "dcore_part_ptr"],
)(_fact_bwd_kernel)


def _fixed_tile(x, r_pad: int, block_n, block_d):
    """The forwards' fixed tile, or None where they autotune (``_autotune.fixed_tile``)."""
    return _autotune.fixed_tile(x, block_n, block_d, lambda: _config(x, r_pad, backward=False)[:4])


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _config(x: torch.Tensor, r_pad: int, backward: bool):
    """``(BLOCK_N, BLOCK_D, num_warps, num_stages, max_programs)`` for this call.

    On CUDA the forwards and the backwards autotune (``triton/_autotune.py``; the backward's
    tile below is the first of its space); the tiles here serve a call that fixes its tile
    sizes (or, backward, its program count). CUDA tiles follow a ptxas resource sweep at R_PAD = 64
    (ARC r = 50, LoSA r = 64; the Compacter adapter's k = d/32 at K_PAD = 32 took the same
    tiles in its own kernel, folded into these), sm_90, Triton 3.6 and 3.9
    (``python -m benchmarks.kernel_resources``);
    not yet timed on a GPU. 64 rows of 2-byte (32 of 4-byte) activations keep a block's rows
    <= 128 KiB of L2 for the forward's second pass at d = 1024. The backward holds ~6
    ``BLOCK_N x R_PAD`` fp32 tiles across its feature loops: 64 rows x 32-wide chunks use
    244-254 registers with TF32 dots and no spill; IEEE fp32 dots (fp32 activations) spill
    at 32 x 32 (40-136 bytes) but not at 32 x 16. No software pipelining in the backward
    (each stage would hold more tiles); R_PAD > 64 halves BLOCK_N. One backward program per
    SM bounds the partial buffers at ``#SM * (2 R_PAD + 1) * d`` floats (the autotuned space
    adds more programs where ``_autotune.PARTIAL_BUDGET_BYTES`` allows).
    The FacT kernels take the same tiles: at d = 768, r = 8 (R_PAD 16), bf16 with TF32 dots,
    both splits use 144-206 registers at 8 warps and 201-254 at 4 (Triton 3.9; 89-166 and
    128-188 with 3.6), and fp32 with IEEE dots at 32-row tiles 80-167 (3.6); none spills.
    Under the interpreter, small tiles make every test shape exercise several row blocks,
    feature tails and backward programs owning more than one block.
    """
    if x.device.type != "cuda":
        return 16, 32, 4, 1, 2
    two_byte = x.element_size() <= 2
    block_n = 64 if two_byte else 32
    if backward:
        block_d, num_warps, num_stages = (32 if two_byte else 16), 8, 1
    else:
        block_d, num_warps, num_stages = 64, 8, 2
    if r_pad > 64:
        block_n //= 2
    return block_n, block_d, num_warps, num_stages, gpu_properties(x.device).multi_processor_count


def _rows_blocked(n_inner: int, block_n: int) -> bool:
    return n_inner > 1 and n_inner % block_n == 0


def _geometry(x: torch.Tensor, mode: str):
    """``(n_rows, n_inner, d, (stride_outer, stride_inner, stride_feat))`` of the rows view:
    channel mode takes a 2-D ``(N, d)``, token mode a 3-D ``(B, T, C)`` mixed along T."""
    if mode == "channel":
        return x.shape[0], 1, x.shape[1], (x.stride(0), 0, x.stride(1))
    b, t, c = x.shape
    return b * c, max(c, 1), t, (x.stride(0), x.stride(2), x.stride(1))


def _padded(down, up_t, core, diag, down_bias, r_pad: int):
    """``D^T`` and ``Up^T`` as zero-padded fp32 ``(r_pad, d)`` row-major matrices, the core
    ``(r_pad, r_pad)``, the diagonal and the down bias ``(r_pad,)`` (None when absent)."""
    d, r = down.shape
    f32 = dict(dtype=torch.float32, device=down.device)
    down_t = torch.zeros((r_pad, d), **f32)
    down_t[:r] = down.t()
    up_t_p = None
    if up_t is not None:
        up_t_p = torch.zeros((r_pad, d), **f32)
        up_t_p[:r] = up_t
    core_p = None
    if core is not None:
        core_p = torch.zeros((r_pad, r_pad), **f32)
        core_p[:r, :r] = core
    vectors = []
    for v in (diag, down_bias):
        if v is not None:
            padded = torch.zeros((r_pad,), **f32)
            padded[:r] = v
            v = padded
        vectors.append(v)
    return (down_t, up_t_p, core_p, *vectors)


def _dropout_args(p_drop: float, seed: Optional[int]):
    has_dropout = p_drop > 0.0
    return has_dropout, (int(seed) if has_dropout else 0), float(p_drop), (1.0 / (1.0 - p_drop) if has_dropout else 1.0)


def bottleneck_forward(
    x, x2, down, up_t, core, diag, scale, bias, *,
    mode: str, middle: str, residual: bool, p_drop: float, seed: Optional[int], data_dtype: torch.dtype,
    down_bias: Optional[torch.Tensor] = None, block_n: Optional[int] = None, block_d: Optional[int] = None,
) -> torch.Tensor:
    """``out`` in ``x``'s dtype and shape (contiguous). ``x``/``x2``: 2-D ``(N, d)`` (channel)
    or 3-D ``(B, T, C)`` (token, mixed along T), any strides, no copy. ``down: (d, r)``;
    ``up_t: (r, d)`` or None (tied: ``D^T``); ``core (r, r)`` / ``diag (r,)`` per ``middle``;
    ``scale``: a 1-element tensor; ``bias (d,)`` or None (channel mode only); ``down_bias
    (r,)`` or None, added to ``x @ D`` before the middle."""
    n_rows, n_inner, d, strides_x = _geometry(x, mode)
    r = down.shape[1]
    r_pad = _r_pad(r)
    down_t, up_t_p, core_p, diag_p, down_bias_p = _padded(down, up_t, core, diag, down_bias, r_pad)
    up_t_p = down_t if up_t_p is None else up_t_p
    scale_t = scale.detach().reshape(1).to(torch.float32)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0 or d == 0:
        return out
    _, _, _, strides_x2 = _geometry(x if x2 is None else x2, mode)
    _, _, _, strides_out = _geometry(out, mode)
    has_dropout, seed, p_drop, drop_scale = _dropout_args(p_drop, seed)
    args = (
        x, x if x2 is None else x2, down_t, up_t_p,
        down_t if core_p is None else core_p, down_t if diag_p is None else diag_p,
        scale_t, down_t if bias is None else bias.detach().to(torch.float32).contiguous(),
        down_t if down_bias_p is None else down_bias_p, out,
        n_rows, n_inner, d, r, seed, p_drop, drop_scale, _autotune.n_bucket(n_rows),
        *strides_x, *strides_x2, *strides_out,
    )
    meta = dict(MIDDLE=MIDDLES[middle], HAS_X2=x2 is not None, HAS_RESIDUAL=residual, HAS_BIAS=bias is not None,
                HAS_DOWN_BIAS=down_bias is not None, HAS_DROPOUT=has_dropout,
                DOT_PRECISION=dot_precision(data_dtype), R_PAD=r_pad)
    fixed = _fixed_tile(x, r_pad, block_n, block_d)
    _autotune.launch_rows(_bottleneck_fwd_autotuned, _bottleneck_fwd_kernel, n_rows, args, meta, fixed,
                          **({} if fixed is None else {"ROWS_BLOCKED": _rows_blocked(n_inner, fixed[0])}))
    return out


def bottleneck_backward(
    dout, x, x2, down, up_t, core, diag, scale, *,
    mode: str, middle: str, residual: bool, p_drop: float, seed: Optional[int], data_dtype: torch.dtype,
    need_dx: bool, need_dx2: bool, need_dw: bool, down_bias: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None, block_d: Optional[int] = None, num_programs: Optional[int] = None,
):
    """``dict`` of gradients: ``dx``/``dx2`` (contiguous, ``x``'s dtype and shape; ``dx``
    includes the residual's ``dout``), and with ``need_dw`` the fp32 ``ddown (d, r)``,
    ``dup_t (r, d)`` (absent when tied: ``ddown`` holds both), ``dcore``/``ddiag``,
    ``dscale`` (0-d), ``dbias (d,)`` and ``ddown_bias (r,)`` (None without a down bias)."""
    n_rows, n_inner, d, strides_x = _geometry(x, mode)
    r = down.shape[1]
    r_pad = _r_pad(r)
    tied = up_t is None
    down_t, up_t_p, core_p, diag_p, down_bias_p = _padded(down, up_t, core, diag, down_bias, r_pad)
    up_t_p = down_t if tied else up_t_p
    scale_t = scale.detach().reshape(1).to(torch.float32)
    grads = {}
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dx2 = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx2 else None
    grads["dx"], grads["dx2"] = dx, dx2
    if n_rows == 0 or d == 0:
        if need_dw:
            zeros = functools.partial(torch.zeros, dtype=torch.float32, device=x.device)
            grads.update(ddown=zeros((d, r)), dup_t=None if tied else zeros((r, d)), dscale=zeros(()),
                         dbias=zeros((d,)), dcore=zeros((r, r)), ddiag=zeros((r,)),
                         ddown_bias=None if down_bias is None else zeros((r,)))
        return grads

    f32 = dict(dtype=torch.float32, device=x.device)

    def allocate(programs):  # one slice per program; each program's first block overwrites its slices
        ddown_t_part = torch.empty((programs, r_pad, d), **f32)
        return dict(ddown_t=ddown_t_part, dup_t=ddown_t_part if tied else torch.empty((programs, r_pad, d), **f32),
                    dcore=torch.empty((programs, r_pad, r_pad), **f32), ddiag=torch.empty((programs, r_pad), **f32),
                    dscale=torch.empty((programs, r_pad), **f32), dbias=torch.empty((programs, d), **f32),
                    ddown_bias=down_t if down_bias is None else torch.empty((programs, r_pad), **f32))

    _, _, _, strides_x2 = _geometry(x if x2 is None else x2, mode)
    _, _, _, strides_g = _geometry(dout, mode)
    like = dx if dx is not None else (dx2 if dx2 is not None else x)
    _, _, _, strides_dx = _geometry(like, mode)
    if dx is not None and dx2 is not None:
        assert dx.stride() == dx2.stride()
    has_dropout, seed, p_drop, drop_scale = _dropout_args(p_drop, seed)

    def args(parts):
        parts = parts or dict.fromkeys(("ddown_t", "dup_t", "dcore", "ddiag", "dscale", "dbias", "ddown_bias"),
                                       down_t)  # never dereferenced without weight gradients
        return (
            x, x if x2 is None else x2, dout, down_t, up_t_p,
            down_t if core_p is None else core_p, down_t if diag_p is None else diag_p, scale_t,
            down_t if down_bias_p is None else down_bias_p,
            x if dx is None else dx, x if dx2 is None else dx2,
            *parts.values(),
            n_rows, n_inner, d, r, seed, p_drop, drop_scale, _autotune.n_bucket(n_rows),
            *strides_x, *strides_x2, *strides_g, *strides_dx,
        )

    meta = dict(MIDDLE=MIDDLES[middle], HAS_X2=x2 is not None, HAS_RESIDUAL=residual,
                HAS_DOWN_BIAS=down_bias is not None, HAS_DROPOUT=has_dropout,
                TIED=tied, NEED_DX=need_dx, NEED_DX2=need_dx2, NEED_DW=need_dw,
                DOT_PRECISION=dot_precision(data_dtype), R_PAD=r_pad)
    fixed = _autotune.fixed_backward_tile(x, block_n, block_d, num_programs, lambda: _config(x, r_pad, backward=True))
    parts, programs = _autotune.launch_persistent(
        _bottleneck_bwd_autotuned, _bottleneck_bwd_kernel, x, n_rows, need_dw,
        _bottleneck_partial_bytes(dict(R_PAD=r_pad, D=d)), allocate, args, meta, fixed,
        **({} if fixed is None else {"ROWS_BLOCKED": _rows_blocked(n_inner, fixed[0])}))
    if need_dw:  # the slices of the programs that ran
        grads["ddown"] = parts["ddown_t"][:programs].sum(0)[:r].t()
        grads["dup_t"] = None if tied else parts["dup_t"][:programs].sum(0)[:r]
        grads["dcore"] = parts["dcore"][:programs].sum(0)[:r, :r] if middle == "core" else None
        grads["ddiag"] = parts["ddiag"][:programs].sum(0)[:r] if middle == "diag" else None
        grads["dscale"] = parts["dscale"][:programs].sum()
        grads["dbias"] = parts["dbias"][:programs].sum(0)
        grads["ddown_bias"] = None if down_bias is None else parts["ddown_bias"][:programs].sum(0)[:r]
    return grads


def _fact_padded(U, V, cores, r_pad: int):
    """``U^T``, ``V^T`` as zero-padded fp32 ``(r_pad, d)`` and the cores as ``(k, r_pad, r_pad)``."""
    d, r = U.shape
    f32 = dict(dtype=torch.float32, device=U.device)
    u_t, v_t = torch.zeros((r_pad, d), **f32), torch.zeros((r_pad, d), **f32)
    u_t[:r], v_t[:r] = U.detach().t(), V.detach().t()
    core_p = torch.zeros((cores.shape[0], r_pad, r_pad), **f32)
    core_p[:, :r, :r] = cores.detach()
    return u_t, v_t, core_p


@on_device
def fact_forward(
    x, weight, bias, U, V, cores, *, split: str, scale: float, p_drop: float, seed: Optional[int],
    block_n: Optional[int] = None, block_d: Optional[int] = None,
    keep_padded: bool = False,
):
    """``[x @ weight^T + bias +]`` the FacT increments of ``k = cores.shape[0]`` slots (module
    docstring), in ``x``'s dtype, ``(N, k d)`` for ``split="rows"`` and ``(N, d)`` for
    ``"cols"``. ``x: (N, d | k d)`` of any strides. The kernel writes the increments and the
    bias into the output first; cuBLAS then adds the frozen GEMM through its ``beta = 1``
    epilogue (as ``triton/kron.py``), so the memory-bound kernel never re-reads ``out``. With
    ``keep_padded`` returns ``(out, padded factors)`` for :func:`fact_backward` to reuse (six
    launches fewer there)."""
    n = x.shape[0]
    d, r = U.shape
    k = cores.shape[0]
    out = torch.empty((n, k * d if split == "rows" else d), dtype=x.dtype, device=x.device)
    r_pad = _r_pad(r)
    padded = _fact_padded(U, V, cores, r_pad) if n > 0 or keep_padded else None
    if n > 0:
        u_t, v_t, core_p = padded
        has_dropout, seed, p_drop, drop_scale = _dropout_args(p_drop, seed)
        args = (
            x, u_t, v_t, core_p, u_t if bias is None else bias.detach().to(torch.float32).contiguous(), out,
            n, d, k, r, seed, p_drop, drop_scale, float(scale), _autotune.n_bucket(n),
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        )
        meta = dict(SPLIT_ROWS=split == "rows", HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout,
                    DOT_PRECISION=dot_precision(x.dtype), R_PAD=r_pad)
        _autotune.launch_rows(_fact_fwd_autotuned, _fact_fwd_kernel, n, args, meta,
                              _fixed_tile(x, r_pad, block_n, block_d))
    if weight is not None:
        out.addmm_(x, weight.t())
    return (out, padded) if keep_padded else out


@on_device
def fact_backward(
    dout, x, weight, U, V, cores, *, split: str, scale: float, p_drop: float, seed: Optional[int],
    need_dx: bool, need_dw: bool,
    block_n: Optional[int] = None, block_d: Optional[int] = None, num_programs: Optional[int] = None,
    padded=None,
):
    """``dict``: ``dx`` (contiguous, ``x``'s dtype, including ``dout @ weight``, added by
    cuBLAS onto the kernel's output) when ``need_dx``; with ``need_dw`` the fp32 ``dU``,
    ``dV (d, r)`` and ``dcores (k, r, r)``. ``dout`` may have any strides (also 0); ``padded``:
    the forward's padded factors (``fact_forward(keep_padded=True)``), else made again."""
    n = x.shape[0]
    d, r = U.shape
    k = cores.shape[0]
    r_pad = _r_pad(r)
    grads = {"dx": torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None}
    f32 = dict(dtype=torch.float32, device=x.device)
    if n == 0:
        if need_dw:
            grads.update(dU=torch.zeros((d, r), **f32), dV=torch.zeros((d, r), **f32),
                         dcores=torch.zeros((k, r, r), **f32))
        return grads
    u_t, v_t, core_p = padded if padded is not None else _fact_padded(U, V, cores, r_pad)

    def allocate(programs):  # zeroed: every program adds into its slices
        return (torch.zeros((programs, r_pad, d), **f32), torch.zeros((programs, r_pad, d), **f32),
                torch.zeros((programs, k, r_pad, r_pad), **f32))

    dx = grads["dx"]
    dx_arg = x if dx is None else dx
    has_dropout, seed, p_drop, drop_scale = _dropout_args(p_drop, seed)
    # without weight gradients the partial-sum arguments are never dereferenced; under autotuning
    # they are zeroed before each timed run, so they must not alias a real input
    unused = None if need_dw else torch.empty((1,), **f32)

    def args(parts):
        return (
            x, dout, u_t, v_t, core_p, dx_arg, *(parts or (unused,) * 3),
            n, d, k, r, seed, p_drop, drop_scale, float(scale), _autotune.n_bucket(n),
            x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx_arg.stride(0), dx_arg.stride(1),
        )

    meta = dict(SPLIT_ROWS=split == "rows", HAS_DROPOUT=has_dropout, NEED_DX=need_dx, NEED_DW=need_dw,
                DOT_PRECISION=dot_precision(x.dtype), R_PAD=r_pad)
    fixed = _autotune.fixed_backward_tile(x, block_n, block_d, num_programs, lambda: _config(x, r_pad, backward=True))
    parts, programs = _autotune.launch_persistent(
        _fact_bwd_autotuned, _fact_bwd_kernel, x, n, need_dw, _fact_partial_bytes(dict(R_PAD=r_pad, D=d, K=k)),
        allocate, args, meta, fixed)
    if dx is not None and weight is not None:
        dx.addmm_(dout, weight)
    if need_dw:  # the slices of the programs that ran
        du_t_part, dv_t_part, dcore_part = (part[:programs] for part in parts)
        grads["dU"] = du_t_part.sum(0)[:r].t()
        grads["dV"] = dv_t_part.sum(0)[:r].t()
        grads["dcores"] = dcore_part.sum(0)[:, :r, :r]
    return grads


def dropout_keep_mask(n_rows: int, r: int, p_drop: float, seed: int, device) -> torch.Tensor:
    """The ``(n_rows, r)`` bool keep mask the kernels draw for ``(seed, p_drop)``."""
    keep = torch.empty((n_rows, r), dtype=torch.int8, device=device)
    if n_rows and r:
        block_n = 64
        _dropout_keep_kernel[(triton.cdiv(n_rows, block_n),)](
            keep, n_rows, r, int(seed), float(p_drop), BLOCK_N=block_n, R_PAD=_r_pad(r)
        )
    return keep.bool()
