"""Fastfood projection ``fastfood`` and its parameters ``fastfood_params`` (DESIGN.md 4.6).

``P theta`` for ``theta in R^d``: ``nb = ceil(D / Lb)`` blocks of ``Lb`` rows (a power of two),
block j ``y_j = H G_j Pi_j H B_j pad(theta)`` with H the unnormalised Sylvester Hadamard
matrix (``kk.fwht``), ``B_j`` random +-1, ``Pi_j`` a permutation with gather semantics
(``(Pi x)[k] = x[Pi[k]]``), ``G_j`` standard normal; the output is
``concat_j(y_j)[:D] / (sqrt(Lb) * ||G_j|| * sqrt(D / Lb)) = concat_j(y_j)[:D] / (||G_j|| * sqrt(D))``.
Every column of one full block has squared norm exactly ``Lb * ||G_j||^2`` (``H B_j e_i`` is a
+-1 vector, Pi_j keeps that, ``G_j`` weights it, and ``||H v||^2 = Lb ||v||^2``), so a column of
P has squared norm ``nb * Lb / D`` before the cut to D rows: exactly 1 when ``Lb`` divides D,
1 in expectation otherwise.

The backward is ``P^T g``: block j ``B_j H Pi_j^T G_j H (g_j / (||G_j|| sqrt(D)))`` summed over
blocks and cut to d (H is symmetric; ``Pi^T`` is the scatter ``z[Pi[k]] = w[k]``).

Counter-based generator (the same integer arithmetic in torch, Triton and C++/CUDA: csrc/fastfood.h;
its constants and key schedule in ``ops/_fastfood_generator.py``, imported by this module and by
``triton/fastfood.py``)
------------------------------------------------------------------------------------------------------
All words are unsigned 32-bit; ``+`` and ``*`` wrap mod 2^32; ``mix`` is MurmurHash3's
finaliser ``fmix32`` (a bijection of 32-bit words with full avalanche)::

    mix(x):  x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    W = 0x9E3779B9                                    # Weyl increment (2^32 / golden ratio)
    key(s)      = mix(mix(seed_lo + STREAM[s]) ^ seed_hi)      # seed = seed_hi * 2^32 + seed_lo
    key(s, j)   = mix(key(s) + j * W)                            # block j
    word(s,j,i) = mix(key(s, j) + i * W)                         # element i of block j

with streams ``STREAM = {B: 1, G_radius: 2, G_angle: 3, Pi: 4}``. Then

* ``B_j[i] = 1 - 2 * (word(B, j, i) >> 31)`` (the top bit);
* ``G_j[i]`` by Box--Muller in float32 from two 24-bit uniforms
  ``u1 = ((word(G_radius, j, i) >> 8) + 1) * 2^-24`` in (0, 1] and
  ``u2 = (word(G_angle, j, i) >> 8) * 2^-24`` in [0, 1) (both exact in float32):
  ``G = sqrt(-2 ln u1) * cos(pi * (2 u2 - 1))``;
* ``Pi_j`` is a keyed bijection of ``[0, Lb)``, ``n = log2 Lb`` bits, ``h = n // 2``:
  ``x ^= key(Pi, j) mod 2^n`` then ``ROUNDS = 6`` Feistel rounds, round r with
  ``K_r = mix(key(Pi, j) + (r + 1) * W)``: ``hi = x >> h``, ``lo = x mod 2^h``,
  ``lo ^= mix(K_r ^ hi) mod 2^h``, ``x = (lo << (n - h)) | hi`` (xor by a function of the other
  bits, then a rotation: each step is invertible, so the whole is a permutation, whatever n);
  ``Pi_j[k] = x(k)``. The inverse runs the rounds backwards (the kernels gather with it for
  ``Pi^T`` instead of scattering).

That is **generator 1** (``generator=1``, the default). **Generator 2** (``generator=2``) draws the
same kind of B, Pi and G with fewer hash words and transcendentals per element, from the same
``mix``, keys and words:

* ``B_j[i] = 1 - 2 * ((word(B, j, i >> 5) >> (i & 31)) & 1)``: bit ``i mod 32`` of word ``i // 32``,
  32 signs per word (every bit of ``mix``'s output is a fair coin, not only the top one);
* ``G_j`` by one Box--Muller evaluation per *pair* ``i2 = i >> 1`` of elements (both halves, which
  are independent standard normals): ``u1 = ((word(G_radius, j, i2) >> 8) + 1) * 2^-24``,
  ``u2 = (word(G_angle, j, i2) >> 8) * 2^-24``, ``R = sqrt(-2 ln u1)``, ``theta = pi * (2 u2 - 1)``;
  ``G_j[i] = R cos(theta)`` for even i, ``R sin(theta)`` for odd i (the even element is generator
  1's formula at word index i2; an odd Lb = 1 block keeps the cosine alone);
* ``Pi_j`` exactly generator 1's (the same keys, ``ROUNDS = 6``: fewer rounds would need
  statistical evidence that the permutation stays good enough).

It halves the Box--Muller work and the G hash words per element and takes B from one word per
32 elements (docs/fastfood_roofline.md: a model floor of 0.384 ms instead of 0.505 ms at the
issue's d = 2^14, D = 86e6 on an H100/H200, *derived, not measured*). It is a different projection
for the same seed (both are the documented distribution), so 1 stays the default on every backend:
the project's rule (DESIGN.md 5) is that nothing becomes the CUDA default before a GPU measurement
shows it faster. The versions and constants are ``GENERATORS`` / ``DEFAULT_GENERATOR`` in
``ops/_fastfood_generator.py`` (mirrored in ``csrc/fastfood.h``).

B and Pi are integer functions: bit-identical on every backend, for both generators. G is float32
arithmetic on exact inputs, so backends differ only by the rounding of their ``log``/``cos``
(generator 2 also ``sin``)/``sqrt``: a few float32
ulps of |G| <= sqrt(-2 ln 2^-24) = 5.77, i.e. |dG| <= 1e-5 (relative ~1e-6). On CUDA, Triton
lowers ``tl.log``/``tl.cos`` to libdevice's accurate ``__nv_logf``/``__nv_cosf`` (checked in the
sm_90 PTX: no ``lg2.approx``/``cos.approx``, which would lose accuracy of ``ln u1`` near 1) and
``tl.sqrt`` to ``sqrt.approx.f32`` (~1 ulp); the interpreter uses numpy's float32 functions.
The extension's kernels (``csrc/fastfood.h``) use libm's ``logf``/``cosf``/``sqrtf`` on the CPU
and, on CUDA, call ``__nv_logf``/``__nv_cosf`` (generator 2: ``__nv_sincosf``) by name and the
correctly rounded ``__fsqrt_rn`` (the extension is compiled with ``--use_fast_math``, which would
turn ``logf``/``cosf``/``sincosf`` into ``lg2.approx``/``cos.approx``/``sin.approx``). Triton's
``tl.sin`` lowers to libdevice's ``__nv_sinf`` as ``tl.cos`` to ``__nv_cosf`` (the sm_90 PTX of generator 2's
Triton kernel and of the CUDA kernels has no ``sin.approx``/``cos.approx``/``lg2.approx``).
``fastfood_params`` computes G in float64 from the same uniforms and rounds once to float32 --
the definition the kernels approximate to that bound. Outputs of P then agree to ~1e-6
relative (the tests use 1e-5).

Backends: the compiled extension (``csrc/fastfood_*``; ``params=None``, fp32/fp16/bf16 theta):
on CUDA a fused kernel for ``Lb <= 2^15`` (or less where the device's opt-in shared memory is
smaller: one block of Lb fp32 per CTA), a persistent grid whose CTAs generate B_j, Pi_j, G_j in
registers and shared memory and write each output once (int64 offsets); on the CPU the same
generator (``csrc/fastfood.h``, shared by both) with the blocks over threads. Triton (a fused
kernel, one program per block, for ``Lb <= 2^13``: generation, both transforms, the gather and
the norm of G_j -- a register reduction over the block the program holds, so no pre-pass -- in
one pass over memory); the torch code below (vectorised over blocks, ``kk.fwht`` on
``(nb, Lb)``), which also serves larger blocks on CUDA through ``kk.fwht``'s own kernels.
Explicit ``params`` go to Triton or torch. ``auto`` takes the extension where it serves the call, else Triton on CUDA,
else torch; ``backend="cuda"`` refuses what the extension does not serve (explicit params,
float64, blocks beyond its shared memory) with the reason. The extension's CUDA kernel computes
||G_j|| in fp32 (a block reduction), the CPU kernel and torch in float64: outputs agree to ~1e-6.

Under ``torch.compile`` the projection and its transpose are the custom ops
``kron_kernels::fastfood`` / ``kron_kernels::fastfood_transpose`` (each the other's derivative),
opaque to Dynamo and Inductor (``ops._common.compiling``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Tuple

import torch

from .. import backend
from ._common import FLOAT_DTYPES, check_int, check_tensor, compiling, compute_dtype
from ._fastfood_generator import (  # noqa: F401  (re-exported: the generator's constants)
    DEFAULT_GENERATOR, GENERATORS, MASK32, MAX_LOG_LB, MIX_C1, MIX_C2, PI_ROUNDS, STREAM_B, STREAM_G_ANGLE,
    STREAM_G_RADIUS, STREAM_PI, WEYL, mix32, stream_keys,
)
from .fwht import fwht

__all__ = ["fastfood", "fastfood_params", "fastfood_block_size", "FastfoodFunction", "MODES", "GENERATORS",
           "DEFAULT_GENERATOR", "check_generator"]

MODES = ("stacked", "padded")


# ------------------------------------------------------------------- tensor generator (int64)
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 tensors holding 32-bit words, without int64 overflow: the
    product is split at 16 bits of c so each partial product stays below 2^48."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def _block_keys(key: int, nb: int, device, first: int = 0) -> torch.Tensor:
    j = torch.arange(first, first + nb, device=device, dtype=torch.int64)
    return _mix32_t((key + _mul32(j, WEYL)) & MASK32)  # (nb,)


def _words(block_key: torch.Tensor, count: int) -> torch.Tensor:
    """``word(s, j, i)`` for i in ``range(count)`` of every block key: (nb, count)."""
    i = torch.arange(count, device=block_key.device, dtype=torch.int64)
    return _mix32_t((block_key[:, None] + _mul32(i, WEYL)[None, :]) & MASK32)


def _feistel(x: torch.Tensor, block_key: torch.Tensor, log_lb: int, inverse: bool = False) -> torch.Tensor:
    """The keyed bijection of [0, 2^log_lb) (module docstring), or its inverse."""
    n, h = log_lb, log_lb // 2
    mask_n, mask_h, mask_hi = (1 << n) - 1, (1 << h) - 1, (1 << (n - h)) - 1
    round_keys = [_mix32_t((block_key + (r + 1) * WEYL) & MASK32)[:, None] for r in range(PI_ROUNDS)]
    start = (block_key & mask_n)[:, None]
    if not inverse:
        x = x ^ start
        for k in round_keys:
            hi, lo = x >> h, x & mask_h
            lo = lo ^ (_mix32_t(k ^ hi) & mask_h)
            x = (lo << (n - h)) | hi
        return x
    for k in reversed(round_keys):
        lo, hi = x >> (n - h), x & mask_hi
        lo = lo ^ (_mix32_t(k ^ hi) & mask_h)
        x = (hi << h) | lo
    return x ^ start


def fastfood_block_size(D: int, d: int, mode: str = "stacked") -> Tuple[int, int]:
    """``(Lb, nb)`` for a projection ``R^d -> R^D`` (validates D, d and mode)."""
    for name, value in (("D", D), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    Lb = 1 << (d - 1).bit_length() if mode == "stacked" else 1 << (max(D, d) - 1).bit_length()
    if Lb.bit_length() - 1 > MAX_LOG_LB:
        raise ValueError(f"block size Lb = {Lb} exceeds 2^{MAX_LOG_LB} (32-bit element counters); D={D}, d={d}")
    nb = -(-D // Lb)
    if nb > 1 << 32:
        raise ValueError(f"D={D} needs {nb} blocks of {Lb}, more than 2^32 (32-bit block counters)")
    return Lb, nb


def check_generator(generator) -> int:
    """``generator`` as a Python int in GENERATORS, or a TypeError / ValueError naming it."""
    value = check_int("generator", generator, desc=f"one of {GENERATORS}")
    if value not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {value!r}")
    return value


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed


def _generate(seed: int, Lb: int, nb: int, device, which=("B", "Pi", "G"), first: int = 0,
              generator: int = DEFAULT_GENERATOR):
    """{"B": float32 +-1, "Pi"/"Pinv": int64, "G": float32} of blocks ``first .. first + nb - 1``
    by generator version ``generator`` (the module docstring; Pi is the same for both)."""
    kb, kr, ka, kp = stream_keys(seed)
    out = {}
    if "B" in which:
        keys = _block_keys(kb, nb, device, first)
        if generator == 1:
            bits = _words(keys, Lb) >> 31
        else:  # bit i mod 32 of word i // 32
            i = torch.arange(Lb, device=device, dtype=torch.int64)
            bits = (_words(keys, (Lb + 31) // 32)[:, i >> 5] >> (i & 31)) & 1
        out["B"] = 1.0 - 2.0 * bits.to(torch.float32)
    if "G" in which:
        # uniforms are exact in float32; float64 transcendentals, one rounding to float32
        count = Lb if generator == 1 else (Lb + 1) // 2  # generator 2: one pair of uniforms per 2 elements
        u1 = ((_words(_block_keys(kr, nb, device, first), count) >> 8) + 1).double() * 2.0**-24
        u2 = (_words(_block_keys(ka, nb, device, first), count) >> 8).double() * 2.0**-24
        angle = (2.0 * u2 - 1.0) * math.pi
        radius = torch.sqrt(-2.0 * torch.log(u1))
        if generator == 1:
            g = radius * torch.cos(angle)
        else:  # (cos, sin) of pair i2 at elements 2 i2, 2 i2 + 1; a block of one keeps the cosine
            g = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=2).reshape(nb, 2 * count)
            g = g[:, :Lb]
        out["G"] = g.to(torch.float32)
    if "Pi" in which or "Pinv" in which:
        keys = _block_keys(kp, nb, device, first)
        k = torch.arange(Lb, device=device, dtype=torch.int64).expand(nb, Lb)
        log_lb = Lb.bit_length() - 1
        if "Pi" in which:
            out["Pi"] = _feistel(k, keys, log_lb)
        if "Pinv" in which:
            out["Pinv"] = _feistel(k, keys, log_lb, inverse=True)
    return out


def fastfood_params(D: int, d: int, seed: int = 0, mode: str = "stacked", device=None, *,
                    generator: int = DEFAULT_GENERATOR):
    """``(B, Pi, G)``, each ``(nb, Lb)``: the projection ``kk.fastfood`` regenerates on the fly.

    B is float32 +-1, Pi int64 (row j a permutation of ``range(Lb)``, gather semantics), G
    float32 standard normal; ``Lb = 2^ceil(log2 d)`` (stacked) or ``2^ceil(log2 max(D, d))``
    (padded), ``nb = ceil(D / Lb)``. ``generator`` (one of GENERATORS, default 1) picks the
    version of the generator defined in this module's docstring.
    """
    Lb, nb = fastfood_block_size(D, d, mode)
    seed = _check_seed(seed)
    generator = check_generator(generator)
    p = _generate(seed, Lb, nb, torch.device("cpu") if device is None else torch.device(device),
                  generator=generator)
    return p["B"], p["Pi"], p["G"]


# ------------------------------------------------------------------------------- torch path
def _torch_forward(theta, D, Lb, nb, B, Pi, G, norm):
    """``P theta`` vectorised over blocks; B, Pi, G (nb, Lb), norm (nb,) in theta's dtype."""
    d = theta.shape[0]
    x = torch.zeros(nb, Lb, dtype=theta.dtype, device=theta.device)
    x[:, :d] = theta
    x = fwht(x * B)
    x = torch.gather(x, 1, Pi) * G
    x = fwht(x) / (norm[:, None] * math.sqrt(D))
    return x.reshape(-1)[:D]


