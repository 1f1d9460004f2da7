"""Triton kernels for the fused bottleneck adapter ``h + GELU(h W_d^T + b_d) W_u^T + b_u``.

Forward: one program per ``BLOCK_N`` tokens. It streams ``h`` over ``d`` in ``BLOCK_D``
chunks twice -- first to accumulate ``z = h W_d^T`` (``BLOCK_N x K_PAD``, in registers), then
to write ``out = h + GELU(z + b_d) W_u^T + b_u`` -- so the k-dim intermediate never leaves
the chip; HBM sees one read of ``h`` and one write of ``out`` (the second read of a block's
rows is served by L2).

Backward: with ``g = GELU(z)`` and ``dz = (dout W_u) * GELU'(z)``,

    dh = dout + dz W_d        dW_u = dout^T g     db_u = sum_rows dout
                              dW_d = dz^T h       db_d = sum_rows dz

A fixed number ``G`` of programs walks the token blocks (block ``pid``, ``pid + G``, ...).
Each block recomputes ``z`` and ``dout W_u`` in one pass over ``d`` (cheaper than saving
``z``: it rides on the loads of ``h``/``dout`` the backward makes anyway), then in a second
pass writes ``dh`` and adds its share of the weight gradients to the program's own slice of
``(G, ...)`` partial-sum buffers, which the launcher sums with torch: deterministic, no
atomics, and only ``G * (2 K_PAD + 1) * d`` floats.

``tl.dot`` needs every dimension >= 16, so the launchers zero-pad ``k`` to ``K_PAD = max(16,
next_pow2(k))``: both weights are passed as ``(K_PAD, d)`` row-major matrices (``W_d`` and
``W_u^T``) and ``b_d`` as ``(K_PAD,)``. The padded rows give ``z = 0``, ``GELU(0) = 0`` and
``dz = (dout @ 0) * GELU'(0) = 0``, so they change nothing, need no masks, and every weight
access has a compile-time row layout. Rows past ``N`` load ``h`` and ``dout`` as 0, which
zeroes their share of every weight gradient without a mask.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _autotune, dot_precision, gpu_properties, on_device

__all__ = ["bottleneck_adapter_forward", "bottleneck_adapter_backward"]

# constexpr: compiled kernels may read module globals only when they are tl.constexpr
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _gelu_and_grad(z):
    """Exact GELU ``z * Phi(z)`` and its derivative ``Phi(z) + z * phi(z)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z * cdf, cdf + z * pdf


