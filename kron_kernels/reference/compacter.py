"""Naive Compacter / PHM, computed the way the Compacter code computes it (DESIGN.md 4.1).

A PHM layer's weight ``sum_i kron(A_i, s_i t_i^T)`` is materialised through the batched 5-D
einsum on every call and applied with a dense matmul; the adapter is
``h + up(GELU(down(h)))`` in plain PyTorch, one op at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .kadaptation import kron_product_batched


def phm_weight(A: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(A[i], s[i] @ t[i].T)`` with ``A: (n, n, n)``, ``s: (n, out/n, r)``, ``t: (n, in/n, r)``."""
    return kron_product_batched(A, s @ t.transpose(1, 2))


def phm_linear(x, A, s, t, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, phm_weight(A, s, t).to(x.dtype), None if bias is None else bias.to(x.dtype))


def bottleneck_adapter(h, w_down, b_down, w_up, b_up) -> torch.Tensor:
    """``h + GELU(h @ w_down.T + b_down) @ w_up.T + b_up`` (exact erf GELU)."""
    return h + F.linear(F.gelu(F.linear(h, w_down, b_down)), w_up, b_up)


def compacter_adapter(h, A, s_down, t_down, b_down, s_up, t_up, b_up) -> torch.Tensor:
    """The Compacter adapter with PHM down (d -> k) and up (k -> d) layers sharing ``A``."""
    return h + phm_linear(F.gelu(phm_linear(h, A, s_down, t_down, b_down)), A, s_up, t_up, b_up)
