"""Model-level banks: a parameter-only computation done once per forward pass for every layer
that needs it, kept while valid -- :class:`DeltaBank` (Kronecker increments sharing ``A``:
KAdaptation's, and Compacter's PHM weights through :class:`~kron_kernels.nn.PHMBank`) and the
FacT core bank of :mod:`kron_kernels.nn.fact`.

A built value is valid while the tensors it was computed from are unchanged (:func:`stamp`: the
same tensors, storage and version -- an in-place update such as an optimizer step or
``load_state_dict`` bumps the version; ``.to`` or ``load_state_dict(assign=True)`` gives new
storage or a new tensor), in the same grad mode, and while its autograd graph has not been
consumed: :func:`drop_when_consumed` removes it when the backward reaches it, so the next forward
builds again even where no parameter changed (gradient accumulation: each backward frees the
saved tensors of the graph it traverses).
"""
from __future__ import annotations

from typing import Dict, Hashable, Tuple

import torch


def stamp(*tensors: torch.Tensor) -> Tuple:
    """Identity, storage and version of each tensor: what a built value depends on."""
    return tuple(x for t in tensors for x in (id(t), t.data_ptr(), t._version))


def drop_when_consumed(out: torch.Tensor, store: Dict[Hashable, object], slot: Hashable, entry: object) -> None:
    """Remove ``store[slot]`` (if it is still ``entry``) once the backward computes the gradient
    of ``out`` -- a non-leaf result of the built value; a leaf or a result that needs no gradient
    has no graph to consume (nothing is registered)."""
    if out.grad_fn is None or not out.requires_grad:
        return

    def consumed(grad, store=store, slot=slot, entry=entry):
        if store.get(slot) is entry:
            del store[slot]

    out.register_hook(consumed)


class DeltaBank:
    """Kronecker increments of many layers whose terms share one ``A`` (KAdaptation's q and v
    increments of every block; Compacter's PHM weights), built together once per forward pass:
    per group -- one target name, one factor shape and scale -- one :func:`kron_kernels.kron_deltas`
    call (5 launches forward, 7 backward for all of the group) where each layer made its own.

    A member is a ``(module, name)`` pair whose ``module.factors(name)`` returns its
    ``(A, U, V)``; :meth:`delta` returns its increment (``scale * kron_delta(A, U, V)``) in a
    dtype, from the set built for its group -- valid while the member's factors are unchanged
    (:func:`stamp`), in one grad mode and dtype, until a backward consumes the set's graph
    (:func:`drop_when_consumed`). A group whose members do not share one ``A`` at build time is
    built member by member. Never saved: copies and pickles start with nothing built."""

    def __init__(self) -> None:
        self._groups: Dict[Hashable, list] = {}  # group key -> [(module, name, scale)]
        self._built: Dict[Hashable, tuple] = {}
        self._where = None  # (id(module), name) -> (group key, index), rebuilt after a copy

    def _add(self, module, name: str, scale: float) -> None:
        A, U, V = module.factors(name)
        key = (name, tuple(U.shape), tuple(V.shape), float(scale))
        self._groups.setdefault(key, []).append((module, name, float(scale)))
        self._where = None

    def _index(self, module, name: str):
        if self._where is None:
            self._where = {(id(m), n): (key, i) for key, members in self._groups.items()
                           for i, (m, n, _) in enumerate(members)}
        return self._where[(id(module), name)]

    def delta(self, module, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The member's increment in ``dtype`` (rounded once from the factors' precision)."""
        key, index = self._index(module, name)
        slot = (key, dtype, torch.is_grad_enabled())
        built = self._built.get(slot)
        if built is None or built[1][index] != stamp(*module.factors(name)):
            built = self._build(slot)
        return built[0][index]

    def _build(self, slot):
        from .. import ops  # the op layer imports nothing of nn; imported here, on first use

        key, dtype, _ = slot
        members = self._groups[key]
        factors = [m.factors(n) for m, n, _ in members]
        scale = members[0][2]
        A = factors[0][0]
        if all(f[0] is A for f in factors):
            deltas = ops.kron_deltas(A, [f[1] for f in factors], [f[2] for f in factors], scale, dtype=dtype)
        else:
            deltas = tuple(ops.kron_delta(*f, scale, dtype=dtype) for f in factors)
        built = (deltas, [stamp(*f) for f in factors])
        self._built[slot] = built
        stacked = getattr(deltas[0], "kk_stacked", None)  # the (K, out, in) tensor they are views of
        for out in (deltas if stacked is None else (stacked,)):
            drop_when_consumed(out, self._built, slot, built)
        return built

    def __len__(self) -> int:
        return sum(len(members) for members in self._groups.values())

    def __deepcopy__(self, memo):
        import copy

        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for attr, value in self.__dict__.items():
            setattr(clone, attr, copy.deepcopy(value, memo) if attr not in ("_built", "_where") else None)
        clone._built = {}
        return clone

    def __getstate__(self):
        return {**self.__dict__, "_built": {}, "_where": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} increments in {len(self._groups)} groups)"