@triton.jit
def _bottleneck_adapter_fwd_kernel(
    h_ptr, w_down_ptr, b_down_ptr, w_up_t_ptr, b_up_ptr, out_ptr,
    N, D, N_BUCKET,  # N_BUCKET: the row-count class, read only by the autotuner's key
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

    z = tl.zeros((BLOCK_N, K_PAD), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h_tile = tl.load(
            h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        ).to(ACC_DTYPE)
        w_down_t = tl.load(w_down_ptr + offs_k[None, :] * D + offs_d[:, None], mask=mask_d[:, None], other=0.0)
        z = tl.dot(h_tile, w_down_t, acc=z, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_B_DOWN:
        z += tl.load(b_down_ptr + offs_k)[None, :]
    g, _ = _gelu_and_grad(z)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_nd = mask_n[:, None] & mask_d[None, :]
        h_tile = tl.load(
            h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd, mask=mask_nd, other=0.0
        ).to(ACC_DTYPE)
        w_up_t = tl.load(w_up_t_ptr + offs_k[:, None] * D + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        out = h_tile + tl.dot(g, w_up_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_B_UP:
            out += tl.load(b_up_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
        tl.store(out_ptr + rows_out[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def _bottleneck_adapter_bwd_kernel(
    h_ptr, dout_ptr, w_down_ptr, b_down_ptr, w_up_t_ptr,
    dh_ptr, dw_down_part_ptr, db_down_part_ptr, dw_up_t_part_ptr, db_up_part_ptr,
    N, D,
    stride_hn, stride_hd, stride_gn, stride_gd, stride_dhn,
    HAS_B_DOWN: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, K_PAD)
    # this program's slice of the partial-sum buffers
    dw_down_part_ptr += pid.to(tl.int64) * K_PAD * D
    dw_up_t_part_ptr += pid.to(tl.int64) * K_PAD * D
    db_up_part_ptr += pid.to(tl.int64) * D
    if HAS_B_DOWN:
        b_down = tl.load(b_down_ptr + offs_k)
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
            h_tile = tl.load(
                h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd, mask=mask_nd, other=0.0
            ).to(ACC_DTYPE)
            dout_tile = tl.load(
                dout_ptr + rows_g[:, None] + offs_d[None, :].to(tl.int64) * stride_gd, mask=mask_nd, other=0.0
            ).to(ACC_DTYPE)
            offs_dk = offs_k[None, :] * D + offs_d[:, None]  # (BLOCK_D, K_PAD) views of W_d^T and W_u
            w_down_t = tl.load(w_down_ptr + offs_dk, mask=mask_d[:, None], other=0.0)
            w_up = tl.load(w_up_t_ptr + offs_dk, mask=mask_d[:, None], other=0.0)
            z = tl.dot(h_tile, w_down_t, acc=z, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            dg = tl.dot(dout_tile, w_up, acc=dg, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_B_DOWN:
            z += b_down[None, :]
        g, gelu_grad = _gelu_and_grad(z)
        dz = dg * gelu_grad
        if NEED_DW:
            db_down_acc += tl.sum(dz, axis=0)

        # pass 2: dh = dout + dz W_d, and this block's share of dW_u^T, dW_d, db_u.
        # The program's first block overwrites its (uninitialised) partial slice -- its loads
        # are masked off (columns < 0) and return 0 -- so every element of the slice is
        # written; later blocks add to it (columns < D). A scalar bound rather than
        # `mask & (blk != pid)` because the interpreter mistypes a block & scalar mask.
        d_summed = tl.where(blk == pid, 0, D)
        # Threads re-read partial-sum elements that other threads of this program stored for
        # the previous block (load and dot layouts differ): a CTA barrier orders those stores
        # before these loads.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_nd = mask_n[:, None] & mask_d[None, :]
            offs_kd = offs_k[:, None] * D + offs_d[None, :]  # (K_PAD, BLOCK_D) tiles of k-by-d matrices
            dout_tile = tl.load(
                dout_ptr + rows_g[:, None] + offs_d[None, :].to(tl.int64) * stride_gd, mask=mask_nd, other=0.0
            ).to(ACC_DTYPE)
            if NEED_DH:
                w_down = tl.load(w_down_ptr + offs_kd, mask=mask_d[None, :], other=0.0)
                dh = dout_tile + tl.dot(dz, w_down, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                tl.store(dh_ptr + rows_dh[:, None] + offs_d[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask_nd)
            if NEED_DW:
                h_tile = tl.load(
                    h_ptr + rows_h[:, None] + offs_d[None, :].to(tl.int64) * stride_hd, mask=mask_nd, other=0.0
                ).to(ACC_DTYPE)
                mask_summed = (offs_d < d_summed)[None, :]
                dw_up_t = tl.load(dw_up_t_part_ptr + offs_kd, mask=mask_summed, other=0.0)
                dw_up_t = tl.dot(
                    tl.trans(g), dout_tile, acc=dw_up_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
                )
                tl.store(dw_up_t_part_ptr + offs_kd, dw_up_t, mask=mask_d[None, :])
                dw_down = tl.load(dw_down_part_ptr + offs_kd, mask=mask_summed, other=0.0)
                dw_down = tl.dot(
                    tl.trans(dz), h_tile, acc=dw_down, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
                )
                tl.store(dw_down_part_ptr + offs_kd, dw_down, mask=mask_d[None, :])
                db_up = tl.load(db_up_part_ptr + offs_d, mask=offs_d < d_summed, other=0.0)
                tl.store(db_up_part_ptr + offs_d, db_up + tl.sum(dout_tile, axis=0), mask=mask_d)

    if NEED_DW:
        tl.store(db_down_part_ptr + pid * K_PAD + offs_k, db_down_acc)


# on CUDA the forward tunes its tiles per (d, K_PAD, row-count class, dtypes): triton/_autotune.py
_bottleneck_adapter_fwd_autotuned = triton.autotune(
    configs=_autotune.row_tile_configs(), key=["D", "K_PAD", "N_BUCKET"],
    prune_configs_by={"early_config_prune": _autotune.prune_row_tiles("K_PAD", "h_ptr")},
)(_bottleneck_adapter_fwd_kernel)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _accumulation_dtype(h2: torch.Tensor) -> torch.dtype:
    return torch.float64 if h2.dtype == torch.float64 else torch.float32


def _k_pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _config(h2: torch.Tensor, k_pad: int, backward: bool):
    """``(BLOCK_N, BLOCK_D, num_warps, num_stages, max_programs)`` for this call.

    On CUDA the forward autotunes its tiles (``triton/_autotune.py``); the forward tiles here
    serve only a call that fixes its tile sizes. The backward's tiles come from a ptxas
    resource sweep (sm_90, K_PAD = 32, Triton 3.6 and 3.9): none spills registers. They are
    not yet timed on a GPU. The forward's second pass
    re-reads a program's ``BLOCK_N x d`` rows from L2: 64 rows of 2-byte (32 of 4-byte)
    activations keep that <= 128 KiB at d = 1024. The backward's weight-gradient dots reduce
    over the ``BLOCK_N`` tokens with the loop-invariant ``g``/``dz`` as operands, which costs
    registers in proportion to BLOCK_N: it takes 32-wide d chunks, 8 warps and no software
    pipelining (each stage would hold more tiles). K_PAD > 64 halves BLOCK_N, whose
    ``BLOCK_N x K_PAD`` accumulators would spill. One backward program per SM bounds the
    partial buffers at ``#SM * (2 K_PAD + 1) * d`` floats.
    Under the interpreter, small tiles make every test shape exercise several token blocks,
    d-chunk tails and backward programs that own more than one block.
    """
    if h2.device.type != "cuda":
        return 16, 32, 4, 1, 2
    block_n = 64 if h2.element_size() <= 2 else 32
    if backward:
        block_d, num_warps, num_stages = 32, 8, 1
    else:
        block_d, num_warps, num_stages = 64, 8, 2
    if k_pad > 64:
        block_n //= 2
    return block_n, block_d, num_warps, num_stages, gpu_properties(h2.device).multi_processor_count


def _padded_weights(w_down, b_down, w_up, k_pad: int, acc: torch.dtype):
    """``W_d`` and ``W_u^T`` as zero-padded ``(k_pad, d)`` row-major matrices, ``b_d`` as ``(k_pad,)``."""
    k, d = w_down.shape
    w_down_p = torch.zeros((k_pad, d), dtype=acc, device=w_down.device)
    w_down_p[:k] = w_down
    w_up_t_p = torch.zeros((k_pad, d), dtype=acc, device=w_down.device)
    w_up_t_p[:k] = w_up.t()
    b_down_p = None
    if b_down is not None:
        b_down_p = torch.zeros((k_pad,), dtype=acc, device=w_down.device)
        b_down_p[:k] = b_down
    return w_down_p, b_down_p, w_up_t_p


@on_device
def bottleneck_adapter_forward(
    h2: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    data_dtype: torch.dtype,
    *,
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
) -> torch.Tensor:
    """``out (N, d)`` in ``h2``'s dtype, for a 2-D ``h2`` of any strides (no copy).

    ``data_dtype`` is the precision the data carry (``h2``'s dtype, or the autocast dtype):
    the projections' dots take :func:`kron_kernels.triton.dot_precision` of it (TF32 for
    bf16, 3xTF32 for fp16, IEEE for fp32).
    """
    n, d = h2.shape
    acc = _accumulation_dtype(h2)
    k_pad = _k_pad(w_down.shape[0])
    w_down_p, b_down_p, w_up_t_p = _padded_weights(w_down, b_down, w_up, k_pad, acc)
    b_up = None if b_up is None else b_up.to(acc).contiguous()
    out = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    if n == 0:
        return out
    args = (
        h2, w_down_p, w_down_p if b_down_p is None else b_down_p,
        w_up_t_p, w_up_t_p if b_up is None else b_up, out,
        n, d, _autotune.n_bucket(n),
        h2.stride(0), h2.stride(1), out.stride(0),
    )
    meta = dict(HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None,
                ACC_DTYPE=_TL_DTYPE[acc], DOT_PRECISION=dot_precision(data_dtype), K_PAD=k_pad)
    fixed = _autotune.fixed_tile(h2, block_n, block_d, lambda: _config(h2, k_pad, backward=False)[:4])
    _autotune.launch_rows(_bottleneck_adapter_fwd_autotuned, _bottleneck_adapter_fwd_kernel, n, args, meta, fixed)
    return out


@on_device
def bottleneck_adapter_backward(
    dout2: torch.Tensor,
    h2: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    data_dtype: torch.dtype,
    need_dh: bool,
    need_dw: bool,
    *,
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
    num_programs: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dh, dw_down, db_down, dw_up, db_up)`` for 2-D ``dout2``/``h2`` of any strides: dh in
    ``h2``'s dtype (None unless ``need_dh``), the weight gradients in the accumulation dtype
    (None unless ``need_dw``)."""
    n, d = h2.shape
    k = w_down.shape[0]
    acc = _accumulation_dtype(h2)
    k_pad = _k_pad(k)
    w_down_p, b_down_p, w_up_t_p = _padded_weights(w_down, b_down, w_up, k_pad, acc)
    dh = torch.empty((n, d), dtype=h2.dtype, device=h2.device) if need_dh else None
    if n == 0:
        if not need_dw:
            return dh, None, None, None, None
        zeros = functools.partial(torch.zeros, dtype=acc, device=h2.device)
        return dh, zeros((k, d)), zeros((k,)), zeros((d, k)), zeros((d,))

    cfg_n, cfg_d, num_warps, num_stages, max_programs = _config(h2, k_pad, backward=True)
    block_n, block_d = block_n or cfg_n, block_d or cfg_d
    num_blocks = triton.cdiv(n, block_n)
    # without weight gradients there is nothing to reduce: one program per block
    grid = min(num_blocks, num_programs or max_programs) if need_dw else num_blocks
    if need_dw:
        dw_down_part = torch.empty((grid, k_pad, d), dtype=acc, device=h2.device)
        db_down_part = torch.empty((grid, k_pad), dtype=acc, device=h2.device)
        dw_up_t_part = torch.empty((grid, k_pad, d), dtype=acc, device=h2.device)
        db_up_part = torch.empty((grid, d), dtype=acc, device=h2.device)
    else:
        dw_down_part = db_down_part = dw_up_t_part = db_up_part = w_down_p  # never dereferenced
    _bottleneck_adapter_bwd_kernel[(grid,)](
        h2, dout2, w_down_p, w_down_p if b_down_p is None else b_down_p, w_up_t_p,
        h2 if dh is None else dh, dw_down_part, db_down_part, dw_up_t_part, db_up_part,
        n, d,
        h2.stride(0), h2.stride(1), dout2.stride(0), dout2.stride(1), d,
        HAS_B_DOWN=b_down is not None, NEED_DH=need_dh, NEED_DW=need_dw,
        ACC_DTYPE=_TL_DTYPE[acc], DOT_PRECISION=dot_precision(data_dtype),
        BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not need_dw:
        return dh, None, None, None, None
    return (
        dh,
        dw_down_part.sum(0)[:k],
        db_down_part.sum(0)[:k],
        dw_up_t_part.sum(0)[:k].t(),
        db_up_part.sum(0),
    )
