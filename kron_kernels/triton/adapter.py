"""Triton kernels for the fused bottleneck adapter ``h + GELU(h W_d^T + b_d) W_u^T + b_u``.

Forward: one program per ``BLOCK_N`` tokens. It streams ``h`` over ``d`` in ``BLOCK_D``
chunks twice -- first to accumulate ``z = h W_d^T`` (``BLOCK_N x K_PAD`` in registers), then
to write ``out = h + GELU(z + b_d) W_u^T + b_u`` -- so the k-dim intermediate never leaves
the chip and HBM sees one read of ``h`` and one write of ``out`` (the second read of a
block's rows is served by L2).

Backward: with ``g = GELU(z)``, ``dz = (dout W_u) * GELU'(z)``:

    dh = dout + dz W_d        dW_u = dout^T g     db_u = sum_rows dout
                              dW_d = dz^T h       db_d = sum_rows dz

A fixed number ``G`` of programs walks the token blocks (block ``pid``, ``pid + G``, ...).
Each block recomputes ``z`` and ``dout W_u`` in one pass over ``d`` (cheaper than storing
``z``: it rides on loads of ``h``/``dout`` the backward needs anyway) and then, in a second
pass, writes ``dh`` and adds its contribution to the weight gradients in the program's own
fp32 slice of ``(G, ...)`` partial-sum buffers. The launcher sums the ``G`` slices with
torch: deterministic, no atomics, and the partials stay small (``G * d * (2k + 1)`` floats).

``tl.dot`` needs every dimension >= 16, so ``k`` is padded to ``K_PAD = max(16,
next_pow2(k))`` with masked loads: padded columns of ``z`` are 0, ``GELU(0) = 0`` and the
padded rows of ``W_u^T`` load as 0, so they contribute nothing; rows past ``N`` load ``h``
and ``dout`` as 0, which zeroes their share of every weight gradient (``dz`` rows are
``(0 @ W_u) * ...`` = 0) without an explicit mask.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["bottleneck_adapter_forward", "bottleneck_adapter_backward"]

_SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


@triton.jit
def _gelu_and_grad(z):
    """Exact GELU ``z * Phi(z)`` and its derivative ``Phi(z) + z * phi(z)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z * cdf, cdf + z * pdf