def _torch_transpose(g, d, Lb, nb, B, Pi, G, norm):
    """``P^T g``: the blocks of g (zero-padded to nb*Lb) through the transposed chain, summed."""
    D = g.shape[0]
    w = torch.zeros(nb * Lb, dtype=g.dtype, device=g.device)
    w[:D] = g
    w = fwht(w.view(nb, Lb) / (norm[:, None] * math.sqrt(D))) * G
    z = torch.zeros_like(w).scatter_(1, Pi, w)  # Pi^T: z[Pi[k]] = w[k]
    z = fwht(z) * B
    return z.sum(0)[:d]


# ----------------------------------------------------------------------------- dispatching
_TRITON_MAX_LOG_LB = 13  # one block per program in registers (triton/fastfood.py)
_CPU_EXTENSION_MAX_LOG_LB = 30  # the C++ kernel's transforms (kk.fwht's limit)


def _triton_refusal(dtype) -> Optional[str]:
    return "its kernels compute in float32, got float64" if dtype == torch.float64 else None


# The two probes below are process constants (the extension, a device's shared memory), so
# torch.compile takes their results as constants (backend.process_constant) instead of tracing
# the cached probes; tuples, not frozensets: Dynamo cannot guard a frozenset constant.
@backend.cached_constant
def _extension_device_types() -> Tuple[str, ...]:
    ok, _ = backend.extension_status()
    return tuple(sorted(backend.extension().kernels().get("fastfood", ()))) if ok else ("cpu", "cuda")


