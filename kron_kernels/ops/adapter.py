"""The Compacter bottleneck adapter, fused: ``h + GELU(h @ w_down.T + b_down) @ w_up.T + b_up``
(DESIGN.md 4.1, Compacter; exact erf GELU).

``w_down: (k, d)`` and ``w_up: (d, k)`` are the (small, trainable) down and up projections --
in Compacter the PHM weights built by :func:`kron_kernels.kron_delta` -- with ``k = d/32``
typically. The adapter is one instance of the low-rank bottleneck family
(``ops/bottleneck.py``, DESIGN.md 4.5): down-projection ``D = W_d^T`` with the bias ``b_d``,
GELU middle, up-projection ``W_u``, output bias ``b_u``, residual ``h``, scale 1. Its torch and
Triton backends are that family's (one autograd Function, the same fused kernels as ARC and
the LoSA mixer: ``triton/bottleneck.py``); the backward needs only ``h`` and the weights
(``z = h W_d^T + b_d`` is recomputed, not saved). ``auto`` on CUDA takes the dense composition
below.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend
from ._common import autocast_target, check_tensor, compute_dtype
from .bottleneck import _TRITON_REFUSES_FP64, _Spec, _apply_bottleneck, _data_dtype

__all__ = ["bottleneck_adapter"]


# ``auto`` on CUDA (DESIGN.md 5), with the measurement behind it: on the H200 (commit 349dfe8,
# shared/gpu/2026-11-27-H200; ViT-B/16, batch 64, bf16 autocast) the Compacter step with the
# Triton adapter took 90.6 ms against the reference's 68.8 ms (two nn.Linear cuBLAS GEMMs;
# 0.76x), the adapter forward moving 4-11% of torch.clone's bandwidth -> the dense composition
# until a GPU measurement of the Triton kernels says otherwise.
_CUDA_AUTO = "dense"


def _dense_adapter(h2, w_down, b_down, w_up, b_up, autocast_to):
    """Two dense GEMMs in plain autograd, in the autocast dtype under autocast (else ``h``'s),
    as the reference's two ``nn.Linear`` calls run, each bias in its GEMM's epilogue; the
    residual keeps ``h``'s dtype."""
    proj = h2.dtype if autocast_to is None else autocast_to
    w_down, b_down, w_up, b_up = (None if t is None else t.to(proj) for t in (w_down, b_down, w_up, b_up))
    # the residual add promotes (no separate cast: each launch counts, the H200 steps were
    # host-bound at commit 93d8659)
    out = h2 + F.linear(F.gelu(F.linear(h2.to(proj), w_down, b_down)), w_up, b_up)
    return out if out.dtype == h2.dtype else out.to(h2.dtype)


# ----------------------------------------------------------------------------------------
# public functional API
# ----------------------------------------------------------------------------------------
def _check_inputs(h, w_down, b_down, w_up, b_up) -> None:
    check_tensor("h", h, min_ndim=1)
    check_tensor("w_down", w_down, ndim=2, device=h.device)
    check_tensor("w_up", w_up, ndim=2, device=h.device)
    k, d = w_down.shape
    if k < 1 or d < 1:
        raise ValueError(f"w_down must have shape (k, d) with k, d >= 1, got {tuple(w_down.shape)}")
    if h.shape[-1] != d:
        raise ValueError(
            f"h's last dim must be d = {d} (w_down has shape (k, d) = {tuple(w_down.shape)}), "
            f"got h of shape {tuple(h.shape)}"
        )
    if tuple(w_up.shape) != (d, k):
        raise ValueError(
            f"w_up must have shape (d, k) = ({d}, {k}) to match w_down {tuple(w_down.shape)}, got {tuple(w_up.shape)}"
        )
    if b_down is not None:
        check_tensor("b_down", b_down, ndim=1, device=h.device)
        if b_down.shape[0] != k:
            raise ValueError(f"b_down must have shape (k,) = ({k},), got {tuple(b_down.shape)}")
    if b_up is not None:
        check_tensor("b_up", b_up, ndim=1, device=h.device)
        if b_up.shape[0] != d:
            raise ValueError(f"b_up must have shape (d,) = ({d},), got {tuple(b_up.shape)}")


def bottleneck_adapter(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
) -> torch.Tensor:
    """``h + GELU(h @ w_down.T + b_down) @ w_up.T + b_up`` (exact GELU), fused.

    ``h: (..., d)`` of any strides; ``w_down: (k, d)``, ``w_up: (d, k)``, biases ``(k,)``,
    ``(d,)`` or None. Accumulates in fp32 (fp64 for fp64 ``h`` on the torch backend); the
    result has ``h``'s dtype, the weight gradients their weights' dtypes. The k-dim
    intermediate never reaches memory on the Triton backend. Under autocast the projections
    run at the autocast precision (the dense composition's GEMMs, as two ``nn.Linear`` calls
    would; the Triton kernels' dots as TF32 for bf16, 3xTF32 for fp16; the structured torch
    backend keeps fp32), while the residual keeps ``h``'s dtype, as the reference's
    ``h + up(...)`` does.
    """
    _check_inputs(h, w_down, b_down, w_up, b_up)
    refuses = _TRITON_REFUSES_FP64 if h.dtype == torch.float64 else None
    impl = backend.select("bottleneck_adapter", h.device, triton_refuses=refuses, dense=True, cuda_auto=_CUDA_AUTO)
    lead, d = h.shape[:-1], h.shape[-1]
    h2 = h.reshape(-1, d)  # a view whenever the batch dims collapse; the kernels take any 2-D strides
    if impl == "dense":
        autocast_to = autocast_target(h)
        with torch.autocast(device_type=h.device.type, enabled=False):
            out2 = _dense_adapter(h2, w_down, b_down, w_up, b_up, autocast_to)
        return out2.reshape(*lead, d)
    spec = _Spec("channel", "gelu", True, 0.0, 0, _data_dtype(h))
    one = torch.ones((), dtype=compute_dtype(h.dtype), device=h.device)
    with torch.autocast(device_type=h.device.type, enabled=False):
        # D = W_d^T and Up^T = W_u^T as views: autograd hands each gradient back in its weight's layout
        out2 = _apply_bottleneck(h2, None, w_down.t(), w_up.t(), None, one, b_up, spec, impl, down_bias=b_down)
    return out2.reshape(*lead, d)
