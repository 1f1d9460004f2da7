"""The Fastfood generator's constants and key schedule (``ops/fastfood.py``'s docstring defines
the generator), in one place that every implementation imports: the torch code
(``ops/fastfood.py``), the Triton kernels (``triton/fastfood.py``); ``csrc/fastfood.h`` mirrors
them for C++/CUDA and the tests pin all of them to the same projection for a seed.

Standard library only, so importing it never imports the op layer (no import cycle between
the op and its kernels).
"""
from __future__ import annotations

from typing import Tuple

MASK32 = 0xFFFFFFFF
WEYL = 0x9E3779B9  # Weyl increment: 2^32 / golden ratio
MIX_C1, MIX_C2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3 fmix32's multipliers
STREAM_B, STREAM_G_RADIUS, STREAM_G_ANGLE, STREAM_PI = 1, 2, 3, 4
PI_ROUNDS = 6  # Feistel rounds of the keyed permutation (both generator versions)
MAX_LOG_LB = 32  # element counters are 32-bit words
# generator versions (ops/fastfood.py's docstring defines both): 1, one Box--Muller evaluation and
# one B word per element; 2, one Box--Muller evaluation per pair of elements (cos, sin) and 32 signs
# of B per word. The default stays 1 until a GPU measurement shows 2 faster (DESIGN.md 5).
GENERATOR_V1, GENERATOR_V2 = 1, 2
GENERATORS = (GENERATOR_V1, GENERATOR_V2)
DEFAULT_GENERATOR = GENERATOR_V1


def mix32(x: int) -> int:
    """MurmurHash3 fmix32 on a Python int (the per-seed stream keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_C1) & MASK32
    x ^= x >> 13
    x = (x * MIX_C2) & MASK32
    x ^= x >> 16
    return x


def stream_keys(seed: int) -> Tuple[int, int, int, int]:
    """``key(s) = mix(mix(seed_lo + STREAM[s]) ^ seed_hi)`` for the streams B, G_radius,
    G_angle, Pi."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    return tuple(mix32(mix32(lo + s) ^ hi) for s in (STREAM_B, STREAM_G_RADIUS, STREAM_G_ANGLE, STREAM_PI))