def _extension_devices() -> frozenset:
    """Device types the compiled extension has Fastfood kernels for (the CPU alone in a CPU-only
    build); without an extension both, so that an explicit 'cuda' backend says it is missing."""
    return frozenset(_extension_device_types())


@backend.cached_constant
def _cuda_max_log_lb(index: int) -> int:
    """log2 of the largest block the CUDA kernel takes on device ``index`` (its opt-in shared
    memory); asked once per device, only for calls that already hold a CUDA tensor."""
    return backend.extension().fastfood_cuda_max_log_lb(index)


def _extension_refusal(theta: torch.Tensor, Lb: int, params) -> Optional[str]:
    """Why the extension's kernels cannot take this call, or None."""
    if params is not None:
        return "its kernels regenerate B, Pi, G from the seed; explicit params take the Triton/torch paths"
    if theta.dtype == torch.float64:
        return "its kernels compute in float32, got float64"
    if theta.device.type == "cpu" and Lb > 1 << _CPU_EXTENSION_MAX_LOG_LB:
        return f"its CPU kernel takes blocks up to 2^{_CPU_EXTENSION_MAX_LOG_LB}, Lb = {Lb}"
    if theta.device.type == "cuda" and backend.extension_status()[0] and "cuda" in _extension_devices():
        index = theta.device.index if theta.device.index is not None else torch.cuda.current_device()
        max_log = _cuda_max_log_lb(index)
        if Lb > 1 << max(max_log, 0) or max_log < 0:
            return (f"its CUDA kernel holds one block of Lb fp32 in shared memory: Lb <= 2^{max_log} on "
                    f"{theta.device}, got Lb = {Lb}")
    return None


