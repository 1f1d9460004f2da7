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

__all__ = ["GPUProperties", "gpu_properties", "simulate_gpu", "on_device", "tunings"]


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


def tunings() -> list:
    """Every Triton autotuning this process has made (``_autotune.Tuning``: kernel, key, the
    configuration chosen, the first call's wall time), in order; empty until a kernel tuned.
    Does not import Triton."""
    module = sys.modules.get(__name__ + "._autotune")
    return module.tunings() if module is not None else []
