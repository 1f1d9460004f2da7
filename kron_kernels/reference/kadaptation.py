"""Naive KAdaptation, computed the way the paper's public code computes it (DESIGN.md 4.1).

The increment is materialised on every call through a batched 5-D einsum (an intermediate
``m`` times the weight's size), added to the frozen weight, and applied with a dense matmul,
so autograd backpropagates a dense ``d_out x d_in`` weight gradient. The defects of the
public code (DESIGN.md 4.8) are *not* reproduced: the q and v targets have their own factors,
the q rows keep timm's head layout, and the default initialisation lets every factor learn.

This module is the ground truth of the tests and the baseline of the benchmarks; it
imports nothing else from the package.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kron_product_batched(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(A[i], B[i])`` through the 5-D einsum ``(m, a_out, p, a_in, q)``."""
    m, a_out, a_in = A.shape
    _, p, q = B.shape
    return torch.einsum("iac,ibd->iabcd", A, B).reshape(m, a_out * p, a_in * q).sum(0)


def kron_delta(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * sum_i kron(A[i], U[i] @ V[i].T)``."""
    return scale * kron_product_batched(A, U @ V.transpose(1, 2))


def kron_matmul(x, A, U, V, scale: float = 1.0) -> torch.Tensor:
    return x @ kron_delta(A, U, V, scale).to(x.dtype).t()


def kron_linear(x, weight, bias: Optional[torch.Tensor], A, U, V, scale: float = 1.0) -> torch.Tensor:
    return F.linear(x, weight + kron_delta(A, U, V, scale).to(weight.dtype), bias)