def _forward(theta, D, Lb, nb, seed, params, impl, generator):
    """``P theta`` for 1-D contiguous ``theta`` in its compute dtype: the forward of
    :class:`FastfoodFunction` and of the ``kron_kernels::fastfood`` custom op."""
    if impl == "cuda":  # the compiled extension (CUDA or CPU kernel), params is None
        out = torch.empty(D, dtype=torch.float32, device=theta.device)
        backend.extension().fastfood_forward(theta, out, seed, Lb, generator)
        return out
    if impl == "triton":
        from ..triton import fastfood as triton_fastfood  # first use only, never at import

        return triton_fastfood.fastfood_forward(theta, D, Lb, nb, seed, params, generator)
    B, Pi, G, norm = _torch_params(seed, Lb, nb, params, theta, generator)
    return _torch_forward(theta, D, Lb, nb, B, Pi, G, norm)


def _transpose(grad, d, Lb, nb, seed, params, impl, generator):
    """``P^T grad`` ((d,), grad's dtype): the backward of :class:`FastfoodFunction` and of the
    custom op (``kron_kernels::fastfood_transpose``)."""
    grad = grad.contiguous()
    if impl == "cuda":
        out = torch.empty(d, dtype=torch.float32, device=grad.device)
        backend.extension().fastfood_backward(grad.float(), out, seed, Lb, generator)
        return out
    if impl == "triton":
        from ..triton import fastfood as triton_fastfood

        return triton_fastfood.fastfood_transpose(grad, d, Lb, nb, seed, params, generator)
    B, Pi, G, norm = _torch_params(seed, Lb, nb, params, grad, generator)
    return _torch_transpose(grad, d, Lb, nb, B, Pi, G, norm)


