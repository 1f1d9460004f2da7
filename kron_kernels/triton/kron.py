"""Triton kernels for the Kronecker increment (DESIGN.md 4.1) and their launchers.

Layout: the launchers flatten the factors over the ``MR = m*r`` rank-one terms,
``j = i*r + t``: ``Abar[a, o, j] = A[i, o, a]`` (a_in, a_out, MR), ``Uf[p, j] = U[i, p, t]``
(p, MR), ``Vf[q, j] = V[i, q, t]`` (q, MR), fp32 (tiny copies of the factors). A token row ``x`` is the
block matrix ``X (a_in, q)``; with ``T = X Vf`` and ``S[o, j] = sum_a Abar[a, o, j] T[a, j]``
the increment's output is ``Y = scale * S Uf^T`` viewed as ``(a_out, p)``.

* ``_kron_fwd_kernel``: one program per BLOCK_N tokens. It loads the tokens once as a
  ``(BLOCK_N*a_in, q)`` matrix, forms ``T`` with one ``tl.dot`` per chunk of BLOCK_J rank
  terms, then walks the a_out output blocks: ``S[:, o, :]`` is a broadcast-reduce over a_in,
  ``Y[:, o, :] = S Uf^T`` a small dot, stored (or added onto a base GEMM's output).
  T and S never leave the chip; the d_out x d_in increment is never formed.
* ``_kron_bwd_kernel``: a persistent grid (each program owns a strided set of token blocks)
  computes, from ``x`` and ``dy`` through the same structure, ``dx`` and the gradients of
  Abar/Uf/Vf; each program writes its own fp32 partial sums, which the launcher adds
  (deterministic: no atomics).
* ``_kron_delta_kernel``: the materialised increment, one output tile per program.

``tl.dot`` needs K >= 16 on NVIDIA GPUs (Triton 3.6; newer Tritons accept 8 for fp32, so
only a compile with 3.6 catches a violation: ``tests/test_gpu_targets.py`` does), and small M,
N waste the tensor cores, so q, p and the rank chunk are padded to at least 16, the token
rows of the backward's ``X^T R`` to ``BLOCK_N * A_IN_P >= 16``, and the backward's reduction
over a block of fewer than 16 tokens is a broadcast-reduce (padding is masked on load, so it
contributes exact zeros). Token offsets are int64.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import dot_precision, gpu_properties, on_device

__all__ = ["kron_linear_forward", "kron_linear_backward", "kron_delta_forward"]


@triton.jit
def _load_tokens(x_ptr, offs_n, mask_n, stride_xn, stride_xk, A_IN: tl.constexpr, Q: tl.constexpr,
                 A_IN_P: tl.constexpr, Q_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens as a (BLOCK_N*A_IN_P, Q_P) fp32 matrix: row (n, a), column qq = x[n, a*Q + qq]."""
    offs_a = tl.arange(0, A_IN_P)
    offs_q = tl.arange(0, Q_P)
    cols = offs_a[:, None] * Q + offs_q[None, :]
    mask_aq = (offs_a[:, None] < A_IN) & (offs_q[None, :] < Q)
    ptrs = x_ptr + offs_n[:, None, None] * stride_xn + cols[None, :, :] * stride_xk
    x = tl.load(ptrs, mask=mask_n[:, None, None] & mask_aq[None, :, :], other=0.0).to(tl.float32)
    return tl.reshape(x, (BLOCK_N * A_IN_P, Q_P))


