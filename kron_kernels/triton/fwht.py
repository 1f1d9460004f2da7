"""Triton Walsh-Hadamard transform (unnormalised Sylvester ordering) and its launcher.

One kernel, ``_fwht_kernel``, transforms length-``A`` vectors that sit ``stride`` apart:
vector ``g = (o, j)`` is ``{o * A * stride + k * stride + j : k < A}``. With ``stride = 1``
these are the rows themselves (``ROW_PASS``); with ``stride = 2^lo`` they are the index bits
``[lo, lo + log2 A)`` of longer rows, by ``H_{ab} = (H_a (x) I_b)(I_a (x) H_b)``. A row of
2^k is done by one row pass over its low bits and strided passes over the rest.

Inside a program the ``(BLOCK_V, A)`` tile stays in registers and every stage is a butterfly
on the lowest index bit (Pease's form): view the tile as ``(BLOCK_V, A/2, 2)``, split the
pairs, and join ``(a + b, a - b)`` transposed to ``(BLOCK_V, 2, A/2)`` -- the processed bit
moves to the top and the others shift down one, so after ``log2 A`` stages every bit has
been transformed once and the order is back where it started. Arithmetic is fp32.

Sizes: the row pass takes up to 2^13 elements per program (32 KiB of fp32, which the layout
changes of the join may stage through shared memory); strided passes take up to 2^7 points
per vector so that a program still covers >= 64 consecutive j (coalesced accesses).

Tiles: on CUDA the row pass of rows of 2^8 and more autotunes its tile (``TILE`` elements, i.e.
``TILE / A`` rows, per program: 2^11, 2^12 or 2^13) and warps per (row length, row-count class,
dtypes) -- the H200 run of commit 93d8659 measured the fixed 2^13-element tile at 1.46x
``torch.clone`` for 32768 bf16 rows of 2^10 (1.08x at 2^13); shorter rows, the strided passes
and the interpreter keep the fixed tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune

__all__ = ["fwht_forward", "MAX_ROW_LOG"]

MAX_ROW_LOG = 13
MAX_STRIDED_LOG = 7
_TILE = 1 << 13  # elements per program (the fixed tile)
AUTOTUNE_MIN_LOG = 8  # row passes of rows of 2^8 and more autotune on CUDA
TILES = (1 << 11, 1 << 12, 1 << 13)
WARPS = (4, 8)


@triton.jit
def _fwht_kernel(
    x_ptr, y_ptr, n_vectors, stride, scale, N_BUCKET,
    A: tl.constexpr, LOG_A: tl.constexpr, TILE: tl.constexpr, ROW_PASS: tl.constexpr,
):
    BLOCK_V: tl.constexpr = TILE // A  # vectors per program
    offs_v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < n_vectors
    offs_k = tl.arange(0, A).to(tl.int64)
    if ROW_PASS:
        offs = offs_v[:, None] * A + offs_k[None, :]
    else:
        outer = offs_v // stride
        base = outer * (A * stride) + (offs_v - outer * stride)
        offs = base[:, None] + offs_k[None, :] * stride
    x = tl.load(x_ptr + offs, mask=mask_v[:, None], other=0.0).to(tl.float32)
    for _ in tl.static_range(LOG_A):
        a, b = tl.split(tl.reshape(x, (BLOCK_V, A // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_V, A))
    tl.store(y_ptr + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=mask_v[:, None])


def _tile_configs():
    return [triton.Config({"TILE": tile}, num_warps=warps) for tile in TILES for warps in WARPS]


def _prune_tiles(configs, nargs, **kwargs):
    """The tiles that hold at least one vector and no more vectors than there are (a program
    wider than the work idles); never none (the smallest tile that holds a vector)."""
    a = kwargs["A"] if "A" in kwargs else nargs["A"]
    most = triton.next_power_of_2(max(int(nargs["n_vectors"]), 1)) * a
    kept = [c for c in configs if a <= c.kwargs["TILE"] <= max(most, a)]
    return kept or [min((c for c in configs if c.kwargs["TILE"] >= a), key=lambda c: c.kwargs["TILE"])]


_fwht_autotuned = triton.autotune(
    configs=_tile_configs(), key=["A", "ROW_PASS", "N_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_tiles},
)(_fwht_kernel)


def _fixed_tile(n_vectors: int, a: int) -> int:
    block_v = max(1, _TILE // a)
    if n_vectors < block_v:  # few vectors: no program wider than the work
        block_v = triton.next_power_of_2(max(n_vectors, 1))
    return block_v * a


def _launch(src, dst, n_vectors, stride, scale, log_a, row_pass):
    a = 1 << log_a
    args = (src, dst, n_vectors, stride, scale, _autotune.n_bucket(n_vectors))
    if src.is_cuda and row_pass and log_a >= AUTOTUNE_MIN_LOG:
        _autotune.launch(_fwht_autotuned, lambda meta: (triton.cdiv(n_vectors, meta["TILE"] // a),), *args,
                         A=a, LOG_A=log_a, ROW_PASS=row_pass)
        return
    tile = _fixed_tile(n_vectors, a)
    warps = (8 if tile >= 4096 else 4) if src.is_cuda else 1
    _fwht_kernel[(triton.cdiv(n_vectors, tile // a),)](*args, A=a, LOG_A=log_a, TILE=tile, ROW_PASS=row_pass,
                                                      num_warps=warps)


def fwht_forward(x2: torch.Tensor, scale: float, max_row_log: int = MAX_ROW_LOG,
                 max_strided_log: int = MAX_STRIDED_LOG) -> torch.Tensor:
    """``scale * x2 @ H`` for contiguous 2-D ``x2`` (fp32/fp16/bf16, last dim a power of two).

    ``max_row_log`` / ``max_strided_log`` bound the bits per pass (the tests lower them to
    run the multi-pass path at sizes the interpreter handles quickly).
    """
    rows, n = x2.shape
    log_n = n.bit_length() - 1
    out = torch.empty_like(x2)
    if x2.numel() == 0:
        return out
    total = rows * n
    row_log = min(log_n, max_row_log)
    plan = [(0, row_log)]
    lo = row_log
    while lo < log_n:
        step = min(max_strided_log, log_n - lo)
        plan.append((lo, step))
        lo += step
    # between passes the rows stay in fp32: a 16-bit intermediate would round once more per pass
    if len(plan) == 1:
        buffer = out
    elif out.dtype == torch.float32:
        buffer = out
    else:
        buffer = torch.empty(x2.shape, device=x2.device, dtype=torch.float32)
    for i, (lo, log_a) in enumerate(plan):
        last = i == len(plan) - 1
        src = x2 if i == 0 else buffer
        dst = out if last else buffer
        _launch(src, dst, total >> log_a, 1 << lo, scale if last else 1.0, log_a, row_pass=i == 0)
    return out