class FastfoodFunction(torch.autograd.Function):
    """``P theta`` for 1-D contiguous ``theta`` in its compute dtype; the backward is ``P^T g``
    by the same implementation. ``params`` is None (generate from ``seed`` by generator version
    ``generator``) or (B, Pi, G)."""

    @staticmethod
    def forward(ctx, theta, D, Lb, nb, seed, params, impl, generator=DEFAULT_GENERATOR):
        ctx.args = (theta.shape[0], Lb, nb, seed, params, impl, generator)
        return _forward(theta, D, Lb, nb, seed, params, impl, generator)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _transpose(grad, *ctx.args), None, None, None, None, None, None, None


# The same computation as PyTorch custom ops, for torch.compile (see ops._common.compiling).
# A custom op's ``int`` is int64: the seed, in [0, 2^64), travels as its two's-complement
# int64 and is read back modulo 2^64. ``params`` travel as three optional tensors B, Pi, G
# (all None: generated from the seed); ``generator`` (the version) as the last int.
def _seed_arg(seed: int) -> int:
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _op_params(B, Pi, G):
    return None if B is None else (B, Pi, G)


@torch.library.custom_op("kron_kernels::fastfood", mutates_args=())
def _fastfood_op(theta: torch.Tensor, D: int, Lb: int, nb: int, seed: int, B: Optional[torch.Tensor],
                 Pi: Optional[torch.Tensor], G: Optional[torch.Tensor], impl: str, generator: int) -> torch.Tensor:
    """``P theta`` ((D,), theta's dtype) for 1-D contiguous ``theta`` in its compute dtype.

    Explicit params have their permutations checked here, on real tensors: under torch.compile
    ``fastfood`` leaves this data-dependent check to the op (no graph break)."""
    if Pi is not None:
        _check_permutations(Pi, Lb, nb)
    return _forward(theta, D, Lb, nb, seed % (1 << 64), _op_params(B, Pi, G), impl, generator)