@triton.jit
def _bottleneck_adapter_fwd_kernel(
    h_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, out_ptr,
    N, D, K,
    stride_hn, stride_hd, stride_on,
    HAS_B_DOWN: tl.constexpr, HAS_B_UP: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # int64 row offsets: N * stride can exceed 2^31 elements at real batch sizes
    rows_h = offs_n.to(tl.int64) * stride_hn
    rows_out = offs_n.to(tl.int64) * stride_on
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K

    z = tl.zeros((BLOCK_N, K_PAD), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h_tile = tl.load(
            h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        ).to(ACC_DTYPE)
        w_down_t = tl.load(  # (BLOCK_D, K_PAD) view of W_d^T
            w_down_ptr + offs_k[None, :] * D + offs_d[:, None],
            mask=mask_d[:, None] & mask_k[None, :], other=0.0,
        )
        z = tl.dot(h_tile, w_down_t, acc=z, input_precision=DOT_PRECISION)
    if HAS_B_DOWN:
        z += tl.load(b_down_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
    g, _ = _gelu_and_grad(z)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_nd = mask_n[:, None] & mask_d[None, :]
        h_tile = tl.load(
            h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd, mask=mask_nd, other=0.0
        ).to(ACC_DTYPE)
        w_up_t = tl.load(  # (K_PAD, BLOCK_D) view of W_u^T
            w_up_ptr + offs_d[None, :] * K + offs_k[:, None],
            mask=mask_k[:, None] & mask_d[None, :], other=0.0,
        )
        out = h_tile + tl.dot(g, w_up_t, input_precision=DOT_PRECISION)
        if HAS_B_UP:
            out += tl.load(b_up_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
        tl.store(out_ptr + rows_out[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def _bottleneck_adapter_bwd_kernel(
    h_ptr, dout_ptr, w_down_ptr, b_down_ptr, w_up_ptr,
    dh_ptr, dw_down_part_ptr, db_down_part_ptr, dw_up_part_ptr, db_up_part_ptr,
    N, D, K,
    stride_hn, stride_hd, stride_gn, stride_gd, stride_dhn,
    HAS_B_DOWN: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    # this program's slice of the partial-sum buffers
    dw_down_part_ptr += pid.to(tl.int64) * K * D
    dw_up_part_ptr += pid.to(tl.int64) * D * K
    db_up_part_ptr += pid.to(tl.int64) * D
    if HAS_B_DOWN:
        b_down = tl.load(b_down_ptr + offs_k, mask=mask_k, other=0.0)
    db_down_acc = tl.zeros((K_PAD,), dtype=ACC_DTYPE)

    for blk in range(pid, num_blocks, num_programs):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows_h = offs_n.to(tl.int64) * stride_hn
        rows_g = offs_n.to(tl.int64) * stride_gn
        rows_dh = offs_n.to(tl.int64) * stride_dhn

        # pass 1: z = h W_d^T and dg = dout W_u, both reductions over d
        z = tl.zeros((BLOCK_N, K_PAD), dtype=ACC_DTYPE)
        dg = tl.zeros((BLOCK_N, K_PAD), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_nd = mask_n[:, None] & mask_d[None, :]
            mask_dk = mask_d[:, None] & mask_k[None, :]
            h_tile = tl.load(
                h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd, mask=mask_nd, other=0.0
            ).to(ACC_DTYPE)
            dout_tile = tl.load(
                dout_ptr + rows_g[:, None] + offs_d[None, :].to(tl.int64) * stride_gd, mask=mask_nd, other=0.0
            ).to(ACC_DTYPE)
            w_down_t = tl.load(w_down_ptr + offs_k[None, :] * D + offs_d[:, None], mask=mask_dk, other=0.0)
            w_up = tl.load(w_up_ptr + offs_d[:, None] * K + offs_k[None, :], mask=mask_dk, other=0.0)
            z = tl.dot(h_tile, w_down_t, acc=z, input_precision=DOT_PRECISION)
            dg = tl.dot(dout_tile, w_up, acc=dg, input_precision=DOT_PRECISION)
        if HAS_B_DOWN:
            z += b_down[None, :]
        g, gelu_grad = _gelu_and_grad(z)
        dz = dg * gelu_grad
        if NEED_DW:
            db_down_acc += tl.sum(dz, axis=0)

        # pass 2: dh = dout + dz W_d, and this block's share of dW_u, dW_d, db_u.
        # The program's first block overwrites its (uninitialised) partial slice: the
        # masked-off load returns 0 there, so every element of the slice gets written.
        accumulate = blk != pid
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_nd = mask_n[:, None] & mask_d[None, :]
            mask_kd = mask_k[:, None] & mask_d[None, :]
            dout_tile = tl.load(
                dout_ptr + rows_g[:, None] + offs_d[None, :].to(tl.int64) * stride_gd, mask=mask_nd, other=0.0
            ).to(ACC_DTYPE)
            if NEED_DH:
                w_down = tl.load(w_down_ptr + offs_k[:, None] * D + offs_d[None, :], mask=mask_kd, other=0.0)
                dh = dout_tile + tl.dot(dz, w_down, input_precision=DOT_PRECISION)
                tl.store(dh_ptr + rows_dh[:, None] + offs_d[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask_nd)
            if NEED_DW:
                h_tile = tl.load(
                    h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd, mask=mask_nd, other=0.0
                ).to(ACC_DTYPE)
                dw_up_ptrs = dw_up_part_ptr + offs_d[:, None] * K + offs_k[None, :]  # (BLOCK_D, K_PAD)
                mask_dk = mask_d[:, None] & mask_k[None, :]
                dw_up = tl.load(dw_up_ptrs, mask=mask_dk & accumulate, other=0.0)
                dw_up = tl.dot(tl.trans(dout_tile), g, acc=dw_up, input_precision=DOT_PRECISION)
                tl.store(dw_up_ptrs, dw_up, mask=mask_dk)
                dw_down_ptrs = dw_down_part_ptr + offs_k[:, None] * D + offs_d[None, :]  # (K_PAD, BLOCK_D)
                dw_down = tl.load(dw_down_ptrs, mask=mask_kd & accumulate, other=0.0)
                dw_down = tl.dot(tl.trans(dz), h_tile, acc=dw_down, input_precision=DOT_PRECISION)
                tl.store(dw_down_ptrs, dw_down, mask=mask_kd)
                db_up = tl.load(db_up_part_ptr + offs_d, mask=mask_d & accumulate, other=0.0)
                tl.store(db_up_part_ptr + offs_d, db_up + tl.sum(dout_tile, axis=0), mask=mask_d)

    if NEED_DW:
        tl.store(db_down_part_ptr + pid * K + offs_k, db_down_acc, mask=mask_k)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(h2: torch.Tensor, k: int):
    """``(BLOCK_N, BLOCK_D, K_PAD, max_programs)`` for this call.

    On CUDA the second pass re-reads a program's ``BLOCK_N x d`` rows from L2, so BLOCK_N is
    chosen to keep that footprint <= 128 KiB at d = 1024 (64 rows of 2-byte, 32 rows of
    4-byte activations), halved again for k > 64 where the ``BLOCK_N x K_PAD`` accumulators
    would spill. One backward program per SM keeps the partial buffers at
    ``#SM * d * (2k + 1)`` floats. Under the interpreter small tiles make every test shape
    exercise several token blocks, d-chunk tails and programs that own more than one block.
    """
    k_pad = max(16, triton.next_power_of_2(k))
    if h2.device.type == "cuda":
        block_n = 64 if h2.element_size() <= 2 else 32
        if k_pad > 64:
            block_n //= 2
        return block_n, 64, k_pad, _sm_count(h2.device.index or 0)
    return 16, 32, k_pad, 2


def _flat_weights(w_down, b_down, w_up, b_up, acc: torch.dtype):
    return tuple(None if t is None else t.to(acc).contiguous() for t in (w_down, b_down, w_up, b_up))


def bottleneck_adapter_forward(
    h2: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    reduced_precision: bool,
    *,
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
) -> torch.Tensor:
    """``out (N, d)`` in ``h2``'s dtype for a 2-D ``h2`` of any strides.

    ``reduced_precision`` runs the projections as TF32 tensor-core dots (fp16/bf16 or autocast
    activations: 10 mantissa bits hold fp16/bf16 values exactly); otherwise fp32 is IEEE.
    """
    n, d = h2.shape
    k = w_down.shape[0]
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    w_down, b_down, w_up, b_up = _flat_weights(w_down, b_down, w_up, b_up, acc)
    out = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    if n == 0:
        return out
    cfg_n, cfg_d, k_pad, _ = _config(h2, k)
    block_n, block_d = block_n or cfg_n, block_d or cfg_d
    _bottleneck_adapter_fwd_kernel[(triton.cdiv(n, block_n),)](
        h2, w_down, w_down if b_down is None else b_down, w_up, w_up if b_up is None else b_up, out,
        n, d, k,
        h2.stride(0), h2.stride(1), out.stride(0),
        HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None,
        ACC_DTYPE=_TL_DTYPE[acc], DOT_PRECISION=_dot_precision(acc, reduced_precision),
        BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad,
    )
    return out


def _dot_precision(acc: torch.dtype, reduced_precision: bool) -> str:
    return "tf32" if reduced_precision and acc == torch.float32 else "ieee"


def bottleneck_adapter_backward(
    dout2: torch.Tensor,
    h2: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    reduced_precision: bool,
    need_dh: bool,
    need_dw: bool,
    *,
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
    num_programs: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dh, dw_down, db_down, dw_up, db_up)``: dh in ``h2``'s dtype (None unless ``need_dh``),
    the weight gradients in the accumulation dtype (None unless ``need_dw``)."""
    n, d = h2.shape
    k = w_down.shape[0]
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    w_down, b_down, w_up, _ = _flat_weights(w_down, b_down, w_up, None, acc)
    dh = torch.empty((n, d), dtype=h2.dtype, device=h2.device) if need_dh else None
    if n == 0:
        if not need_dw:
            return dh, None, None, None, None
        zeros = functools.partial(torch.zeros, dtype=acc, device=h2.device)
        return dh, zeros((k, d)), zeros((k,)), zeros((d, k)), zeros((d,))

    cfg_n, cfg_d, k_pad, max_programs = _config(h2, k)
    block_n, block_d = block_n or cfg_n, block_d or cfg_d
    num_blocks = triton.cdiv(n, block_n)
    # without weight gradients there is nothing to reduce: one program per block
    grid = min(num_blocks, num_programs or max_programs) if need_dw else num_blocks
    if need_dw:
        dw_down_part = torch.empty((grid, k, d), dtype=acc, device=h2.device)
        db_down_part = torch.empty((grid, k), dtype=acc, device=h2.device)
        dw_up_part = torch.empty((grid, d, k), dtype=acc, device=h2.device)
        db_up_part = torch.empty((grid, d), dtype=acc, device=h2.device)
    else:
        dw_down_part = db_down_part = dw_up_part = db_up_part = w_down  # never touched
    _bottleneck_adapter_bwd_kernel[(grid,)](
        h2, dout2, w_down, w_down if b_down is None else b_down, w_up,
        h2 if dh is None else dh, dw_down_part, db_down_part, dw_up_part, db_up_part,
        n, d, k,
        h2.stride(0), h2.stride(1), dout2.stride(0), dout2.stride(1), d,
        HAS_B_DOWN=b_down is not None, NEED_DH=need_dh, NEED_DW=need_dw,
        ACC_DTYPE=_TL_DTYPE[acc], DOT_PRECISION=_dot_precision(acc, reduced_precision),
        BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad,
    )
    if not need_dw:
        return dh, None, None, None, None
    return dh, dw_down_part.sum(0), db_down_part.sum(0), dw_up_part.sum(0), db_up_part.sum(0)
