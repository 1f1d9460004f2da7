"""Compacter: PHM layers and the sequential bottleneck adapter (DESIGN.md 4.1).

A PHM layer's weight is ``sum_i kron(A_i, s_i t_i^T)`` (rank-one "LPHM" fast weights
``s: (n, out/n, 1)``, ``t: (n, in/n, 1)``) plus a bias; it is built with
:func:`kron_kernels.kron_delta` -- for the adapter's d x k and k x d layers the weight is
small, and one dense GEMM beats the structured product. The adapter
``h + up(GELU(down(h)))`` computes both weights and runs them through
:func:`kron_kernels.ops.bottleneck_adapter`, one fused kernel on GPU that keeps the
k-dim intermediate on chip.

``A: (n, n, n)`` is one set shared by every PHM layer of a model: pass the Parameter, or
the module that owns it as ``A`` (looked up on every call, so it survives
``load_state_dict(assign=True)``); it is not registered by the layers that borrow it.

Initialisation: ``A ~ N(0, 1/n)``, ``s ~ N(0, 1)``, ``t ~ N(0, 1/in)`` so that the PHM weight
has entries of variance ``1/in`` (as a fan-in initialised Linear); biases 0; and the up
layer's ``s = 0``, which makes the adapter exactly the identity at step 0. The first
backward reaches ``up.s`` and ``up.bias``; from the second step on every factor gets a gradient.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend, ops
from ..ops._common import autocast_target, check_bool, check_int, compiling
from ._bank import DeltaBank
from .kadaptation import init_shared_factor

__all__ = ["PHMLinear", "PHMBank", "CompacterAdapter", "AdapterWrapper"]

SharedA = Union[None, nn.Parameter, nn.Module]

_MERGE_ERROR = (
    "Compacter adapters cannot be merged into the frozen weights: the GELU between the down "
    "and up projections makes the adapter nonlinear"
)


def _check_phm_dims(in_features: int, out_features: int, n: int, names=("in_features", "out_features")):
    """``(in_features, out_features, n)`` as ints, checked by the shared validators (positive
    ints: TypeError / ValueError naming the argument), then that ``n`` divides both sizes;
    ``names`` are the caller's names for the two sizes (the adapter's ``d`` and ``k``)."""
    sizes = [check_int(name, size, min=1) for name, size in zip(names, (in_features, out_features))]
    n = check_int("n", n, min=1)
    for name, size in zip(names, sizes):
        if size % n:
            raise ValueError(f"n={n} must divide {name}={size}")
    return sizes[0], sizes[1], n


# The backends under which a PHMBank builds its layers' weights (kk.kron_deltas: batched torch
# GEMMs, cuBLAS on a GPU). auto takes it on CUDA too, over the per-layer Triton kron_delta
# kernel: no GPU has timed the two, and issue 10's rule for an unmeasured choice is the cuBLAS
# composition; it also makes ~310 fewer launches a ViT-B step, where the H200's Compacter step
# (commit 93d8659) was bound by its 1,664 launches. An explicit "triton" (or "cuda") keeps
# every layer on its own kron_delta, so those kernels stay measurable.
_BANK_BACKENDS = ("auto", "torch", "dense")


class PHMBank(DeltaBank):
    """The weights of every PHM layer registered with it -- one model's, sharing one ``A`` --
    built together (:class:`~kron_kernels.nn._bank.DeltaBank`): per factor shape and dtype one
    :func:`kron_kernels.kron_deltas` call (five launches forward, seven backward, for all of
    them) where each layer's own :func:`kron_kernels.kron_delta` made one forward and six
    backward (a ViT-B Compacter has 48 PHM layers: 48 + 288 launches a step become 10 + 14; on
    the H200 the Compacter step was bound by the host's launches, commit 93d8659).
    ``kk.adapt(model, "compacter")`` makes one per model.

    A built set is reused while it is valid for the layer asking: the same autocast dtype and
    grad mode, the layer's A, s and t unchanged, and its autograd graph not yet consumed -- the
    backward that reaches it drops it, so the next forward builds again even when no parameter
    changed (gradient accumulation). Under ``torch.compile`` the layers build their own weights
    (the bank is Python state Dynamo should not trace). Never saved: copies and pickles of a
    model get an empty bank."""

    def __init__(self) -> None:
        super().__init__()
        self._A: Optional[torch.Tensor] = None  # the A every layer shares (checked as they join)

    def add(self, *layers: "PHMLinear") -> None:
        """Register ``layers`` (each one's ``s``/``t`` shapes pick its group); all are checked
        before any is registered."""
        A = self._A if self._A is not None else (layers[0].phm_rule if layers else None)
        for layer in layers:
            if not isinstance(layer, PHMLinear):
                raise TypeError(f"a PHMBank holds PHMLinear layers, got {type(layer).__name__}")
            if layer._bank is not None:
                raise ValueError("this PHMLinear is registered with a PHMBank already")
            if layer.phm_rule is not A:
                raise ValueError("every PHM layer of a PHMBank must share one A")
        self._A = A
        for layer in layers:
            self._add(layer, "phm", 1.0)
            layer._bank = (self,)

    def weight(self, layer: "PHMLinear", dtype: torch.dtype) -> torch.Tensor:
        """``layer``'s weight in ``dtype``, from the set built for its group (built now if none
        is valid for it)."""
        return self.delta(layer, "phm", dtype)

    def __repr__(self) -> str:
        return f"PHMBank({len(self)} layers in {len(self._groups)} shape groups)"


class PHMLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W = sum_i kron(A_i, s_i t_i^T)``.

    Args:
        in_features, out_features: the layer's sizes; ``n`` must divide both.
        n: number of Kronecker terms and the size of each ``A_i``.
        A: None to own ``A: (n, n, n)``; a shared ``nn.Parameter``; or the ``nn.Module``
            that owns the shared Parameter as its attribute ``A``.
        bias: add a bias (zero at init).
        device, dtype: of the factors (float32 by default).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 4,
        A: SharedA = None,
        bias: bool = True,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        in_features, out_features, n = _check_phm_dims(in_features, out_features, n)
        bias = check_bool("bias", bias)
        self.in_features, self.out_features, self.n = in_features, out_features, n
        factory = dict(device=device, dtype=dtype or torch.float32)
        names = []
        if A is None:
            self.A = nn.Parameter(torch.empty(n, n, n, **factory))
            names.append("A")
            self._shared = None
        else:
            shared = A if isinstance(A, torch.Tensor) else getattr(A, "A", None)
            if not isinstance(A, (torch.Tensor, nn.Module)) or not isinstance(shared, torch.Tensor):
                raise TypeError("A must be None, a Parameter, or a module owning a Parameter named 'A'")
            if tuple(shared.shape) != (n, n, n):
                raise ValueError(f"the shared A must have shape ({n}, {n}, {n}), got {tuple(shared.shape)}")
            self._shared = (A,)  # a tuple: nn.Module registers Parameter/Module attributes, not tuples
        self.s = nn.Parameter(torch.empty(n, out_features // n, 1, **factory))
        self.t = nn.Parameter(torch.empty(n, in_features // n, 1, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        names += ["s", "t"] + (["bias"] if bias else [])
        #: this module's own parameters that are adapter tensors (read by kk.adapter_state_dict)
        self.kk_adapter_params = tuple(names)
        self._bank = None  # (PHMBank,) once registered with a bank
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """An owned ``A ~ N(0, 1/n)``; ``s ~ N(0, 1)``; ``t ~ N(0, 1/in)``; bias 0."""
        with torch.no_grad():
            if self._shared is None:
                init_shared_factor(self.A)
            self.s.normal_(0.0, 1.0)
            self.t.normal_(0.0, 1.0 / math.sqrt(self.in_features))
            if self.bias is not None:
                self.bias.zero_()

    @property
    def phm_rule(self) -> torch.Tensor:
        """The (possibly shared) ``A: (n, n, n)``."""
        if self._shared is None:
            return self.A
        owner = self._shared[0]
        return owner if isinstance(owner, torch.Tensor) else owner.A

    @property
    def weight(self) -> torch.Tensor:
        """``sum_i kron(A_i, s_i t_i^T)``, ``(out_features, in_features)``, differentiable."""
        return ops.kron_delta(self.phm_rule, self.s, self.t)

    def factors(self, name: str = "phm"):
        """``(A, s, t)``: the weight is ``kron_delta(A, s, t)`` (a :class:`PHMBank` member)."""
        return self.phm_rule, self.s, self.t

    def phm_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight in ``dtype`` (None: the factors'), built in the factors' precision and
        rounded once as it is stored: from this layer's :class:`PHMBank` when it has one (every
        layer of the bank at once), else by :func:`kron_kernels.kron_delta`."""
        if self._bank is not None and not compiling() and backend.get_backend() in _BANK_BACKENDS:
            return self._bank[0].weight(self, dtype or self.s.dtype)
        return ops.kron_delta(self.phm_rule, self.s, self.t, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight is built in the factors' precision and delivered in the dtype it is applied
        # in (the autocast dtype under autocast, else x's): rounded once, no conversion launch
        dtype = autocast_target(x) or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.phm_weight(dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, "
            f"bias={self.bias is not None}, shared_A={self._shared is not None}"
        )


class CompacterAdapter(nn.Module):
    """``h + up(GELU(down(h)))`` with PHM ``down`` (d -> k) and ``up`` (k -> d) sharing one ``A``.

    Args:
        d: hidden size; k: bottleneck size (default ``d // 32``); ``n`` must divide both.
        n: Kronecker terms.
        A: None (the adapter owns ``A``, shared by its two layers), a shared Parameter, or
            the module owning it as ``A`` (see :class:`PHMLinear`).
        bank: a :class:`PHMBank` (one per model, sharing ``A``) that builds this adapter's PHM
            weights together with every other adapter's; None: each layer builds its own.

    Starts as the exact identity (``up.s = 0``, ``up.bias = 0``).
    """

    def __init__(
        self, d: int, k: Optional[int] = None, n: int = 4, A: SharedA = None, device=None, dtype=None,
        bank: Optional[PHMBank] = None,
    ) -> None:
        super().__init__()
        d = check_int("d", d, min=1)
        if k is None:
            k = d // 32
            if k < 1:
                raise ValueError(f"k must be a positive int or None (None: d // 32), got None and d // 32 = 0 "
                                 f"for d={d}: pass the bottleneck size k")
        else:
            k = check_int("k", k, min=1, desc="a positive int or None (None: d // 32)")
        d, k, n = _check_phm_dims(d, k, n, names=("d", "k"))
        if bank is not None and not isinstance(bank, PHMBank):
            raise TypeError(f"bank must be a PHMBank or None, got {type(bank).__name__}")
        if bank is not None and A is None:
            raise ValueError("a PHMBank serves adapters that share one A: pass A (the shared Parameter or its owner)")
        factory = dict(device=device, dtype=dtype or torch.float32)
        if A is None:
            self.A = nn.Parameter(init_shared_factor(torch.empty(n, n, n, **factory)))
            self.kk_adapter_params = ("A",)
            A = self
        else:
            self.kk_adapter_params = ()
        self.d, self.k, self.n = d, k, n
        self.down = PHMLinear(d, k, n, A=A, **factory)
        self.up = PHMLinear(k, d, n, A=A, **factory)
        with torch.no_grad():
            self.up.s.zero_()
        if bank is not None:
            bank.add(self.down, self.up)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # the PHM weights delivered in the dtype the adapter's GEMMs run in (autocast's; on the
        # H200 the Compacter step was host-bound at 1,664 launches: these save four per adapter)
        dtype = autocast_target(h)
        w_down = self.down.phm_weight(dtype)  # (k, d)
        w_up = self.up.phm_weight(dtype)  # (d, k)
        return ops.bottleneck_adapter(h, w_down, self.down.bias, w_up, self.up.bias)

    def merge(self) -> None:
        raise ValueError(_MERGE_ERROR)

    unmerge = merge

    @property
    def merged(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, n={self.n}, shared_A={not self.kk_adapter_params}"


class AdapterWrapper(nn.Module):
    """``adapter(base(*args, **kwargs))``: an adapter on a submodule's output.

    Every positional and keyword argument reaches ``base`` unchanged (timm's blocks call
    ``attn(x, attn_mask=..., is_causal=...)``). Attributes the wrapper does not have are
    read from ``base`` (``wrapped.num_heads``, ``wrapped.qkv``, ...).
    """

    def __init__(self, base: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.adapter(self.base(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapter", "_modules"):
                raise
            return getattr(self._modules["base"], name)
