"""KAdaptation on row slices of a frozen ``nn.Linear`` (DESIGN.md 4.1).

A target is a row range ``[start, stop)`` of the layer's output -- for timm's fused ``qkv``
Linear (d -> 3d) the q, k and v rows ``[0, d)``, ``[d, 2d)``, ``[2d, 3d)`` in timm's own head
layout, for ``proj`` all of its rows. Each target's increment is

    delta = scale * sum_i kron(A[i], U[i] @ V[i].T)      A: (n, n, n), U: (n, rows/n, r), V: (n, in/n, r)

and is applied with :func:`kron_kernels.kron_matmul` / :func:`kron_kernels.kron_linear`, never
materialised in the forward. ``A`` is normally shared by every layer of a model for one
target kind: pass the module that owns it as ``shared`` (it is looked up by name,
``shared.A_<target>``, on every call, and not registered here, so it is counted, saved and
moved once, by its owner). Without ``shared`` the layer owns its ``A_<target>``.

Initialisation: ``V = 0`` (the increment is exactly zero at step 0), ``A ~ N(0, 1/n)`` and
``U ~ N(0, 1/r)``, so that once ``V`` moves, the entries of ``delta`` have the variance of
``V``'s. The first backward reaches ``V`` (A and U are nonzero) and from the second step on
every factor gets a gradient -- unlike the PEViT code, which zeroes two factors (DESIGN.md 4.8).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import kron as kron_ops
from ..ops._common import autocast_target, check_bool, check_float, check_int, compiling
from ._bank import DeltaBank

__all__ = ["KAdaptationLinear", "KAdaptationBank", "init_shared_factor", "factor_dtype"]


def factor_dtype(weight: torch.Tensor) -> torch.dtype:
    """Factors are float32 (DESIGN.md 3), float64 next to a float64 weight."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def init_shared_factor(A: torch.Tensor) -> torch.Tensor:
    """``A ~ N(0, 1/n)`` for ``A: (n, n, n)``: each ``A_i`` keeps the norm of the block vector it mixes."""
    with torch.no_grad():
        return A.normal_(0.0, 1.0 / math.sqrt(A.shape[-1]))


def check_targets(
    targets: Mapping[str, Tuple[int, int]], in_features: int, out_features: int, n: int, r: int
) -> Dict[str, Tuple[int, int]]:
    """Validate ``{name: (start, stop)}`` row slices against a Linear's shape and ``n``, ``r``.

    ``n`` and ``r`` go through the shared validators (positive ints), as every row bound
    (an int); a TypeError / ValueError names what is wrong. Returns the slices (Python ints)
    ordered by start row.
    """
    n = check_int("n", n, min=1)
    check_int("r", r, min=1)
    if not isinstance(targets, Mapping):
        raise TypeError(f"targets must be a mapping {{name: (start, stop)}}, got {type(targets).__name__}")
    if not targets:
        raise ValueError("targets must name at least one row slice")
    if in_features % n:
        raise ValueError(f"n={n} must divide the layer's in_features={in_features}")
    slices = {}
    for name, bounds in targets.items():
        if not isinstance(name, str):
            raise TypeError(f"target names must be str (they name parameters), got {type(name).__name__} {name!r}")
        if not name.isidentifier():
            raise ValueError(f"target name {name!r} must be a Python identifier (it names parameters)")
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise TypeError(f"targets[{name!r}] must be a (start, stop) pair of ints, got {bounds!r}")
        slices[name] = tuple(check_int(f"targets[{name!r}] {end}", value, desc="an int (a row index)")
                             for end, value in zip(("start", "stop"), bounds))
    previous_stop, ordered = 0, {}
    for name, (start, stop) in sorted(slices.items(), key=lambda item: item[1][0]):
        if not 0 <= start < stop <= out_features:
            raise ValueError(f"target {name!r} rows [{start}, {stop}) are not inside [0, {out_features})")
        if start < previous_stop:
            raise ValueError(f"target {name!r} rows [{start}, {stop}) overlap another target")
        if (stop - start) % n:
            raise ValueError(f"n={n} must divide the {stop - start} rows of target {name!r}")
        ordered[name] = (start, stop)
        previous_stop = stop
    return ordered


