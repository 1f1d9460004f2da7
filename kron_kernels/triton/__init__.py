"""Triton kernels and their launchers, one file per op family.

Nothing here is imported by ``import kron_kernels``: the ops import these modules on the
first call that runs on the Triton backend (so ``TRITON_INTERPRET`` is honoured when set
before that call, and importing the package never imports Triton).

Every launcher reads the facts it sizes its launches by (SM count, shared memory per
block) through :func:`gpu_properties`, so that :mod:`kron_kernels.triton.targets` can run
the launchers for a GPU that is not there (:func:`simulate_gpu`) and compile exactly the
configurations they choose for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from typing import Iterator, Optional, Tuple

import torch

__all__ = ["GPUProperties", "gpu_properties", "simulate_gpu", "on_device", "tunings", "dot_precision"]


@dataclasses.dataclass(frozen=True)
class GPUProperties:
    """What the launchers may ask of a CUDA device."""

    name: str
    capability: Tuple[int, int]
    multi_processor_count: int
    shared_memory_per_block_optin: int  # bytes a block may opt in to


_simulated: Optional[GPUProperties] = None


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> GPUProperties:
    props = torch.cuda.get_device_properties(index)
    return GPUProperties(
        name=props.name,
        capability=(props.major, props.minor),
        multi_processor_count=props.multi_processor_count,
        shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", 48 * 1024),
    )


def gpu_properties(device: torch.device) -> GPUProperties:
    """The properties of CUDA ``device`` (cached), or of the GPU being simulated."""
    if _simulated is not None:
        return _simulated
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_properties(index)


@contextlib.contextmanager
def simulate_gpu(props: GPUProperties) -> Iterator[None]:
    """Within the context the launchers size their launches for ``props`` and touch no CUDA
    device (used with fake CUDA tensors to record launches without a GPU; not thread-safe)."""
    global _simulated
    previous, _simulated = _simulated, props
    try:
        yield
    finally:
        _simulated = previous


def on_device(launcher):
    """Run a launcher with its first tensor argument's CUDA device current.

    Triton launches on the *current* device; without this guard a tensor on ``cuda:1``
    would be handed to a kernel running on ``cuda:0``."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        real_cuda = first.is_cuda and _simulated is None
        guard = torch.cuda.device(first.device) if real_cuda else contextlib.nullcontext()
        with guard:
            return launcher(first, *args, **kwargs)

    return wrapper


def dot_precision(data_dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for fp32 operands (fp32 factors, fp32 intermediates)
    in a computation whose data carry ``data_dtype``'s precision (the activations' dtype, or
    the autocast dtype).

    * bfloat16: ``"tf32"``. TF32 rounds an fp32 operand to 2^-11, an eighth of bf16's unit
      roundoff 2^-8: the extra error is below the data's own.
    * float16: ``"tf32x3"`` (three TF32 products: fp32-like accuracy on tensor cores). A TF32
      rounding of the fp32 factors and intermediates is as large as fp16's own 2^-11, so plain
      TF32 doubled the error: the fp16 low-precision tests failed with it on an H200 (commit
      93d8659), where the interpreter, which ignores the precision, had passed them.
    * float32 / float64: ``"ieee"`` (float64 dots ignore the setting).
    """
    if data_dtype == torch.bfloat16:
        return "tf32"
    if data_dtype == torch.float16:
        return "tf32x3"
    return "ieee"


def tunings() -> list:
    """Every Triton autotuning this process has made (``_autotune.Tuning``: kernel, key, the
    configuration chosen, the first call's wall time), in order; empty until a kernel tuned.
    Does not import Triton."""
    module = sys.modules.get(__name__ + "._autotune")
    return module.tunings() if module is not None else []
