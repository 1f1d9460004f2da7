"""Autotuning of the row-tiled forward kernels: configuration spaces, pruning by the device's
shared memory and registers, and a log of every tuning (the first call's cost, reported).

The forward kernels of the bottleneck family (ARC, LoSA, the Compacter adapter) and FacT share
one shape: a program owns ``BLOCK_N`` rows, streams their ``d`` features in ``BLOCK_D`` chunks
against a ``WIDTH``-wide (``R_PAD``) fp32 factor, and holds a ``BLOCK_N x WIDTH`` fp32
accumulator. Which tile is fastest depends on the GPU (SM count, shared memory, clock), the
dtype and how many rows there are -- the H200 run of commit 349dfe8 measured these kernels at
4-15% of memory bandwidth with tiles chosen from ptxas register counts alone, e.g. one 8-warp
program per 64 tokens (197 programs for 12,608 tokens on 132 SMs). So on CUDA the launchers
hand the kernels to ``triton.autotune`` over :data:`ROW_TILES`, which includes high-parallelism
tiles (16 and 32 rows, 4 warps) beside the large ones, keyed by the feature width, the factor
width, a power-of-two bucket of the row count and (Triton adds them) the tensors' dtypes.
Configurations that cannot fit the device (shared memory for ``num_stages`` buffered tiles, or
more live fp32 values per thread than registers) are pruned before anything is compiled.

Each tuning -- which happens on the first call of a new key -- is appended to :func:`tunings`
with its wall time (compiling every surviving configuration and timing it); the benchmark
report prints them, so the cost is visible rather than hidden in a first step. Set
``TRITON_CACHE_AUTOTUNING=1`` to keep the choices on disk across processes. Under the
interpreter, or when a test asks for explicit tiles, the launchers call the plain kernel with
fixed small tiles instead (many row blocks, chunk tails): the interpreter cannot time configs.

``kron_kernels.triton.targets`` compiles, for sm_75/80/90, every configuration this pruning
keeps for the simulated device.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Sequence, Tuple

import triton

from . import gpu_properties

__all__ = ["ROW_TILES", "Tuning", "tunings", "row_tile_configs", "prune_row_tiles", "n_bucket", "launch", "fixed_tile",
           "launch_rows"]

# (BLOCK_N, BLOCK_D, num_warps, num_stages): small row blocks first (parallelism for few tokens
# or many SMs; the unpipelined 16 x 32 tile fits 48 KiB GPUs at wide factors), then the
# register-heavier tiles that amortise the factor loads over more rows
# (eight: every tile is compiled for every target in make test, so the space stays small)
ROW_TILES: Tuple[Tuple[int, int, int, int], ...] = (
    (16, 32, 4, 1), (16, 64, 4, 3),
    (32, 64, 4, 3), (32, 128, 4, 2),
    (64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2),
    (128, 64, 8, 2),
)
# live fp32 values per thread above which a tile is expected to spill (255 registers per thread,
# less the addressing, masks and loop state the kernels keep besides their tiles)
MAX_VALUES_PER_THREAD = 160


@dataclasses.dataclass(frozen=True)
class Tuning:
    """One autotuning: the kernel, its key, the configuration chosen and the first call's time."""

    kernel: str
    key: Tuple
    config: str
    seconds: float


_TUNINGS: List[Tuning] = []


def tunings() -> List[Tuning]:
    """Every autotuning this process has done, in order."""
    return list(_TUNINGS)


def row_tile_configs() -> List[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=s) for n, d, w, s in ROW_TILES]