@triton.jit
def _kron_fwd_kernel(
    x_ptr, y_ptr, bias_ptr, abar_ptr, uf_ptr, vf_ptr,
    n_rows, stride_xn, stride_xk, stride_yn, stride_yk, scale,
    A_IN: tl.constexpr, A_OUT: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, MR: tl.constexpr,
    A_IN_P: tl.constexpr, P_P: tl.constexpr, Q_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < n_rows
    offs_a = tl.arange(0, A_IN_P)
    offs_p = tl.arange(0, P_P)
    offs_q = tl.arange(0, Q_P)
    mask_a = offs_a < A_IN
    mask_y = mask_n[:, None] & (offs_p[None, :] < P)

    x2 = _load_tokens(x_ptr, offs_n, mask_n, stride_xn, stride_xk, A_IN, Q, A_IN_P, Q_P, BLOCK_N)
    for j0 in range(0, MR, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < MR
        vf = tl.load(vf_ptr + offs_q[:, None] * MR + offs_j[None, :],
                     mask=(offs_q[:, None] < Q) & mask_j[None, :], other=0.0)
        t3 = tl.reshape(tl.dot(x2, vf, input_precision=DOT_PRECISION), (BLOCK_N, A_IN_P, BLOCK_J))
        # Uf^T chunk with the scale folded in: (BLOCK_J, P_P)
        uf_t = tl.load(uf_ptr + offs_p[None, :] * MR + offs_j[:, None],
                       mask=mask_j[:, None] & (offs_p[None, :] < P), other=0.0) * scale
        # the first rank chunk writes (with the bias), later chunks add
        mask_prev = mask_y & (j0 > 0)
        for o in range(A_OUT):
            abar = tl.load(abar_ptr + offs_a[:, None] * (A_OUT * MR) + o * MR + offs_j[None, :],
                           mask=mask_a[:, None] & mask_j[None, :], other=0.0)
            s = tl.sum(t3 * abar[None, :, :], axis=1)
            y = tl.dot(s, uf_t, input_precision=DOT_PRECISION)
            y_ptrs = y_ptr + offs_n[:, None] * stride_yn + (o * P + offs_p[None, :]) * stride_yk
            y += tl.load(y_ptrs, mask=mask_prev, other=0.0).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + o * P + offs_p, mask=(offs_p < P) & (j0 == 0), other=0.0)
                y += bias.to(tl.float32)[None, :]
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_y)


