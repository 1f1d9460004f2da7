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

The persistent backward kernels of the bottleneck family and FacT tune too, over
:data:`BACKWARD_TILES`: the tile and how many programs share the row blocks
(``PROGRAMS_PER_SM``). Each program owns fp32 partial-sum slices of the weight gradients, so
more programs buy latency hiding (the H200 run of commit 93d8659 measured FacT's backward, then
one 8-warp program per SM without software pipelining, at 0.45 ms a call: 48% of its step's
kernel time) at the price of partial-sum memory, which :data:`PARTIAL_BUDGET_BYTES` bounds:
a configuration whose programs' slices would exceed it is pruned.

``kron_kernels.triton.targets`` compiles, for sm_75/80/90, every configuration this pruning
keeps for the simulated device.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Sequence, Tuple

import triton

from . import gpu_properties

__all__ = ["ROW_TILES", "BACKWARD_TILES", "PARTIAL_BUDGET_BYTES", "Tuning", "tunings", "row_tile_configs",
           "backward_tile_configs", "prune_row_tiles", "prune_backward_tiles", "max_programs_per_sm", "n_bucket",
           "launch", "fixed_tile", "fixed_backward_tile", "launch_rows", "launch_persistent"]

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
# (BLOCK_N, BLOCK_D, num_warps, num_stages, PROGRAMS_PER_SM) of the persistent backward kernels:
# first the fixed tiles they ran before (a ptxas sweep: 8 warps, no pipelining, one program per
# SM; 64 x 32 for 2-byte activations, 32 x 32 for factors wider than 64, 32 x 16 for fp32's
# IEEE dots), then smaller row blocks on 4 warps with more programs per SM and software
# pipelining, which hide the loads' latency the single program could not
BACKWARD_TILES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (64, 32, 8, 1, 1), (32, 32, 8, 1, 1), (32, 16, 8, 1, 1),
    (32, 32, 4, 2, 2),
    (16, 64, 4, 2, 4),
)
# the partial-sum slices of all programs of one backward launch together (transient fp32
# buffers): FacT at ViT-B width (R_PAD 16) keeps 4 programs per SM on an H100 (~54 MB); ARC's
# and LoSA's R_PAD 64 slices (~0.4 MB a program) keep one per SM
PARTIAL_BUDGET_BYTES = 64 << 20
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


def backward_tile_configs() -> List[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_D": d, "PROGRAMS_PER_SM": p}, num_warps=w, num_stages=s)
            for n, d, w, s, p in BACKWARD_TILES]


def max_programs_per_sm(multi_processor_count: int, partial_bytes_per_program: int) -> int:
    """The largest ``PROGRAMS_PER_SM`` of :data:`BACKWARD_TILES` whose programs' partial-sum
    slices fit :data:`PARTIAL_BUDGET_BYTES` (1 at the least: the fixed tile's)."""
    fitting = [p for *_, p in BACKWARD_TILES
               if multi_processor_count * p * partial_bytes_per_program <= PARTIAL_BUDGET_BYTES]
    return max(fitting, default=1)


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


def _backward_resources(config: triton.Config, width: int, x_bytes: int, split_dots: bool) -> Tuple[int, float]:
    """``(shared memory bytes, live fp32 values per thread)`` of a backward tile: per stage two
    activation tiles (the input and the output gradient) and two factor tiles; about six
    ``BLOCK_N x WIDTH`` fp32 tiles (``pre``, ``dm``, ``d_pre``, ``a``, the dots' accumulators)
    live across the feature loops besides them (the ptxas sweep behind the fixed tile: 64 x 32
    at 8 warps, R_PAD 64, TF32, 244-254 registers and no spill)."""
    n, d = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
    parts = 2 if split_dots else 1
    x_bytes = 4 if split_dots else x_bytes
    smem = max(config.num_stages, 1) * parts * 2 * (n * d * x_bytes + d * width * 4)
    values = parts * (6 * n * width + 2 * n * d + 2 * d * width) / (32 * config.num_warps)
    return smem, values