class KAdaptationBank(DeltaBank):
    """The increments of every KAdaptation layer of a model, built per target kind (the q
    increments of all blocks, sharing ``A_q``; the v increments, sharing ``A_v``) in one
    :func:`kron_kernels.kron_deltas` call each per forward pass -- 12 launches a kind for the
    whole model where each layer formed its own (10 a layer for q and v together: three stacks,
    two GEMMs forward; the copy and four GEMMs backward). Used where ``kron_linear_slices`` would
    run its dense composition (auto on CUDA, or ``backend="dense"``): each layer then makes one
    GEMM on ``W + delta`` forward and ``dx`` plus one weight-gradient GEMM per target backward
    (:func:`kron_kernels.ops.kron.linear_with_increments`). Validity as every
    :class:`~kron_kernels.nn._bank.DeltaBank`; ``kk.adapt`` makes one per model."""

    def add(self, layer: "KAdaptationLinear") -> None:
        if not isinstance(layer, KAdaptationLinear):
            raise TypeError(f"a KAdaptationBank holds KAdaptationLinear layers, got {type(layer).__name__}")
        if layer._bank is not None:
            raise ValueError("this KAdaptationLinear is registered with a KAdaptationBank already")
        for name in layer.targets:
            self._add(layer, name, layer.scale)
        layer._bank = (self,)


