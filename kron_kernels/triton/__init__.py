"""Triton kernels and their launchers, one file per op family.

Nothing here is imported by ``import kron_kernels``: the ops import these modules on the
first call that runs on the Triton backend (so ``TRITON_INTERPRET`` is honoured when set
before that call, and importing the package never imports Triton).
"""
import contextlib
import functools

import torch


def on_device(launcher):
    """Run a launcher with its first tensor argument's CUDA device current.

    Triton launches on the *current* device; without this guard a tensor on ``cuda:1``
    would be handed to a kernel running on ``cuda:0``."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        guard = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with guard:
            return launcher(first, *args, **kwargs)

    return wrapper
