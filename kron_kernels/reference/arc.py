"""Naive ARC (adapter re-composing), computed the way ARC's code computes it (DESIGN.md 4.3).

Two matmuls with the shared down-projection ``U: (d, r)`` (the up-projection is ``U.T``), the
per-layer diagonal ``lam: (r,)`` and bias ``b: (d,)``, dropout on the r-dim intermediate:
``ARC(x) = x + dropout((x @ U) * lam) @ U.T + b``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def arc(
    x: torch.Tensor,
    U: torch.Tensor,
    lam: torch.Tensor,
    bias: Optional[torch.Tensor],
    dropout: float = 0.0,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x + dropout((x @ U) * lam) @ U.T + bias``. ``keep`` (bool, shape ``(..., r)``) fixes
    the dropout mask (kept values scaled by ``1 / (1 - dropout)``); without it ``F.dropout``
    draws one when ``dropout > 0``."""
    h = (x @ U) * lam
    if keep is not None:
        h = h * keep / (1.0 - dropout)
    elif dropout > 0:
        h = F.dropout(h, dropout)
    out = x + h @ U.t()
    return out if bias is None else out + bias


class ARCAdapter(torch.nn.Module):
    """Reference twin of ``kron_kernels.nn.ARCAdapter`` (same constructor and parameter names):
    ARC's two matmuls with dropout; merge builds the dense ``I + U diag(lam) U^T``."""

    def __init__(self, d, r, shared, position, dropout: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        self.d, self.r, self.position, self.dropout = d, r, position, float(dropout)
        self._shared = (shared,)
        self._target = None
        self.lam = torch.nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.kk_adapter_params = ("lam", "bias")
        self._premerge = None

    @property
    def U(self):
        return getattr(self._shared[0], f"U_{self.position}")

    def fold_into(self, linear) -> None:
        self._target = (linear,)

    @property
    def merged(self) -> bool:
        return self._premerge is not None

    def forward(self, x):
        if self.merged:
            return x
        return arc(x, self.U, self.lam, self.bias, self.dropout if self.training else 0.0)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("this ARCAdapter is already merged; unmerge it first")
        linear = self._target[0]
        W = linear.weight
        bias = linear.bias
        premerge = (W.detach().clone(), None if bias is None else bias.detach().clone(), bias is None)
        eye = torch.eye(self.d, dtype=torch.float64, device=W.device)
        U = self.U.double()
        recomposed = eye + U @ torch.diag(self.lam.double()) @ U.t()
        shift = W.double() @ self.bias.double()
        if linear.bias is None:
            zeros = torch.zeros(W.shape[0], device=W.device, dtype=W.dtype)
            linear.bias = torch.nn.Parameter(zeros, requires_grad=False)
        linear.bias += shift.to(W.dtype)
        W.copy_((W.double() @ recomposed).to(W.dtype))
        self._premerge = premerge

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("this ARCAdapter is not merged")
        linear = self._target[0]
        weight, bias, bias_added = self._premerge
        linear.weight.copy_(weight)
        if bias_added:
            linear.bias = None
        else:
            linear.bias.copy_(bias)
        self._premerge = None
