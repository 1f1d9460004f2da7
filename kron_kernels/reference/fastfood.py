"""Fastfood projection the way the intrinsic-dimension code computes it (Li et al.'s
``fastfood_torched``): pad theta, multiply by stored B, a plain torch Walsh-Hadamard butterfly
with one op per stage, gather with stored Pi, multiply by stored G, the butterfly again, divide.
One block at a time, everything materialised, the projection (B, Pi, G) held in memory.

Unlike that code, the transform's backward is the exact transpose: the butterfly here is
ordinary differentiable torch code, so autograd differentiates the *unnormalised* forward --
their CUDA wrapper scaled the backward by 1/sqrt(L) while the forward was unnormalised
(DESIGN.md 4.8), which this file deliberately does not reproduce.

Depends on nothing of ours: (B, Pi, G) are passed in, e.g. from ``kk.fastfood_params``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["fwht_butterfly", "fastfood_reference"]


def fwht_butterfly(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester Walsh-Hadamard transform of the last dim, one torch op per stage
    (the in-place-style ``h`` doubling loop of the papers' code, written out of place)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def fastfood_reference(theta: torch.Tensor, D: int, B: torch.Tensor, Pi: torch.Tensor, G: torch.Tensor):
    """``P theta`` in R^D from stored ``B, Pi, G`` (each ``(nb, Lb)``), in theta's dtype.

    Block j: ``H G_j Pi_j H B_j pad(theta)``, concatenated, cut to D, divided by
    ``sqrt(Lb) * ||G_j|| * sqrt(D / Lb)`` (Le et al.'s normalisation, DESIGN.md 4.6).
    """
    nb, Lb = B.shape
    d = theta.shape[0]
    padded = torch.cat([theta, theta.new_zeros(Lb - d)])
    blocks = []
    for j in range(nb):
        x = padded * B[j].to(theta.dtype)
        x = fwht_butterfly(x)
        x = x[Pi[j]]
        x = x * G[j].to(theta.dtype)
        x = fwht_butterfly(x)
        norm = torch.linalg.vector_norm(G[j].to(theta.dtype))
        blocks.append(x / (math.sqrt(Lb) * norm * math.sqrt(D / Lb)))
    return torch.cat(blocks)[:D]
