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
