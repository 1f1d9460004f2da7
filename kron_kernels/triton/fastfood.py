"""Triton Fastfood projection (forward ``P theta`` and transpose ``P^T g``) and its launchers.

The mathematics and the counter-based generator are in ``kron_kernels/ops/fastfood.py``; the
integer arithmetic here is the same, word for word, on uint32 (which wraps mod 2^32 as the
generator's definition requires).

Forward: one program per block j holds the whole block (``Lb <= 2^13`` fp32, 32 KiB, in
registers -- the joins of the butterfly may stage through shared memory): it loads theta
(zero-padded by the mask), generates (or loads) B_j, Pi_j, G_j for its ``Lb`` indices, runs
``H``, the gather ``x[Pi[k]]`` (``tl.gather`` within the tile), ``* G``, ``H``, and scales by
``1 / (||G_j|| sqrt(D))`` -- the norm is a register reduction of the G_j the program just
generated, so no pre-pass over memory -- then writes its rows once (int64 offsets: D may
exceed 2^31). The output is the only pass over memory.

Transpose: program p walks the blocks ``j = p, p + P, ...`` and accumulates
``B_j H Pi_j^T G_j H (g_j / (||G_j|| sqrt(D)))`` in registers (``Pi^T`` as a gather with the
inverse Feistel network, or with the argsort of explicit ``Pi``), writing one partial row per
program; the launcher sums the ``P`` partial rows (deterministic, no atomics).

Resources (compiled for sm_90 without a GPU, Triton 3.6, 8 warps at Lb = 2^13): forward 246
registers with in-kernel generation (172 with explicit params), transpose 255 (229), no
spills (sm_80 and sm_75: the same, transpose at the 255 cap -- 16 warps are the first thing to
try on a GPU); the 32-byte stack is libdevice's cos argument reduction. Not timed on a GPU yet.

``GENERATOR`` (a ``tl.constexpr``: one compiled kernel per version) picks the generator version of
ops/fastfood.py. Version 2 is computed per element here, as version 1 (each element hashes its
pair's two words and its B word and evaluates its own half of the Box--Muller pair: the same values,
about the same work; only the CUDA and C++ kernels share a pair's evaluation between its two
elements -- this kernel is not the CUDA default).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._fastfood_generator import DEFAULT_GENERATOR, GENERATORS, MIX_C1, MIX_C2, PI_ROUNDS, WEYL, stream_keys

__all__ = ["fastfood_forward", "fastfood_transpose", "MAX_LOG_LB"]

MAX_LOG_LB = 13
_MAX_PROGRAMS = 1024  # transpose: partial rows (<= 1024 x 2^13 fp32 = 32 MiB)

_WEYL = tl.constexpr(WEYL)
_C1 = tl.constexpr(MIX_C1)
_C2 = tl.constexpr(MIX_C2)
_ROUNDS = tl.constexpr(PI_ROUNDS)
_TWO_PI_24 = tl.constexpr(2.0**-24)
_PI = tl.constexpr(3.141592653589793)


@triton.jit
def _mix(x):
    x ^= x >> 16
    x *= _C1
    x ^= x >> 13
    x *= _C2
    x ^= x >> 16
    return x


@triton.jit
def _feistel(x, block_key, LOG_LB: tl.constexpr, INVERSE: tl.constexpr):
    """The keyed bijection of [0, 2^LOG_LB) of ops/fastfood.py (or its inverse), on uint32."""
    H: tl.constexpr = LOG_LB // 2
    MASK_N: tl.constexpr = (1 << LOG_LB) - 1
    MASK_H: tl.constexpr = (1 << H) - 1
    MASK_HI: tl.constexpr = (1 << (LOG_LB - H)) - 1
    start = block_key & MASK_N
    if INVERSE:
        # round keys key + r * W (r = ROUNDS..1), stepped in uint32 so that they wrap mod 2^32
        weyl = tl.full([], _WEYL, tl.uint32)
        step = block_key + weyl * _ROUNDS
        for rr in tl.static_range(_ROUNDS):
            k = _mix(step)
            step -= weyl
            lo = x >> (LOG_LB - H)
            hi = x & MASK_HI
            lo = lo ^ (_mix(k ^ hi) & MASK_H)
            x = (hi << H) | lo
        x = x ^ start
    else:
        x = x ^ start
        weyl = tl.full([], _WEYL, tl.uint32)
        step = block_key
        for r in tl.static_range(_ROUNDS):
            step += weyl
            k = _mix(step)
            hi = x >> H
            lo = x & MASK_H
            lo = lo ^ (_mix(k ^ hi) & MASK_H)
            x = (lo << (LOG_LB - H)) | hi
    return x


@triton.jit
def _block_params(keys_ptr, b_ptr, pi_ptr, g_ptr, j, offs,
                  LB: tl.constexpr, LOG_LB: tl.constexpr, HAS_PARAMS: tl.constexpr, INVERSE: tl.constexpr,
                  GENERATOR: tl.constexpr):
    """(sign, perm, gauss) of block j at indices offs; perm is Pi (or Pi^-1 with INVERSE); B and G
    by generator version GENERATOR (1 or 2)."""
    if HAS_PARAMS:
        row = j.to(tl.int64) * LB + offs
        sign = tl.load(b_ptr + row).to(tl.float32)
        perm = tl.load(pi_ptr + row).to(tl.int32)
        gauss = tl.load(g_ptr + row).to(tl.float32)
    else:
        ju = j.to(tl.uint32)
        i = offs.to(tl.uint32)
        step = i * _WEYL
        key_b = _mix(tl.load(keys_ptr + 0).to(tl.uint32) + ju * _WEYL)
        key_r = _mix(tl.load(keys_ptr + 1).to(tl.uint32) + ju * _WEYL)
        key_a = _mix(tl.load(keys_ptr + 2).to(tl.uint32) + ju * _WEYL)
        key_p = _mix(tl.load(keys_ptr + 3).to(tl.uint32) + ju * _WEYL)
        if GENERATOR == 1:
            sign = 1.0 - 2.0 * (_mix(key_b + step) >> 31).to(tl.float32)
            u1 = ((_mix(key_r + step) >> 8) + 1).to(tl.float32) * _TWO_PI_24
            u2 = (_mix(key_a + step) >> 8).to(tl.float32) * _TWO_PI_24
            gauss = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos((2.0 * u2 - 1.0) * _PI)
        else:
            # B: bit i mod 32 of word i >> 5; G: pair i >> 1, cos for even i, sin for odd i
            sign = 1.0 - 2.0 * ((_mix(key_b + (i >> 5) * _WEYL) >> (i & 31)) & 1).to(tl.float32)
            pair = (i >> 1) * _WEYL
            u1 = ((_mix(key_r + pair) >> 8) + 1).to(tl.float32) * _TWO_PI_24
            u2 = (_mix(key_a + pair) >> 8).to(tl.float32) * _TWO_PI_24
            angle = (2.0 * u2 - 1.0) * _PI
            trig = tl.where((i & 1) == 0, tl.cos(angle), tl.sin(angle))
            gauss = tl.sqrt(-2.0 * tl.log(u1)) * trig
        perm = _feistel(i, key_p, LOG_LB, INVERSE).to(tl.int32)
    return sign, perm, gauss


@triton.jit
def _hadamard(x, LB: tl.constexpr, LOG_LB: tl.constexpr):
    """Unnormalised Sylvester transform of a (LB,) tile: Pease butterflies on the lowest bit."""
    for _ in tl.static_range(LOG_LB):
        a, b = tl.split(tl.reshape(x, (LB // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (1, 0)), (LB,))
    return x


@triton.jit
def _fastfood_fwd_kernel(theta_ptr, out_ptr, keys_ptr, b_ptr, pi_ptr, g_ptr, d, D, inv_sqrt_D,
                         LB: tl.constexpr, LOG_LB: tl.constexpr, HAS_PARAMS: tl.constexpr,
                         GENERATOR: tl.constexpr):
    j = tl.program_id(0)
    offs = tl.arange(0, LB)
    x = tl.load(theta_ptr + offs, mask=offs < d, other=0.0).to(tl.float32)
    sign, perm, gauss = _block_params(keys_ptr, b_ptr, pi_ptr, g_ptr, j, offs, LB, LOG_LB, HAS_PARAMS, False,
                                      GENERATOR)
    norm = tl.sqrt(tl.sum(gauss * gauss, axis=0))
    x = _hadamard(x * sign, LB, LOG_LB)
    x = tl.gather(x, perm, 0) * gauss
    x = _hadamard(x, LB, LOG_LB) * (inv_sqrt_D / norm)
    offs_out = j.to(tl.int64) * LB + offs
    tl.store(out_ptr + offs_out, x, mask=offs_out < D)


@triton.jit
def _fastfood_t_kernel(g_ptr, part_ptr, keys_ptr, b_ptr, pinv_ptr, gg_ptr, nb, D, inv_sqrt_D,
                       LB: tl.constexpr, LOG_LB: tl.constexpr, HAS_PARAMS: tl.constexpr,
                       GENERATOR: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs = tl.arange(0, LB)
    acc = tl.zeros([LB], dtype=tl.float32)
    for jj in range(pid, nb, n_programs):
        j = jj + tl.zeros([], dtype=tl.int64)  # int64 whatever the loop variable's type
        offs_in = j * LB + offs
        w = tl.load(g_ptr + offs_in, mask=offs_in < D, other=0.0).to(tl.float32)
        sign, perm_inv, gauss = _block_params(keys_ptr, b_ptr, pinv_ptr, gg_ptr, j, offs,
                                              LB, LOG_LB, HAS_PARAMS, True, GENERATOR)
        norm = tl.sqrt(tl.sum(gauss * gauss, axis=0))
        w = _hadamard(w, LB, LOG_LB) * gauss * (inv_sqrt_D / norm)
        z = tl.gather(w, perm_inv, 0)  # (Pi^T w)[m] = w[Pi^-1[m]]
        acc += _hadamard(z, LB, LOG_LB) * sign
    tl.store(part_ptr + pid.to(tl.int64) * LB + offs, acc)


def _prepare(device, seed, params, inverse):
    """(keys, B, Pi or Pi^-1, G) kernel arguments; unused pointers get the keys tensor."""
    keys = torch.tensor(stream_keys(seed), dtype=torch.int64, device=device)
    if params is None:
        return keys, keys, keys, keys
    B, Pi, G = params
    if inverse:
        Pi = torch.argsort(Pi, dim=1)  # Pi^-1 of every row
    return keys, B.contiguous(), Pi.contiguous(), G.contiguous()


def _warps(device, Lb):
    return (8 if Lb >= 4096 else 4) if device.type == "cuda" else 1


def _kernel_generator(params, generator) -> int:
    """The GENERATOR constexpr: explicit params generate nothing, so they share version 1's kernel."""
    assert generator in GENERATORS
    return DEFAULT_GENERATOR if params is not None else generator


