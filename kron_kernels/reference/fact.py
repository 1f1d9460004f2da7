"""Naive FacT (Tensor-Train and Tucker), computed the way the FacT code computes it (DESIGN.md 4.2).

FacT's code applies the increment of a slot as a chain of small ``nn.Linear`` layers,
``FacTv(dropout(FacTs_i(FacTu(x)))) * s``, and calls ``FacTu(x)`` again for every slot
(q, k and v each recompute ``x @ U``). Its increment, when it is materialised (to merge
it), is the paper's Eq. (9)/(11) einsum. Weights follow the ``nn.Linear`` convention:
``U, V: (d, r)`` map as ``x @ U`` and ``@ V.T``, so slot ``i``'s ``nn.Linear`` weight
increment is ``s * V @ cores[i].T @ U.T``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def fact_tt_delta(U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``(S, d, d)`` nn.Linear-convention increments from Eq. (9):
    ``dW[i, j, k] = s * sum_{t,u} cores[i, t, u] U[j, t] V[k, u]`` is (input j, output k),
    transposed to (output, input)."""
    paper = scale * torch.einsum("itu,jt,ku->ijk", cores, U, V)
    return paper.transpose(1, 2)


def fact_tk_cores(C: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``cores[i] = sum_t P[i, t] C[t]`` (DESIGN.md 4.2), ``C: (r, r, r)``, ``P: (S, r)``."""
    return torch.einsum("it,tab->iab", P, C)


def fact_tk_delta(U, V, C, P, scale: float = 1.0) -> torch.Tensor:
    """Eq. (11): the Tucker increments, ``(S, d, d)`` in the nn.Linear convention."""
    paper = scale * torch.einsum("tab,it,ja,kb->ijk", C, P, U, V)
    return paper.transpose(1, 2)


def fact_apply(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    core: torch.Tensor,
    scale: float = 1.0,
    dropout: float = 0.0,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One slot's increment applied to ``x``: ``s * dropout((x @ U) @ core) @ V.T`` as the chain
    ``FacTu -> FacTs -> dropout -> FacTv``. ``keep`` (bool, the r-dim intermediate's shape)
    fixes the dropout mask; without it ``F.dropout`` draws one when ``dropout > 0``."""
    h = F.linear(F.linear(x, U.t()), core.t())
    if keep is not None:
        h = h * keep / (1.0 - dropout)
    elif dropout > 0:
        h = F.dropout(h, dropout)
    return F.linear(h, V) * scale


def fact_qkv(x, U, V, cores: Sequence[torch.Tensor], scale: float = 1.0, dropout: float = 0.0) -> torch.Tensor:
    """The q, k, v increments concatenated as FacT adds them to timm's fused qkv output,
    recomputing ``x @ U`` for each of the three slots (the cost DESIGN.md 4.8 names)."""
    return torch.cat([fact_apply(x, U, V, core, scale, dropout) for core in cores], dim=-1)