class KAdaptationLinear(nn.Module):
    """A frozen Linear plus KAdaptation increments on row slices of its output.

    Args:
        base: the Linear to adapt; its ``weight`` and ``bias`` Parameters are taken over as
            they are (same objects, same names, so the backbone's state-dict keys are kept).
        targets: ``{name: (start, stop)}`` output-row slices, e.g. ``{"q": (0, d), "v": (2*d, 3*d)}``.
        n: Kronecker terms and the size of each ``A_i`` (n x n); must divide ``in_features``
            and every slice's rows.
        r: rank of each ``U_i @ V_i.T``.
        bias: add a trainable per-layer bias ``bias_<name>`` to each slice (zero at init).
        scale: the increment's scale ``s``.
        shared: module owning ``A_<name>`` for every target (normally one for the whole
            model), or None for the layer to own them.
        bank: a :class:`KAdaptationBank` (one per model) that builds this layer's increments
            together with every other layer's where the dense composition runs; None: the layer
            applies its own through ``kron_linear_slices``.

    Parameters per target: ``U_<name>: (n, rows/n, r)``, ``V_<name>: (n, in/n, r)``,
    ``bias_<name>: (rows,)`` if ``bias``, and ``A_<name>: (n, n, n)`` without ``shared``.
    """

    def __init__(
        self,
        base: nn.Linear,
        targets: Mapping[str, Tuple[int, int]],
        n: int = 32,
        r: int = 1,
        bias: bool = False,
        scale: float = 1.0,
        shared: Optional[nn.Module] = None,
        bank: Optional[KAdaptationBank] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        # everything is checked before any parameter is made: the shared validators for the
        # numbers (TypeError: wrong type; ValueError: out of range or not finite), then the slices
        n, r = check_int("n", n, min=1), check_int("r", r, min=1)
        bias = check_bool("bias", bias)
        scale = check_float("scale", scale)
        targets = check_targets(targets, base.in_features, base.out_features, n, r)
        if shared is not None:
            for name in targets:
                A = getattr(shared, f"A_{name}", None)
                if not isinstance(A, torch.Tensor):
                    raise ValueError(f"shared module has no tensor A_{name} for target {name!r}")
                if tuple(A.shape) != (n, n, n):
                    raise ValueError(f"the shared A_{name} must have shape ({n}, {n}, {n}), got {tuple(A.shape)}")
        self.targets = targets
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n, self.r, self.scale, self.has_bias = n, r, scale, bias
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # may be None (timm's qkv_bias=False)
        # the shared owner is held inside a tuple: nn.Module registers Module attributes, not tuples
        self._shared = (shared,) if shared is not None else None
        # pre-merge weight and bias (restored bitwise by unmerge); None while unmerged
        self.register_buffer("_premerge_weight", None, persistent=False)
        self.register_buffer("_premerge_bias", None, persistent=False)
        self._bias_added_by_merge = False

        factory = dict(device=base.weight.device, dtype=factor_dtype(base.weight))
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
        #: this module's own parameters that are adapter tensors (read by kk.adapter_state_dict)
        self.kk_adapter_params = tuple(names)
        self.reset_parameters()
        self._bank = None
        if bank is not None:
            if not isinstance(bank, KAdaptationBank):
                raise TypeError(f"bank must be a KAdaptationBank or None, got {type(bank).__name__}")
            bank.add(self)

    def reset_parameters(self) -> None:
        """``U ~ N(0, 1/r)``, ``V = 0``, bias 0; an owned ``A ~ N(0, 1/n)`` (module docstring)."""
        with torch.no_grad():
            for name in self.targets:
                if self._shared is None:
                    init_shared_factor(getattr(self, f"A_{name}"))
                getattr(self, f"U_{name}").normal_(0.0, 1.0 / math.sqrt(self.r))
                getattr(self, f"V_{name}").zero_()
                if self.has_bias:
                    getattr(self, f"bias_{name}").zero_()

    def factor_A(self, name: str) -> torch.Tensor:
        owner = self if self._shared is None else self._shared[0]
        return getattr(owner, f"A_{name}")

    def factors(self, name: str):
        """``(A, U, V)`` of target ``name``."""
        return self.factor_A(name), getattr(self, f"U_{name}"), getattr(self, f"V_{name}")

    @property
    def merged(self) -> bool:
        return self._premerge_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        bias = self.bias
        if self.has_bias:
            # the per-target trainable biases join the frozen bias (an O(out_features) vector)
            parts, row = [], 0
            for name, (start, stop) in self.targets.items():
                frozen = None if bias is None else bias[row:start]
                parts.append(frozen if frozen is not None else self.weight.new_zeros(start - row))
                extra = getattr(self, f"bias_{name}").to(self.weight.dtype)
                parts.append(extra if bias is None else bias[start:stop] + extra)
                row = stop
            parts.append(bias[row:] if bias is not None else self.weight.new_zeros(self.out_features - row))
            bias = torch.cat(parts)
        if self._bank is not None and not compiling() and kron_ops.dense_serves("kron_linear", x):
            # the increments from the model's bank (every layer's in one build): one GEMM on W + delta
            dtype = autocast_target(x) or x.dtype
            increments = [(start, self._bank[0].delta(self, name, dtype)) for name, (start, _) in self.targets.items()]
            return kron_ops.linear_with_increments(x, self.weight, bias, increments)
        # one frozen GEMM for every row and one Kronecker kernel per target, writing into its rows
        targets = [(start, *self.factors(name)) for name, (start, _) in self.targets.items()]
        return ops.kron_linear_slices(x, self.weight, bias, targets, scale=self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every increment (``kk.kron_delta``) into the frozen weight rows (and bias).

        The pre-merge weight and bias are kept so that :meth:`unmerge` restores them exactly;
        while merged, the forward is the plain Linear and the factors get no gradient.
        """
        if self.merged:
            raise ValueError("this KAdaptationLinear is already merged; unmerge it first")
        self._premerge_weight = self.weight.detach().clone()
        self._premerge_bias = None if self.bias is None else self.bias.detach().clone()
        if self.has_bias and self.bias is None:
            self.bias = nn.Parameter(
                torch.zeros(self.out_features, device=self.weight.device, dtype=self.weight.dtype),
                requires_grad=False,
            )
            self._bias_added_by_merge = True
        for name, (start, stop) in self.targets.items():
            delta = ops.kron_delta(*self.factors(name), scale=self.scale)
            self.weight[start:stop] += delta.to(self.weight.dtype)
            if self.has_bias:
                self.bias[start:stop] += getattr(self, f"bias_{name}").to(self.bias.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge weight and bias (copied back, not recomputed)."""
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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, targets=({targets}), "
            f"n={self.n}, r={self.r}, scale={self.scale:g}, bias={self.has_bias}, "
            f"shared_A={self._shared is not None}, merged={self.merged}"
        )
