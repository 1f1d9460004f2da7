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


class FacTLinear(torch.nn.Module):
    """Reference twin of ``kron_kernels.nn.FacTLinear`` (same constructor, no own parameters),
    computed as FacT's code does: per slot the chain ``FacTv(dropout(FacTs(FacTu(x)))) * s``,
    recomputing ``x @ U`` for every slot; merge adds the Eq. (9)/(11) einsum increments."""

    def __init__(self, base, slots, mode, fmt, shared, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        if mode not in ("rows", "cols") or fmt not in ("tt", "tk"):
            raise ValueError(f"mode must be 'rows' or 'cols' and fmt 'tt' or 'tk', got {mode!r}, {fmt!r}")
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.slots, self.mode, self.fmt = tuple(int(s) for s in slots), mode, fmt
        self.scale, self.dropout = float(scale), float(dropout)
        self._shared = (shared,)
        self.register_buffer("_premerge_weight", None, persistent=False)
        self.kk_adapter_params = ()

    @property
    def merged(self) -> bool:
        return self._premerge_weight is not None

    def _cores(self):
        shared = self._shared[0]
        cores = shared.cores if self.fmt == "tt" else fact_tk_cores(shared.C, shared.P)
        return [cores[i] for i in self.slots]

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        U, V = self._shared[0].U, self._shared[0].V
        p = self.dropout if self.training else 0.0
        if self.mode == "rows":
            return out + torch.cat([fact_apply(x, U, V, core, self.scale, p) for core in self._cores()], dim=-1)
        chunks = x.chunk(len(self.slots), dim=-1)
        return out + sum(fact_apply(c, U, V, core, self.scale, p) for c, core in zip(chunks, self._cores()))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("this FacTLinear is already merged; unmerge it first")
        self._premerge_weight = self.weight.detach().clone()
        shared, slots = self._shared[0], list(self.slots)
        if self.fmt == "tt":
            deltas = fact_tt_delta(shared.U, shared.V, shared.cores[slots], self.scale)
        else:
            deltas = fact_tk_delta(shared.U, shared.V, shared.C, shared.P[slots], self.scale)
        d = deltas.shape[1]
        for j, delta in enumerate(deltas):
            if self.mode == "rows":
                self.weight[j * d:(j + 1) * d] += delta.to(self.weight.dtype)
            else:
                self.weight[:, j * d:(j + 1) * d] += delta.to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("this FacTLinear is not merged")
        self.weight.copy_(self._premerge_weight)
        self._premerge_weight = None
