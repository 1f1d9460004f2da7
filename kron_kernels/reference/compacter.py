"""Naive Compacter / PHM, computed the way the Compacter code computes it (DESIGN.md 4.1).

A PHM layer's weight ``sum_i kron(A_i, s_i t_i^T)`` is materialised through the batched 5-D
einsum on every call and applied with a dense matmul; the adapter is
``h + up(GELU(down(h)))`` in plain PyTorch, one op at a time.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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


# ----------------------------------------------------------------------------------------
# modules, paper-style: each PHM weight is rebuilt with the 5-D einsum on every forward and
# applied with a dense matmul. Parameter names, shapes and initialisation match
# kron_kernels.nn.PHMLinear / CompacterAdapter, so a state dict loads into either.
# ----------------------------------------------------------------------------------------
class PHMLinear(nn.Module):
    """Naive PHM layer; ``A`` is None (owned), a shared Parameter, or a module owning ``A``."""

    def __init__(self, in_features: int, out_features: int, n: int = 4, A=None, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if in_features % n or out_features % n:
            raise ValueError(f"n={n} must divide in_features={in_features} and out_features={out_features}")
        self.in_features, self.out_features, self.n = in_features, out_features, n
        factory = dict(device=device, dtype=dtype or torch.float32)
        names = []
        if A is None:
            self.A = nn.Parameter(torch.empty(n, n, n, **factory))
            names.append("A")
            self._shared = None
        else:
            self._shared = (A,)
        self.s = nn.Parameter(torch.empty(n, out_features // n, 1, **factory))
        self.t = nn.Parameter(torch.empty(n, in_features // n, 1, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.kk_adapter_params = tuple(names + ["s", "t"] + (["bias"] if bias else []))
        with torch.no_grad():
            if A is None:
                self.A.normal_(0.0, 1.0 / math.sqrt(n))
            self.s.normal_(0.0, 1.0)
            self.t.normal_(0.0, 1.0 / math.sqrt(in_features))
            if self.bias is not None:
                self.bias.zero_()

    @property
    def phm_rule(self) -> torch.Tensor:
        if self._shared is None:
            return self.A
        owner = self._shared[0]
        return owner if isinstance(owner, torch.Tensor) else owner.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return phm_linear(x, self.phm_rule, self.s, self.t, self.bias)


class CompacterAdapter(nn.Module):
    """Naive ``h + up(GELU(down(h)))`` with PHM layers sharing one ``A``; identity at init."""

    def __init__(self, d: int, k: Optional[int] = None, n: int = 4, A=None, device=None, dtype=None) -> None:
        super().__init__()
        k = d // 32 if k is None else k
        if k < 1 or d % n or k % n:
            raise ValueError(f"n={n} must divide d={d} and k={k} (k >= 1)")
        factory = dict(device=device, dtype=dtype or torch.float32)
        if A is None:
            self.A = nn.Parameter(torch.empty(n, n, n, **factory))
            with torch.no_grad():
                self.A.normal_(0.0, 1.0 / math.sqrt(n))
            self.kk_adapter_params = ("A",)
            A = self
        else:
            self.kk_adapter_params = ()
        self.d, self.k, self.n = d, k, n
        self.down = PHMLinear(d, k, n, A=A, **factory)
        self.up = PHMLinear(k, d, n, A=A, **factory)
        with torch.no_grad():
            self.up.s.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return compacter_adapter(h, self.down.phm_rule, self.down.s, self.down.t, self.down.bias,
                                 self.up.s, self.up.t, self.up.bias)

    def merge(self) -> None:
        raise ValueError("Compacter adapters cannot be merged into the frozen weights: the GELU between "
                         "the down and up projections makes the adapter nonlinear")

    unmerge = merge

    @property
    def merged(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"reference, d={self.d}, k={self.k}, n={self.n}"
