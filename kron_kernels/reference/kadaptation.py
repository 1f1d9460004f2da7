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

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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


# ----------------------------------------------------------------------------------------
# module, paper-style: the increment is rebuilt with the 5-D einsum on every forward and
# added to the frozen weight, which is then applied with one dense matmul. Parameter names,
# shapes, initialisation and merge semantics match kron_kernels.nn.KAdaptationLinear, so a
# state dict loads into either.
# ----------------------------------------------------------------------------------------
class KAdaptationLinear(nn.Module):
    """Naive KAdaptation on row slices ``{name: (start, stop)}`` of a frozen Linear's output.

    ``A_<name>`` is read from ``shared`` (the module owning it, not registered here) or owned
    when ``shared`` is None; per target ``U_<name>: (n, rows/n, r)``, ``V_<name>: (n, in/n, r)``
    and, with ``bias``, ``bias_<name>``. Init: ``V = 0``, ``U ~ N(0, 1/r)``, owned ``A ~ N(0, 1/n)``.
    """

    def __init__(self, base: nn.Linear, targets, n: int = 32, r: int = 1, bias: bool = False,
                 scale: float = 1.0, shared: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if base.in_features % n:
            raise ValueError(f"n={n} must divide the layer's in_features={base.in_features}")
        for name, (start, stop) in targets.items():
            if (stop - start) % n:
                raise ValueError(f"n={n} must divide the {stop - start} rows of target {name!r}")
        self.targets = dict(sorted(targets.items(), key=lambda item: item[1][0]))
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n, self.r, self.scale, self.has_bias = n, r, float(scale), bool(bias)
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self._shared = (shared,) if shared is not None else None
        self.register_buffer("_premerge_weight", None, persistent=False)
        self.register_buffer("_premerge_bias", None, persistent=False)
        self._bias_added_by_merge = False
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        factory = dict(device=base.weight.device, dtype=dtype)
        names = []
        for name, (start, stop) in self.targets.items():
            if shared is None:
                self.register_parameter(f"A_{name}", nn.Parameter(torch.empty(n, n, n, **factory)))
                names.append(f"A_{name}")
            self.register_parameter(f"U_{name}", nn.Parameter(torch.empty(n, (stop - start) // n, r, **factory)))
            self.register_parameter(f"V_{name}", nn.Parameter(torch.empty(n, self.in_features // n, r, **factory)))
            names += [f"U_{name}", f"V_{name}"]
            if self.has_bias:
                self.register_parameter(f"bias_{name}", nn.Parameter(torch.empty(stop - start, **factory)))
                names.append(f"bias_{name}")
        self.kk_adapter_params = tuple(names)
        with torch.no_grad():
            for name in self.targets:
                if shared is None:
                    getattr(self, f"A_{name}").normal_(0.0, 1.0 / math.sqrt(n))
                getattr(self, f"U_{name}").normal_(0.0, 1.0 / math.sqrt(r))
                getattr(self, f"V_{name}").zero_()
                if self.has_bias:
                    getattr(self, f"bias_{name}").zero_()

    def factors(self, name: str):
        owner = self if self._shared is None else self._shared[0]
        return getattr(owner, f"A_{name}"), getattr(self, f"U_{name}"), getattr(self, f"V_{name}")

    @property
    def merged(self) -> bool:
        return self._premerge_weight is not None

    def adapted_weight_and_bias(self):
        """The frozen weight/bias with every slice's increment added (rebuilt on each call)."""
        delta = torch.zeros_like(self.weight)
        extra_bias = torch.zeros_like(self.weight[:, 0]) if self.has_bias else None
        for name, (start, stop) in self.targets.items():
            delta[start:stop] = kron_delta(*self.factors(name), self.scale).to(self.weight.dtype)
            if self.has_bias:
                extra_bias[start:stop] = getattr(self, f"bias_{name}").to(self.weight.dtype)
        bias = self.bias
        if extra_bias is not None:
            bias = extra_bias if bias is None else bias + extra_bias
        return self.weight + delta, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.adapted_weight_and_bias()
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("this KAdaptationLinear is already merged; unmerge it first")
        weight, bias = self.adapted_weight_and_bias()
        self._premerge_weight = self.weight.detach().clone()
        self._premerge_bias = None if self.bias is None else self.bias.detach().clone()
        self.weight.copy_(weight)
        if bias is not None and self.bias is None:
            self.bias = nn.Parameter(bias, requires_grad=False)
            self._bias_added_by_merge = True
        elif bias is not None:
            self.bias.copy_(bias)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("this KAdaptationLinear is not merged")
        self.weight.copy_(self._premerge_weight)
        if self._bias_added_by_merge:
            self.bias = None
            self._bias_added_by_merge = False
        elif self.bias is not None:
            self.bias.copy_(self._premerge_bias)
        self._premerge_weight = None
        self._premerge_bias = None

    def extra_repr(self) -> str:
        targets = ", ".join(f"{name}[{start}:{stop}]" for name, (start, stop) in self.targets.items())
        return (f"reference, in_features={self.in_features}, out_features={self.out_features}, "
                f"targets=({targets}), n={self.n}, r={self.r}, scale={self.scale:g}, bias={self.has_bias}")
