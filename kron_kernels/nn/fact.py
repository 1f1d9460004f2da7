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

import copy
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._common import check_float, check_int, check_probability, compiling
from ._bank import drop_when_consumed, stamp

__all__ = ["FacTLinear", "FacTCoreBank", "fact_cores", "FORMATS", "MODES"]

FORMATS = ("tt", "tk")
MODES = ("rows", "cols")


def fact_cores(shared: nn.Module, fmt: str) -> torch.Tensor:
    """All ``(S, r, r)`` cores: TT's own; TK's ``P @ C`` (a tiny ``(S, r) @ (r, r*r)`` product)."""
    if fmt == "tt":
        return shared.cores
    C, P = shared.C, shared.P
    r = C.shape[0]
    return (P @ C.reshape(r, r * r)).view(-1, r, r)


class FacTCoreBank:
    """The cores of every FacT layer of one shared module (a ViT's, or one Swin stage's),
    formed once per forward pass: TK's ``P @ C`` once for all S slots, and each layer's
    ``(k, r, r)`` block a view of one split of the ``(S, r, r)`` cores, whose backward is one
    concatenation for every layer. Each layer on its own indexed its slots (one launch forward,
    a zero fill and a scatter backward) and, for TK, formed ``P @ C`` (one launch forward, two
    backward): about 3 (TT) / 6 (TK) launches a layer, 144 / 288 a ViT-B step, against 1 (TT) /
    4 (TK) for the whole model here -- on the H200 the FacT steps were bound by their 2,281 /
    2,570 launches (commit 93d8659). ``kk.adapt`` makes one per shared module.

    It serves when its layers' slots tile ``[0, S)`` in consecutive runs (``adapt``'s layout:
    q, k, v | o | fc1 x 4 | fc2 x 4 per block); otherwise every layer indexes its own. Valid
    while the cores (TT) or C and P (TK) are unchanged, in one grad mode, and (TK) until a
    backward consumes the product's graph (:mod:`kron_kernels.nn._bank`). Bypassed under
    ``torch.compile``; never saved (copies and pickles get an empty one)."""

    def __init__(self, shared: nn.Module, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self._shared = (shared,)
        self.fmt = fmt
        self._layers = []
        self._index: Optional[Dict[int, int]] = None  # id(layer) -> its block of the split
        self._sizes = None
        self._built: Dict[bool, tuple] = {}

    def add(self, layer: "FacTLinear") -> None:
        if not isinstance(layer, FacTLinear) or layer._shared[0] is not self._shared[0] or layer.fmt != self.fmt:
            raise ValueError("a FacTCoreBank holds FacT layers of its own shared module and format")
        self._layers.append(layer)
        self._index = None

    def _tensors(self):
        shared = self._shared[0]
        return (shared.cores,) if self.fmt == "tt" else (shared.C, shared.P)

    def _partition(self) -> bool:
        """Whether the layers' slots tile ``[0, S)`` in consecutive runs (sizes and index set)."""
        if self._index is None:
            runs = sorted((layer.slots[0], len(layer.slots), id(layer), tuple(layer.slots)) for layer in self._layers)
            n_slots = self._tensors()[-1].shape[0]
            tiled = [start for start, *_ in runs] == [sum(k for _, k, *_ in runs[:i]) for i in range(len(runs))]
            consecutive = all(slots == tuple(range(start, start + k)) for start, k, _, slots in runs)
            if runs and tiled and consecutive and sum(k for _, k, *_ in runs) == n_slots:
                self._sizes = [k for _, k, *_ in runs]
                self._index = {key: i for i, (_, _, key, _) in enumerate(runs)}
            else:
                self._sizes, self._index = None, {}
        return self._sizes is not None

    def cores(self, layer: "FacTLinear") -> Optional[torch.Tensor]:
        """``layer``'s ``(k, r, r)`` cores from this pass's split, or None where the bank does
        not serve (the layer indexes its own)."""
        if not self._partition() or id(layer) not in self._index:
            return None
        slot = torch.is_grad_enabled()
        tensors = self._tensors()
        built = self._built.get(slot)
        if built is None or built[1] != stamp(*tensors):
            every = fact_cores(self._shared[0], self.fmt)  # (S, r, r): TT's Parameter, TK's P @ C
            built = (torch.split(every, self._sizes), stamp(*tensors))
            self._built[slot] = built
            drop_when_consumed(every, self._built, slot, built)  # TK's product (TT's is a leaf)
        return built[0][self._index[id(layer)]]

    def __deepcopy__(self, memo):
        clone = FacTCoreBank.__new__(FacTCoreBank)
        memo[id(self)] = clone
        clone._shared = copy.deepcopy(self._shared, memo)
        clone.fmt = self.fmt
        clone._layers = copy.deepcopy(self._layers, memo)
        clone._index, clone._sizes, clone._built = None, None, {}
        return clone

    def __getstate__(self):
        return {**self.__dict__, "_index": None, "_sizes": None, "_built": {}}

    def __repr__(self) -> str:
        return f"FacTCoreBank({self.fmt!r}, {len(self._layers)} layers)"


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
                 scale: float = 1.0, dropout: float = 0.1, bank: Optional[FacTCoreBank] = None) -> None:
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
        self._bank = None
        if bank is not None:
            if not isinstance(bank, FacTCoreBank):
                raise TypeError(f"bank must be a FacTCoreBank or None, got {type(bank).__name__}")
            bank.add(self)
            self._bank = bank

    @property
    def merged(self) -> bool:
        return self._premerge_weight is not None

    def _factors(self):
        shared = self._shared[0]
        cores = self._bank.cores(self) if self._bank is not None and not compiling() else None
        if cores is None:
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
