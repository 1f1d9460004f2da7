"""ARC, adapter re-composing (DESIGN.md 4.3): ``x + drop((x @ U) * lam) @ U^T + bias``.

``adapt(model, "arc")`` puts one :class:`ARCAdapter` on the output of every block's ``norm1``
and ``norm2`` (the inputs of ``attn`` and ``mlp``), wrapped with
:class:`~kron_kernels.nn.AdapterWrapper`. The down-projection ``U: (d, r)`` is shared by
every layer at one position and owned by ``shared`` (``shared.U_attn`` / ``shared.U_mlp``,
looked up by name on every call); each adapter owns its ``lam: (r,)`` and ``bias: (d,)``.
The forward is the fused :func:`kron_kernels.arc` op (never forms ``U diag(lam) U^T``).

Initialisation (by ``adapt``): ``U`` Xavier-uniform, ``lam = 0`` and ``bias = 0``: the adapter
is exactly the identity at step 0, the first backward reaches ``lam`` and ``bias`` and from
the second step on ``U`` too.

Merge: the adapter is linear, so it folds into the Linear that reads its output
(``attn.qkv`` / ``mlp.fc1``; set with :meth:`ARCAdapter.fold_into`):
``W' = W (I + U diag(lam) U^T)``, ``c' = c + W bias``. While merged the adapter is the
identity; unmerge copies the pre-merge weight and bias back (bitwise).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._common import check_int, check_probability

__all__ = ["ARCAdapter"]


class ARCAdapter(nn.Module):
    """Args: d (hidden size), r (rank), shared (module owning ``U_<position>``), position
    (``"attn"`` or ``"mlp"``), dropout (on the r-dim intermediate, training mode only)."""

    def __init__(self, d: int, r: int, shared: nn.Module, position: str, dropout: float = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__()
        # the shared validators (TypeError: not an int / a number; ValueError: out of range)
        d = check_int("d", d, min=1)
        r = check_int("r", r, min=1)
        dropout = check_probability("dropout", dropout, max_open=True)
        if not isinstance(position, str):
            raise TypeError(f"position must be a str ('attn' or 'mlp'), got {type(position).__name__} {position!r}")
        U = getattr(shared, f"U_{position}", None)
        if not isinstance(U, torch.Tensor) or tuple(U.shape) != (d, r):
            raise ValueError(f"shared module needs a (d, r) = ({d}, {r}) tensor U_{position}")
        self.d, self.r, self.position, self.dropout = d, r, position, dropout
        self._shared = (shared,)  # not registered: the owner counts and saves U once
        self._target = None  # (Linear,) that reads this adapter's output, for merging
        self.lam = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.kk_adapter_params = ("lam", "bias")
        self._premerge = None  # (weight, bias or None, bias_added) while merged

    @property
    def U(self) -> torch.Tensor:
        return getattr(self._shared[0], f"U_{self.position}")

    def fold_into(self, linear: nn.Linear) -> None:
        """The Linear whose input is this adapter's output (merge target)."""
        if not isinstance(linear, nn.Linear) or linear.in_features != self.d:
            raise TypeError(f"ARC merges into an nn.Linear with in_features={self.d}, got {linear!r}")
        self._target = (linear,)

    @property
    def merged(self) -> bool:
        return self._premerge is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return x
        return ops.arc(x, self.U, self.lam, self.bias, dropout=self.dropout, training=self.training)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("this ARCAdapter is already merged; unmerge it first")
        if self._target is None:
            raise ValueError("this ARCAdapter has no Linear to merge into (fold_into was not called)")
        linear = self._target[0]
        W = linear.weight
        bias = linear.bias
        premerge = (W.detach().clone(), None if bias is None else bias.detach().clone(), bias is None)
        U = self.U.to(torch.float64)
        Wd = W.to(torch.float64)
        # W (I + U diag(lam) U^T) = W + ((W U) * lam) U^T: rank-r update, no d x d identity
        new_w = Wd + ((Wd @ U) * self.lam.to(torch.float64)) @ U.t()
        shift = Wd @ self.bias.to(torch.float64)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(W.shape[0], device=W.device, dtype=W.dtype), requires_grad=False)
        linear.bias += shift.to(W.dtype)
        W.copy_(new_w.to(W.dtype))
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

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, position={self.position!r}, dropout={self.dropout:g}, merged={self.merged}"
