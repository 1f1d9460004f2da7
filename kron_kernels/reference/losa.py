"""Naive LoSA low-rank mixer, plain PyTorch as the LoSA side network computes it (DESIGN.md 4.4).

``f(x) = alpha * GELU(x @ W_down) @ W_up`` with ``x = z + h`` (exact erf GELU, no biases),
and ``h_l = h_{l-1} + f(z_l + h_{l-1})``. Channel mixing acts on the last axis
(``W_down: (C, r)``, ``W_up: (r, C)``); token mixing transposes the token axis to the end,
mixes, and transposes back (``W_down: (T, r)``, ``W_up: (r, T)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def low_rank_mlp(x: torch.Tensor, W_down: torch.Tensor, W_up: torch.Tensor, alpha) -> torch.Tensor:
    return alpha * (F.gelu(x @ W_down) @ W_up)


def losa_mixer(h, z, W_down, W_up, alpha, axis: str = "channel") -> torch.Tensor:
    """``h + alpha * GELU((z + h) W_down) W_up`` along ``axis``: ``"channel"`` (the last axis)
    or ``"token"`` (the second to last, through a transpose)."""
    x = z + h
    if axis == "channel":
        return h + low_rank_mlp(x, W_down, W_up, alpha)
    if axis == "token":
        return h + low_rank_mlp(x.transpose(-1, -2), W_down, W_up, alpha).transpose(-1, -2)
    raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")
