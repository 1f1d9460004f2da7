"""What the model-level banks share (:class:`~kron_kernels.nn.PHMBank`, the FacT core bank of
:mod:`kron_kernels.nn.fact`): a parameter-only computation done once per forward pass for every
layer that needs it, kept while valid.

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