@_fastfood_op.register_fake
def _(theta, D, Lb, nb, seed, B, Pi, G, impl, generator):
    return theta.new_empty((D,))


@torch.library.custom_op("kron_kernels::fastfood_transpose", mutates_args=())
def _fastfood_transpose_op(grad: torch.Tensor, d: int, Lb: int, nb: int, seed: int, B: Optional[torch.Tensor],
                           Pi: Optional[torch.Tensor], G: Optional[torch.Tensor], impl: str,
                           generator: int) -> torch.Tensor:
    """``P^T grad`` ((d,), grad's dtype) for 1-D ``grad`` (D,) in its compute dtype; params as
    the forward op took them (checked there)."""
    return _transpose(grad, d, Lb, nb, seed % (1 << 64), _op_params(B, Pi, G), impl, generator)


@_fastfood_transpose_op.register_fake
def _(grad, d, Lb, nb, seed, B, Pi, G, impl, generator):
    return grad.new_empty((d,))


def _fastfood_setup(ctx, inputs, output):
    x, _, Lb, nb, seed, B, Pi, G, impl, generator = inputs  # x: theta (forward op) or grad (transpose op)
    ctx.save_for_backward(B, Pi, G)
    ctx.args = (x.shape[0], Lb, nb, seed, impl, generator)


def _fastfood_autograd(ctx, grad):
    # P^T by the transpose op, itself differentiable (its derivative is P); params get none
    size, Lb, nb, seed, impl, generator = ctx.args
    return (_fastfood_transpose_op(grad, size, Lb, nb, seed, *ctx.saved_tensors, impl, generator), *[None] * 9)


def _fastfood_transpose_autograd(ctx, grad):
    size, Lb, nb, seed, impl, generator = ctx.args
    # the kernels read theta through a bare pointer: a contiguous copy of an expanded gradient
    return (_fastfood_op(grad.contiguous(), size, Lb, nb, seed, *ctx.saved_tensors, impl, generator), *[None] * 9)


_fastfood_op.register_autograd(_fastfood_autograd, setup_context=_fastfood_setup)
_fastfood_transpose_op.register_autograd(_fastfood_transpose_autograd, setup_context=_fastfood_setup)


_CACHE_MAX_ELEMENTS = 1 << 22  # 64 MiB of (B, Pi, G): the CPU path keeps small projections
_CACHE_ENTRIES = 4
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()


def _generated(seed, Lb, nb, device, generator):
    """``_generate`` for the torch path, with a small LRU cache of projections up to
    ``_CACHE_MAX_ELEMENTS`` entries: regenerating (6 Feistel rounds of int64 hashing, Box--Muller
    in float64) costs ~20x the two transforms on a CPU, and subspace training calls the same
    projection every step. The Triton kernels never store anything; larger projections are
    regenerated on every call."""
    key = (seed, Lb, nb, str(device), generator)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    p = _generate(seed, Lb, nb, device, generator=generator)
    value = (p["B"], p["Pi"], p["G"])
    if nb * Lb <= _CACHE_MAX_ELEMENTS:
        _cache[key] = value
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return value