def _resources(config: triton.Config, width: int, x_bytes: int, split_dots: bool = False) -> Tuple[int, float]:
    """``(shared memory bytes, live fp32 values per thread)`` of a tile: ``num_stages`` buffered
    ``BLOCK_N x BLOCK_D`` activation and ``BLOCK_D x WIDTH`` fp32 factor tiles; the accumulator,
    the activation tile and the factor tile spread over the CTA's threads. ``split_dots``
    (3xTF32, fp16 activations): the dots' operands are converted to fp32 and split into a high
    and a low TF32 part, so the activation tile is staged as 2 x 4 bytes and the factor tile
    twice (the estimate without it let a 256 KiB ARC tile through for sm_90)."""
    n, d = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
    parts = 2 if split_dots else 1
    x_bytes = 4 if split_dots else x_bytes
    smem = max(config.num_stages, 1) * parts * (n * d * x_bytes + d * width * 4)
    values = parts * (n * width + n * d + d * width) / (32 * config.num_warps)
    return smem, values


def prune_row_tiles(width_arg: str, rows_tensor: str) -> Callable:
    """``early_config_prune`` for ``triton.autotune``: the tiles whose buffered tiles fit the
    device's shared memory per block and whose live values fit the registers, for the kernel's
    factor width (the constexpr ``width_arg``) and activation dtype (tensor ``rows_tensor``)."""

    def prune(configs: Sequence[triton.Config], nargs, **kwargs) -> List[triton.Config]:
        width = kwargs[width_arg] if width_arg in kwargs else nargs[width_arg]
        x = nargs[rows_tensor]
        limit = gpu_properties(x.device).shared_memory_per_block_optin
        split = (kwargs.get("DOT_PRECISION") or nargs.get("DOT_PRECISION")) == "tf32x3"
        sized = [(c, *_resources(c, width, x.element_size(), split)) for c in configs]
        kept = [c for c, smem, values in sized if smem <= limit and values <= MAX_VALUES_PER_THREAD]
        # never nothing: the tile with the fewest live values (the kernels compile it anyway)
        return kept or [min(sized, key=lambda t: (t[2], t[1]))[0]]

    return prune


def n_bucket(n: int) -> int:
    """The row-count class an autotuning key holds: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def launch(autotuner, grid, *args, **kwargs) -> None:
    """``autotuner[grid](*args, **kwargs)``, logging a tuning when this call made one."""
    tuned = len(autotuner.cache)  # the cache only grows: a new entry is this call's tuning
    start = time.perf_counter()
    autotuner[grid](*args, **kwargs)
    if len(autotuner.cache) > tuned:
        key = next(reversed(autotuner.cache))  # dicts keep insertion order
        _TUNINGS.append(Tuning(autotuner.base_fn.__name__, key, str(autotuner.cache[key]),
                               time.perf_counter() - start))


def fixed_tile(x, block_n, block_d, default: Callable[[], Tuple[int, int, int, int]]):
    """A forward's fixed ``(BLOCK_N, BLOCK_D, num_warps, num_stages)`` -- the caller's tile sizes
    over ``default()``'s -- or None where it autotunes: on CUDA unless a tile size is given
    (tests; the interpreter always takes fixed tiles)."""
    if x.device.type == "cuda" and block_n is None and block_d is None:
        return None
    cfg_n, cfg_d, num_warps, num_stages = default()
    return block_n or cfg_n, block_d or cfg_d, num_warps, num_stages


def launch_rows(autotuned, kernel, n_rows: int, args, meta, fixed=None, **fixed_meta) -> None:
    """A row-tiled forward: through ``autotuned`` over :data:`ROW_TILES` (``fixed`` None: CUDA,
    no tile asked for), else ``kernel`` with ``fixed = (BLOCK_N, BLOCK_D, num_warps,
    num_stages)`` and ``fixed_meta`` (constexprs that follow from the tile) -- one program per
    ``BLOCK_N`` rows either way."""
    if fixed is None:
        launch(autotuned, lambda tile: (triton.cdiv(n_rows, tile["BLOCK_N"]),), *args, **meta)
        return
    block_n, block_d, num_warps, num_stages = fixed
    kernel[(triton.cdiv(n_rows, block_n),)](*args, **meta, **fixed_meta, BLOCK_N=block_n, BLOCK_D=block_d,
                                            num_warps=num_warps, num_stages=num_stages)
