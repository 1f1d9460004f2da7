"""FacT (Tensor-Train and Tucker) on the d x d slots of a frozen ``nn.Linear`` (DESIGN.md 4.2).

A ViT block has 12 FacT slots, in this order: ``q, k, v, o, fc1[0..3], fc2[0..3]``. One
:class:`FacTLinear` covers all the slots of one frozen Linear:

* ``mode="rows"``: the Linear's output is ``len(slots)`` contiguous blocks of ``d`` rows
  (timm's fused ``qkv``: q, k, v; ``fc1``: its 4 row blocks; ``proj``: one slot). All slots
  read the same ``x``, so ``x @ U`` is computed once and slot ``j`` adds
  ``s * drop((x @ U) @ Σ_j) @ V^T`` to output block ``j``.
* ``mode="cols"``: the input is ``len(slots)`` contiguous chunks of ``d`` features (``fc2``'s
  4 column blocks of its ``(d, 4d)`` weight, as FacT's code splits the hidden activation
  ``(..., 4d) -> (..., 4, d)``); slot ``j`` reads chunk ``j`` and the slots' increments are
  summed into the single d-dim output.

The global ``U, V: (d, r)`` and the cores are shared by every slot of the model and owned
by one module (``shared``; ``adapt`` uses its ``SharedFactors``), looked up by name on every
call: ``shared.U``, ``shared.V`` and ``shared.cores: (S, r, r)`` (TT) or ``shared.C: (r, r, r)``
and ``shared.P: (S, r)`` (TK, ``Σ_i = sum_t P[i, t] C[t]``). The layer owns no parameters.

Fused path (:func:`kron_kernels.ops.fact_linear`): the frozen GEMM and the increments of
all the layer's slots in one call -- one ``x @ U`` (``(..., r)``, or ``(..., k, r)`` for column
chunks), the slots' ``r x r`` cores, dropout on that r-dim intermediate and ``@ V^T``, where
the naive reference recomputes ``x @ U`` once per slot. On CUDA this is the FacT kernel of
``triton/bottleneck.py`` (the intermediate stays on chip; the kernel writes the increments
and the bias, cuBLAS adds the frozen GEMM in its epilogue, forward and backward); elsewhere
the structured torch backend.

Merge folds ``kk.fact_tt_delta`` / ``kk.fact_tk_delta`` into the weight blocks and keeps the
pre-merge weight, so unmerge restores it bitwise.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._common import check_float, check_int, check_probability

__all__ = ["FacTLinear", "fact_cores", "FORMATS", "MODES"]

FORMATS = ("tt", "tk")
MODES = ("rows", "cols")


def fact_cores(shared: nn.Module, fmt: str) -> torch.Tensor:
    """All ``(S, r, r)`` cores: TT's own; TK's ``P @ C`` (a tiny ``(S, r) @ (r, r*r)`` product)."""
    if fmt == "tt":
        return shared.cores
    C, P = shared.C, shared.P
    r = C.shape[0]
    return (P @ C.reshape(r, r * r)).view(-1, r, r)


class FacTLinear(nn.Module):
    """A frozen Linear plus the FacT increments of its ``slots`` (module docstring).

    Args:
        base: the Linear; its ``weight``/``bias`` Parameters are taken over (same names).
        slots: the global slot indices of this Linear's blocks, in block order.
        mode: ``"rows"`` (output row blocks) or ``"cols"`` (input column chunks).
        fmt: ``"tt"`` or ``"tk"``.
        shared: the module owning ``U``, ``V`` and ``cores`` (TT) or ``C``, ``P`` (TK).
        scale: FacT's ``s``. dropout: on the r-dim intermediate, in training mode only.
    """

    def __init__(self, base: nn.Linear, slots: Sequence[int], mode: str, fmt: str, shared: nn.Module,
                 scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        # the shared validators (TypeError: not a number; ValueError: out of range or not finite)
        scale = check_float("scale", scale)  # any finite number: FacT sweeps s over {0.01 .. 100}
        dropout = check_probability("dropout", dropout, max_open=True)
        if isinstance(slots, (str, bytes, torch.Tensor)) or not isinstance(slots, Iterable):
            raise TypeError(f"slots must be a sequence of slot indices (ints), got {type(slots).__name__} {slots!r}")
        slots = tuple(check_int(f"slots[{i}]", s, min=0, desc="a non-negative int (a slot index)")
                      for i, s in enumerate(slots))
        if not slots:
            raise ValueError("slots must name at least one slot index")
        U, V = getattr(shared, "U", None), getattr(shared, "V", None)
        if not isinstance(U, torch.Tensor) or U.dim() != 2 or not isinstance(V, torch.Tensor) or V.shape != U.shape:
            raise ValueError("shared module needs tensors U and V of one shape (d, r)")
        d = U.shape[0]
        owned = ("cores",) if fmt == "tt" else ("C", "P")
        if not all(isinstance(getattr(shared, name, None), torch.Tensor) for name in owned):
            raise ValueError(f"a {fmt!r} FacT layer needs the shared module to own tensors {' and '.join(owned)}")
        n_slots = (shared.cores if fmt == "tt" else shared.P).shape[0]
        if max(slots) >= n_slots:
            raise ValueError(f"slots {list(slots)} must index the shared module's {n_slots} slots")
        k = len(slots)
        expected = (k * d, d) if mode == "rows" else (d, k * d)
        if (base.out_features, base.in_features) != expected:
            raise ValueError(
                f"a {mode!r} FacT layer with {k} slots of d={d} needs an (out, in) = {expected} weight, "
                f"got {(base.out_features, base.in_features)}"
            )
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slots, self.mode, self.fmt = slots, mode, fmt
        self.scale, self.dropout = scale, dropout
        self._shared = (shared,)  # in a tuple: not registered (the owner counts and saves them once)
        self.register_buffer("_premerge_weight", None, persistent=False)
        #: no own adapter tensors; the attribute marks the layer for kk.merge / kk.unmerge
        self.kk_adapter_params = ()

    @property
    def merged(self) -> bool:
        return self._premerge_weight is not None

    def _factors(self):
        shared = self._shared[0]
        cores = fact_cores(shared, self.fmt)[list(self.slots)]
        return shared.U, shared.V, cores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        U, V, cores = self._factors()
        return ops.fact_linear(x, self.weight, self.bias, U, V, cores, scale=self.scale, dropout=self.dropout,
                               training=self.training, split=self.mode)

    def deltas(self) -> torch.Tensor:
        """``(k, d, d)`` nn.Linear-convention increments of this layer's slots."""
        U, V, cores = self._factors()
        return ops.fact_tt_delta(U, V, cores, scale=self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("this FacTLinear is already merged; unmerge it first")
        self._premerge_weight = self.weight.detach().clone()
        for j, delta in enumerate(self.deltas()):
            d = delta.shape[0]
            block = self.weight[j * d:(j + 1) * d] if self.mode == "rows" else self.weight[:, j * d:(j + 1) * d]
            block += delta.to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("this FacTLinear is not merged")
        self.weight.copy_(self._premerge_weight)
        self._premerge_weight = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, slots={list(self.slots)}, "
            f"mode={self.mode!r}, fmt={self.fmt!r}, scale={self.scale:g}, dropout={self.dropout:g}, "
            f"merged={self.merged}"
        )