@triton.jit
def _kron_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, abar_ptr, uf_ptr, vf_ptr,
    dabar_part_ptr, duf_part_ptr, dvf_part_ptr,
    n_rows, stride_xn, stride_xk, stride_dyn, stride_dyk, stride_dxn, stride_dxk, scale,
    A_IN: tl.constexpr, A_OUT: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, MR: tl.constexpr,
    A_IN_P: tl.constexpr, P_P: tl.constexpr, Q_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    NEED_DX: tl.constexpr, ACCUMULATE_DX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per token block, with P = scale * dY Uf and R[a, j] = sum_o Abar[a, o, j] P[o, j]:
    dAbar^T[j, o, a] += P[o, j] T[a, j]; dUf += scale * dY^T S; dVf += X^T R; dx = R Vf^T."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rows, BLOCK_N)
    offs_a = tl.arange(0, A_IN_P)
    offs_p = tl.arange(0, P_P)
    offs_q = tl.arange(0, Q_P)
    mask_a = offs_a < A_IN
    mask_p = offs_p < P
    mask_q = offs_q < Q
    dabar_part_ptr += pid.to(tl.int64) * (MR * A_OUT * A_IN)
    duf_part_ptr += pid.to(tl.int64) * (P * MR)
    dvf_part_ptr += pid.to(tl.int64) * (Q * MR)

    for j0 in range(0, MR, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < MR
        vf = tl.load(vf_ptr + offs_q[:, None] * MR + offs_j[None, :],
                     mask=mask_q[:, None] & mask_j[None, :], other=0.0)
        uf = tl.load(uf_ptr + offs_p[:, None] * MR + offs_j[None, :],
                     mask=mask_p[:, None] & mask_j[None, :], other=0.0)
        duf_acc = tl.zeros((P_P, BLOCK_J), dtype=tl.float32)
        dvf_acc = tl.zeros((Q_P, BLOCK_J), dtype=tl.float32)
        for blk in range(pid, n_blocks, n_progs):
            offs_n = (blk * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < n_rows
            x2 = _load_tokens(x_ptr, offs_n, mask_n, stride_xn, stride_xk, A_IN, Q, A_IN_P, Q_P, BLOCK_N)
            t3 = tl.reshape(tl.dot(x2, vf, input_precision=DOT_PRECISION), (BLOCK_N, A_IN_P, BLOCK_J))
            r3 = tl.zeros((BLOCK_N, A_IN_P, BLOCK_J), dtype=tl.float32)
            for o in range(A_OUT):
                dy = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + (o * P + offs_p[None, :]) * stride_dyk,
                             mask=mask_n[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
                p_o = tl.dot(dy, uf, input_precision=DOT_PRECISION) * scale
                abar = tl.load(abar_ptr + offs_a[:, None] * (A_OUT * MR) + o * MR + offs_j[None, :],
                               mask=mask_a[:, None] & mask_j[None, :], other=0.0)
                s = tl.sum(t3 * abar[None, :, :], axis=1)
                if BLOCK_N >= 16:
                    duf_acc += tl.dot(tl.trans(dy), s, input_precision=DOT_PRECISION)
                else:
                    # a dot over the BLOCK_N tokens needs K >= 16 (Triton 3.6, every NVIDIA
                    # target); at BLOCK_N = 8 the (BLOCK_N, P_P, BLOCK_J) product is 16
                    # registers a thread at 8 warps: a broadcast-reduce costs less than padding
                    duf_acc += tl.sum(dy[:, :, None] * s[:, None, :], axis=0)
                r3 += abar[None, :, :] * p_o[:, None, :]
                # this program's partial dAbar^T[j, o, :] (zeroed by the launcher): too large
                # to stay in registers across the a_out loop, it accumulates in L2
                da = tl.sum(t3 * p_o[:, None, :], axis=0)
                da_ptrs = dabar_part_ptr + offs_j[None, :] * (A_OUT * A_IN) + o * A_IN + offs_a[:, None]
                mask_da = mask_a[:, None] & mask_j[None, :]
                da += tl.load(da_ptrs, mask=mask_da, other=0.0)
                tl.store(da_ptrs, da, mask=mask_da)
            r2 = tl.reshape(r3, (BLOCK_N * A_IN_P, BLOCK_J))
            # reload the (cache-hot) tokens rather than keep them live across the a_out loop:
            # that frees BLOCK_N*a_in*q registers, the difference between spilling and not
            x2 = _load_tokens(x_ptr, offs_n, mask_n, stride_xn, stride_xk, A_IN, Q, A_IN_P, Q_P, BLOCK_N)
            dvf_acc += tl.dot(tl.trans(x2), r2, input_precision=DOT_PRECISION)
            if NEED_DX:
                dx = tl.reshape(tl.dot(r2, tl.trans(vf), input_precision=DOT_PRECISION), (BLOCK_N, A_IN_P, Q_P))
                cols = offs_a[:, None] * Q + offs_q[None, :]
                mask_dx = mask_n[:, None, None] & (mask_a[:, None] & mask_q[None, :])[None, :, :]
                dx_ptrs = dx_ptr + offs_n[:, None, None] * stride_dxn + cols[None, :, :] * stride_dxk
                # the first rank chunk of the first target writes, everything after adds
                if ACCUMULATE_DX:
                    mask_prev = mask_dx
                else:
                    mask_prev = mask_dx & (j0 > 0)
                dx += tl.load(dx_ptrs, mask=mask_prev, other=0.0).to(tl.float32)
                tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask_dx)
        tl.store(duf_part_ptr + offs_p[:, None] * MR + offs_j[None, :], duf_acc * scale,
                 mask=mask_p[:, None] & mask_j[None, :])
        tl.store(dvf_part_ptr + offs_q[:, None] * MR + offs_j[None, :], dvf_acc,
                 mask=mask_q[:, None] & mask_j[None, :])


@triton.jit
def _kron_delta_kernel(
    a_ptr, u_ptr, v_ptr, out_ptr, scale,
    M: tl.constexpr, A_OUT: tl.constexpr, A_IN: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """delta[(o, pp), (a, qq)] = scale * sum_i A[i, o, a] * sum_k U[i, pp, k] V[i, qq, k]."""
    offs_row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_row = offs_row < A_OUT * P
    mask_col = offs_col < A_IN * Q
    o, pp = offs_row // P, offs_row % P
    a, qq = offs_col // Q, offs_col % Q
    mask = mask_row[:, None] & mask_col[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for i in range(M):
        b = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k in range(R):
            u = tl.load(u_ptr + (i * P + pp) * R + k, mask=mask_row, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + (i * Q + qq) * R + k, mask=mask_col, other=0.0).to(tl.float32)
            b += u[:, None] * v[None, :]
        a_ik = tl.load(a_ptr + (i * A_OUT + o[:, None]) * A_IN + a[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += a_ik * b
    out_ptrs = out_ptr + offs_row[:, None].to(tl.int64) * (A_IN * Q) + offs_col[None, :]
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
def _flatten(A, U, V):
    """``(Abar, Uf, Vf)`` of the module docstring, contiguous fp32."""
    m, r = A.shape[0], U.shape[2]
    Abar = A.float().permute(2, 1, 0).repeat_interleave(r, dim=2).contiguous()
    Uf = U.float().permute(1, 0, 2).reshape(U.shape[1], m * r).contiguous()
    Vf = V.float().permute(1, 0, 2).reshape(V.shape[1], m * r).contiguous()
    return Abar, Uf, Vf


def _unflatten_grads(dAbar_t, dUf, dVf, m, r):
    """Gradients of ``(Abar^T (MR, a_out, a_in), Uf, Vf)`` mapped back to ``(A, U, V)``."""
    _, a_out, a_in = dAbar_t.shape
    dA = dAbar_t.view(m, r, a_out, a_in).sum(1)
    dU = dUf.view(dUf.shape[0], m, r).permute(1, 0, 2)
    dV = dVf.view(dVf.shape[0], m, r).permute(1, 0, 2)
    return dA, dU, dV


def _pad(n: int) -> int:
    """Power of two >= n and >= 16 (tl.arange needs powers of two, tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(n))


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * gpu_properties(device).multi_processor_count
    return 8  # the interpreter: few programs keep CPU tests fast


# Tokens per program. Resource use at ViT-B (a = 32, p = q = 24, bf16, 8 warps), read off ptxas
# with `python -m benchmarks.kernel_resources --arch 75|90` (Triton 3.8; 3.6 within ~20%):
#   forward, BLOCK_N = 16, BLOCK_J = 32: sm_90 154 registers, no spill, 14 KB (r = 1) / 80 KB
#     (r = 4) of Triton's shared memory; with 16 tokens it needs more than a T4's 64 KB per block,
#     so devices with less than _FWD_BLOCK_N_16_SMEM per block take BLOCK_N = 8: sm_75 100-114
#     registers in 36-40 KB;
#   backward (three (BLOCK_N, a_in, BLOCK_J) tiles live at once), BLOCK_J = 16: BLOCK_N = 16
#     spilled and needed 74-100 KB of shared memory; BLOCK_N = 8 uses 167-173 registers (sm_90) /
#     236 (sm_75) with no spill, in 42 / 52 KB, which every target has. Its reduction over the 8
#     tokens of a block is a broadcast-reduce (tl.dot needs K >= 16); the (BLOCK_N * a_in, q)
#     token tile still gives the other dots 256 rows.
# tests/test_gpu_targets.py compiles every configuration and checks it fits the shared memory.
_BWD_BLOCK_N = 8
_FWD_BLOCK_N_16_SMEM = 96 * 1024


def _fwd_block_n(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # the interpreter
    return 16 if gpu_properties(device).shared_memory_per_block_optin >= _FWD_BLOCK_N_16_SMEM else 8


def _meta(x2, Abar, Uf, Vf, max_block_j, block_n):
    """Compile-time sizes (``block_n``: see ``_BWD_BLOCK_N``)."""
    a_in, a_out, mr = Abar.shape
    p, q = Uf.shape[0], Vf.shape[0]
    return dict(
        A_IN=a_in, A_OUT=a_out, P=p, Q=q, MR=mr,
        # X^T R in the backward reduces over the BLOCK_N * A_IN_P token rows: >= 16 for tl.dot
        A_IN_P=max(triton.next_power_of_2(a_in), triton.cdiv(16, block_n)), P_P=_pad(p), Q_P=_pad(q),
        BLOCK_N=block_n, BLOCK_J=min(_pad(mr), max_block_j),
        # fp32 activations keep fp32 products; bf16 takes TF32, fp16 3xTF32 (dot_precision)
        DOT_PRECISION=dot_precision(x2.dtype),
    )


def _buffer_dtype(x2, metas):
    """With several rank chunks every chunk adds onto the output; in a 16-bit buffer each
    addition would round again, so then the kernels accumulate in fp32."""
    chunked = any(triton.cdiv(meta["MR"], meta["BLOCK_J"]) > 1 for meta in metas)
    return torch.float32 if chunked else x2.dtype


def _launch_setup(x2, targets, max_block_j, block_n):
    """Per target: (start, rows, flattened factors, compile-time sizes)."""
    setup = []
    for start, A, U, V in targets:
        Abar, Uf, Vf = _flatten(A, U, V)
        meta = _meta(x2, Abar, Uf, Vf, max_block_j, block_n)
        setup.append((start, A.shape[1] * U.shape[1], (Abar, Uf, Vf), meta))
    return setup


@on_device
def kron_linear_forward(x2, weight, bias, targets, d_out, scale):
    """``x2 @ weight.T + bias`` plus each target's ``scale * kron-term`` on its output rows.
    ``x2`` and ``weight`` may have any strides; ``bias`` is indexed as contiguous (the op
    hands it over so: ``ops._common.as_kernel_operand``).

    The kron kernels write their terms (and the bias) first, straight into their row slices;
    rows no target covers start as the bias (or zero). The frozen GEMM then adds onto all of it
    through cuBLAS's ``beta = 1`` epilogue: the GEMM is compute-bound, so reading its C operand
    is nearly free, whereas adding the terms onto a finished GEMM output would cost the
    memory-bound kernels an extra read and write of y."""
    n = x2.shape[0]
    setup = _launch_setup(x2, targets, max_block_j=32, block_n=_fwd_block_n(x2.device))
    y = torch.empty((n, d_out), device=x2.device, dtype=_buffer_dtype(x2, [meta for *_, meta in setup]))
    covered = sorted((start, start + rows) for start, rows, _, _ in setup)
    gaps = [(a, b) for a, b in zip([0] + [e for _, e in covered], [s for s, _ in covered] + [d_out]) if b > a]
    for g0, g1 in gaps:
        if bias is not None:
            y[:, g0:g1] = bias[g0:g1]
        else:
            y[:, g0:g1] = 0
    if n > 0:
        for start, rows, (Abar, Uf, Vf), meta in setup:
            y_rows = y[:, start:start + rows]
            bias_rows = bias[start:start + rows] if bias is not None else y_rows
            _kron_fwd_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
                x2, y_rows, bias_rows, Abar, Uf, Vf,
                n, x2.stride(0), x2.stride(1), y_rows.stride(0), y_rows.stride(1), scale,
                HAS_BIAS=bias is not None, num_warps=8 if x2.is_cuda else 1, **meta,
            )
    y = y.to(x2.dtype)
    if weight is not None:
        y.addmm_(x2, weight.t())
    return y


@on_device
def kron_linear_backward(dy2, x2, weight, targets, scale, need_dx):
    """``(dx, [(dA, dU, dV) per target])`` with fp32 factor gradients; ``dx`` includes
    ``dy @ weight``, added by cuBLAS onto the kron kernels' output, as in the forward."""
    n = x2.shape[0]
    setup = _launch_setup(x2, targets, max_block_j=16, block_n=_BWD_BLOCK_N)
    dx = None
    if need_dx:
        dtype = _buffer_dtype(x2, [meta for *_, meta in setup])
        dx = torch.empty((n, x2.shape[1]), device=x2.device, dtype=dtype)
        if n == 0:
            dx = dx.to(x2.dtype)
    grads = []
    for k, (start, rows, (Abar, Uf, Vf), meta) in enumerate(setup):
        m, r = targets[k][1].shape[0], targets[k][2].shape[2]
        mr, a_out, a_in = meta["MR"], meta["A_OUT"], meta["A_IN"]
        p, q = meta["P"], meta["Q"]
        if n == 0:
            zeros = functools.partial(torch.zeros, device=x2.device, dtype=torch.float32)
            grads.append(_unflatten_grads(zeros((mr, a_out, a_in)), zeros((p, mr)), zeros((q, mr)), m, r))
            continue
        programs = min(triton.cdiv(n, meta["BLOCK_N"]), _max_programs(x2.device))
        dabar_part = torch.zeros((programs, mr, a_out, a_in), device=x2.device, dtype=torch.float32)
        duf_part = torch.empty((programs, p, mr), device=x2.device, dtype=torch.float32)
        dvf_part = torch.empty((programs, q, mr), device=x2.device, dtype=torch.float32)
        dy_rows = dy2[:, start:start + rows]
        dx_arg = dx if dx is not None else x2
        _kron_bwd_kernel[(programs,)](
            x2, dy_rows, dx_arg, Abar, Uf, Vf, dabar_part, duf_part, dvf_part,
            n, x2.stride(0), x2.stride(1), dy_rows.stride(0), dy_rows.stride(1),
            dx_arg.stride(0), dx_arg.stride(1), scale,
            NEED_DX=need_dx, ACCUMULATE_DX=k > 0, num_warps=8 if x2.is_cuda else 1, **meta,
        )
        grads.append(_unflatten_grads(dabar_part.sum(0), duf_part.sum(0), dvf_part.sum(0), m, r))
    if dx is not None and n > 0:
        dx = dx.to(x2.dtype)
        if weight is not None:
            dx.addmm_(dy2, weight)
    elif dx is not None and weight is not None:
        dx = dy2 @ weight
    return dx, grads


@on_device
def kron_delta_forward(A, U, V, scale, out_dtype=None):
    """The materialised ``(a_out*p, a_in*q)`` increment, in ``out_dtype`` (default A's: the
    kernel's store converts). ``A``, ``U``, ``V`` are indexed as contiguous: the op hands them
    over so (``ops._common.as_kernel_operand``)."""
    m, a_out, a_in = A.shape
    p, r = U.shape[1], U.shape[2]
    q = V.shape[1]
    out = torch.empty((a_out * p, a_in * q), device=A.device, dtype=out_dtype or A.dtype)
    block_r, block_c = 32, 64
    grid = (triton.cdiv(a_out * p, block_r), triton.cdiv(a_in * q, block_c))
    _kron_delta_kernel[grid](
        A, U, V, out, scale, M=m, A_OUT=a_out, A_IN=a_in, P=p, Q=q, R=r,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if A.is_cuda else 1,
    )
    return out