def _torch_params(seed, Lb, nb, params, like, generator):
    B, Pi, G = _generated(seed, Lb, nb, like.device, generator) if params is None else params
    B, G = B.to(like.dtype), G.to(like.dtype)
    # the norm of G_j in float64 whatever the dtype: it scales every output of the block
    norm = torch.linalg.vector_norm(G.double(), dim=1).to(like.dtype)
    return B, Pi, G, norm


def _check_params(params, Lb, nb, device):
    if not isinstance(params, (tuple, list)) or len(params) != 3:
        raise TypeError("params must be a tuple (B, Pi, G) as returned by kk.fastfood_params")
    B, Pi, G = params
    check_tensor("params B", B, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("params Pi", Pi, ndim=2, dtypes=(torch.int64, torch.int32), device=device)
    check_tensor("params G", G, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    for name, t in (("B", B), ("Pi", Pi), ("G", G)):
        if tuple(t.shape) != (nb, Lb):
            raise ValueError(f"params {name} must have shape (nb, Lb) = {(nb, Lb)}, got {tuple(t.shape)}")
    Pi = Pi.long()
    if not compiling():  # data-dependent: under torch.compile the custom op checks it (_fastfood_op)
        _check_permutations(Pi, Lb, nb)
    return B.contiguous(), Pi.contiguous(), G.contiguous()


def _check_permutations(Pi, Lb, nb):
    if not torch.equal(torch.sort(Pi, dim=1).values, torch.arange(Lb, device=Pi.device).expand(nb, Lb)):
        raise ValueError("params Pi: every row must be a permutation of range(Lb)")


def fastfood(theta: torch.Tensor, D: int, seed: int = 0, mode: str = "stacked", params=None, *,
             generator: int = DEFAULT_GENERATOR) -> torch.Tensor:
    """``P theta`` in R^D (DESIGN.md 4.6), differentiable in theta (the backward is ``P^T g``).

    theta: 1-D (d,), fp32/fp16/bf16/fp64 (computed in fp32, fp64 for fp64; returned in theta's
    dtype). With ``params=None`` the projection is regenerated from ``seed`` inside the kernels
    (nothing stored) and equals the one of ``kk.fastfood_params(D, d, seed, mode,
    generator=generator)``; ``generator`` is the version of the generator (one of GENERATORS;
    default 1: version 2 is cheaper on a GPU by the roofline model but not yet measured, so not
    the default; the module docstring defines both); ``params`` takes explicit ``(B, Pi, G)``
    tensors of shape ``(nb, Lb)`` (then seed and generator are ignored -- still validated; they
    are constants: no gradient reaches them). Under ``torch.compile`` the check that every row
    of Pi is a permutation depends on Pi's values, so the custom op makes it when the compiled
    code runs (the same ValueError), not the traced wrapper.
    """
    check_tensor("theta", theta, ndim=1, dtypes=FLOAT_DTYPES)
    d = theta.shape[0]
    Lb, nb = fastfood_block_size(D, d, mode)
    seed = _check_seed(seed)
    generator = check_generator(generator)
    if params is not None:
        params = _check_params(params, Lb, nb, theta.device)
    refusal = _extension_refusal(theta, Lb, params)
    if refusal is not None and backend.get_backend() == "cuda":
        raise backend.BackendUnavailableError(f"backend 'cuda' cannot run fastfood: {refusal}")
    impl = backend.select(
        "fastfood", theta.device, cuda_ops=frozenset() if refusal else _extension_devices(),
        triton_refuses=_triton_refusal(theta.dtype),
    )
    if impl == "triton" and Lb > 1 << _TRITON_MAX_LOG_LB:
        # a block too large for one program's registers: the vectorised chain below, whose
        # kk.fwht calls run the (multi-pass) Triton / CUDA transforms
        impl = "torch"
    x = theta.to(compute_dtype(theta.dtype)).contiguous()
    if compiling():
        y = _fastfood_op(x, D, Lb, nb, _seed_arg(seed), *(params or (None, None, None)), impl, generator)
    else:
        y = FastfoodFunction.apply(x, D, Lb, nb, seed, params, impl, generator)
    return y.to(theta.dtype)