def prune_backward_tiles(width_arg: str, rows_tensor: str, partial_bytes: Callable[[dict], int]) -> Callable:
    """``early_config_prune`` for a persistent backward: the tiles whose programs' partial sums
    (``partial_bytes(args)`` a program, from the launch's arguments) fit the budget and that
    fit the device's shared memory and registers (as :func:`prune_row_tiles`); never nothing."""

    def prune(configs: Sequence[triton.Config], nargs, **kwargs) -> List[triton.Config]:
        args = {**nargs, **kwargs}
        x = args[rows_tensor]
        props = gpu_properties(x.device)
        cap = max_programs_per_sm(props.multi_processor_count, partial_bytes(args))
        split = args.get("DOT_PRECISION") == "tf32x3"
        sized = [(c, *_backward_resources(c, args[width_arg], x.element_size(), split))
                 for c in configs if c.kwargs["PROGRAMS_PER_SM"] <= cap]
        kept = [c for c, smem, values in sized
                if smem <= props.shared_memory_per_block_optin and values <= MAX_VALUES_PER_THREAD]
        # never nothing: the tile with the fewest live values (the first tile at R_PAD 128 with
        # 3xTF32 dots wanted 213 KB of shared memory on sm_80: the compile check caught it)
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


def launch_persistent(autotuned, kernel, x, n_rows: int, need_dw: bool, partial_bytes_per_program: int,
                      allocate: Callable[[int], tuple], args: Callable[[tuple], tuple], meta: dict,
                      fixed=None, **fixed_meta) -> Tuple[tuple, int]:
    """A persistent backward: ``(partials, programs)`` -- the partial-sum buffers
    ``allocate(slices)`` made (None without ``need_dw``) and how many programs ran, whose
    leading slices the caller sums. ``args(partials)`` gives the kernel's positional arguments.

    On CUDA with no tile asked for (``fixed`` None) through ``autotuned`` over
    :data:`BACKWARD_TILES`: the buffers are allocated for the most programs any configuration
    the pruning keeps may launch, and the chosen one's count is read back. Else ``kernel`` with
    ``fixed = (BLOCK_N, BLOCK_D, num_warps, num_stages, programs)`` (at most ``programs``
    programs) and ``fixed_meta`` (constexprs that follow from the tile). Without weight
    gradients there is nothing to reduce: one program per row block."""
    if fixed is None:
        sm = gpu_properties(x.device).multi_processor_count
        cap = max_programs_per_sm(sm, partial_bytes_per_program)
        smallest = min(n for n, *_ in BACKWARD_TILES)
        partials = allocate(min(triton.cdiv(n_rows, smallest), sm * cap)) if need_dw else None

        def grid(tile):
            blocks = triton.cdiv(n_rows, tile["BLOCK_N"])
            return (min(blocks, sm * tile["PROGRAMS_PER_SM"]) if need_dw else blocks,)

        launch(autotuned, grid, *args(partials), **meta)
        return partials, grid(autotuned.best_config.all_kwargs())[0]
    block_n, block_d, num_warps, num_stages, max_programs = fixed
    blocks = triton.cdiv(n_rows, block_n)
    programs = min(blocks, max_programs) if need_dw else blocks
    partials = allocate(programs) if need_dw else None
    kernel[(programs,)](*args(partials), **meta, **fixed_meta, BLOCK_N=block_n, BLOCK_D=block_d, PROGRAMS_PER_SM=1,
                        num_warps=num_warps, num_stages=num_stages)
    return partials, programs


def fixed_backward_tile(x, block_n, block_d, num_programs, default: Callable[[], Tuple[int, int, int, int, int]]):
    """A persistent backward's fixed ``(BLOCK_N, BLOCK_D, num_warps, num_stages, programs)`` --
    the caller's over ``default()``'s -- or None where it autotunes: on CUDA unless a tile size
    or a program count is given (tests; the interpreter always takes fixed tiles)."""
    if x.device.type == "cuda" and block_n is None and block_d is None and num_programs is None:
        return None
    cfg_n, cfg_d, num_warps, num_stages, max_programs = default()
    return block_n or cfg_n, block_d or cfg_d, num_warps, num_stages, num_programs or max_programs