def fastfood_forward(theta: torch.Tensor, D: int, Lb: int, nb: int, seed: int, params,
                     generator: int = DEFAULT_GENERATOR) -> torch.Tensor:
    """``P theta`` (fp32, (D,)) for contiguous fp32 theta (d,), ``Lb <= 2^MAX_LOG_LB``; B, Pi, G
    from ``params`` or generated from ``seed`` by generator version ``generator``."""
    assert Lb <= 1 << MAX_LOG_LB and theta.dtype == torch.float32
    out = torch.empty(D, device=theta.device, dtype=torch.float32)
    keys, B, Pi, G = _prepare(theta.device, seed, params, inverse=False)
    _fastfood_fwd_kernel[(nb,)](theta, out, keys, B, Pi, G, theta.shape[0], D, D**-0.5,
                                LB=Lb, LOG_LB=Lb.bit_length() - 1, HAS_PARAMS=params is not None,
                                GENERATOR=_kernel_generator(params, generator), num_warps=_warps(theta.device, Lb))
    return out


def fastfood_transpose(g: torch.Tensor, d: int, Lb: int, nb: int, seed: int, params,
                       generator: int = DEFAULT_GENERATOR) -> torch.Tensor:
    """``P^T g`` (fp32, (d,)) for contiguous fp32 g (D,) (B, Pi, G as in the forward)."""
    assert Lb <= 1 << MAX_LOG_LB
    D = g.shape[0]
    n_programs = min(nb, _MAX_PROGRAMS)
    partial = torch.empty(n_programs, Lb, device=g.device, dtype=torch.float32)
    keys, B, Pinv, G = _prepare(g.device, seed, params, inverse=True)
    _fastfood_t_kernel[(n_programs,)](g.float(), partial, keys, B, Pinv, G, nb, D, D**-0.5,
                                      LB=Lb, LOG_LB=Lb.bit_length() - 1, HAS_PARAMS=params is not None,
                                      GENERATOR=_kernel_generator(params, generator),
                                      num_warps=_warps(g.device, Lb))
    return partial.sum(0)[:d]
