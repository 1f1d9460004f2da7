"""The Compacter bottleneck adapter, fused: ``h + GELU(h @ w_down.T + b_down) @ w_up.T + b_up``
(DESIGN.md 4.1, Compacter; exact erf GELU).

``w_down: (k, d)`` and ``w_up: (d, k)`` are the (small, trainable) down and up projections --
in Compacter the PHM weights built by :func:`kron_kernels.kron_delta` -- with ``k = d/32``
typically. The backward needs only ``h`` and the weights: with ``z = h W_d^T + b_d``,
``g = GELU(z)`` and ``dz = (dout W_u) * GELU'(z)``, ``GELU'(z) = Phi(z) + z phi(z)``,

    dh = dout + dz W_d,   dW_u = dout^T g,   db_u = sum dout,   dW_d = dz^T h,   db_d = sum dz,

so ``z`` is recomputed from ``h`` instead of being saved (it costs one more ``N x d x k``
product, which the Triton backward fuses into the pass over ``h`` it makes anyway).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import backend
from ._common import autocast_target, check_tensor, compiling, compute_dtype, grad_like

__all__ = ["bottleneck_adapter", "BottleneckAdapterFunction"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """``d/dz [z Phi(z)] = Phi(z) + z phi(z)`` for the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    return cdf.add_(z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI)


# ----------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------
def _torch_forward(h2, w_down, b_down, w_up, b_up, autocast_to):
    """Projections in the accumulation dtype, or, under autocast, in the autocast dtype as the
    two ``nn.Linear`` calls would run; the residual and the result keep ``h``'s dtype."""
    acc = compute_dtype(h2.dtype)
    proj = acc if autocast_to is None else autocast_to
    w_down, b_down, w_up, b_up = (None if t is None else t.to(proj) for t in (w_down, b_down, w_up, b_up))
    g = F.gelu(F.linear(h2.to(proj), w_down, b_down))
    return F.linear(g, w_up, b_up).to(acc).add_(h2).to(h2.dtype)


def _torch_backward(dout2, h2, w_down, b_down, w_up, need_dh: bool, need_dw: bool):
    """``(dh, dw_down, db_down, dw_up, db_up)`` in the accumulation dtype (None where not needed)."""
    acc = compute_dtype(h2.dtype)
    h, dout = h2.to(acc), dout2.to(acc)
    w_down, w_up = w_down.to(acc), w_up.to(acc)
    z = F.linear(h, w_down, None if b_down is None else b_down.to(acc))
    dz = (dout @ w_up).mul_(_gelu_grad(z))
    dh = torch.addmm(dout, dz, w_down) if need_dh else None
    if not need_dw:
        return dh, None, None, None, None
    g = F.gelu(z)
    return dh, dz.t() @ h, dz.sum(0), dout.t() @ g, dout.sum(0)


# ----------------------------------------------------------------------------------------
# dense backend: the reference's composition
# ----------------------------------------------------------------------------------------
# ``auto`` on CUDA (DESIGN.md 5), with the measurement behind it: on the H200 (commit 349dfe8,
# shared/gpu/2026-11-27-H200; ViT-B/16, batch 64, bf16 autocast) the Compacter step with the
# Triton adapter took 90.6 ms against the reference's 68.8 ms (two nn.Linear cuBLAS GEMMs;
# 0.76x), the adapter forward moving 4-11% of torch.clone's bandwidth -> the dense composition
# until a GPU measurement of the Triton kernels says otherwise.
_CUDA_AUTO = "dense"


def _dense_adapter(h2, w_down, b_down, w_up, b_up, autocast_to):
    """Two dense GEMMs in plain autograd, in the autocast dtype under autocast (else ``h``'s),
    as the reference's two ``nn.Linear`` calls run; the residual keeps ``h``'s dtype."""
    proj = h2.dtype if autocast_to is None else autocast_to
    w_down, b_down, w_up, b_up = (None if t is None else t.to(proj) for t in (w_down, b_down, w_up, b_up))
    # the residual add promotes (no separate cast: each launch counts, the H200 steps were
    # host-bound at commit 93d8659)
    out = h2 + F.linear(F.gelu(F.linear(h2.to(proj), w_down, b_down)), w_up, b_up)
    return out if out.dtype == h2.dtype else out.to(h2.dtype)


# ----------------------------------------------------------------------------------------
# autograd Function (thin: dispatch to a backend's forward/backward)
# ----------------------------------------------------------------------------------------
def _triton_adapter():
    from ..triton import adapter as triton_adapter  # imported on first use: never at package import

    return triton_adapter


def _data_dtype(h2, autocast_to) -> torch.dtype:
    """The precision the adapter's data carry: the autocast dtype, else ``h``'s."""
    return h2.dtype if autocast_to is None else autocast_to


def _adapter_forward(h2, w_down, b_down, w_up, b_up, autocast_to, impl):
    """The forward of :class:`BottleneckAdapterFunction` and of the custom op."""
    if impl == "triton":
        return _triton_adapter().bottleneck_adapter_forward(
            h2, w_down, b_down, w_up, b_up, _data_dtype(h2, autocast_to)
        )
    return _torch_forward(h2, w_down, b_down, w_up, b_up, autocast_to)


def _adapter_backward(dout2, h2, w_down, b_down, w_up, b_up_dtype, autocast_to, impl, needs):
    """``[dh, dw_down, db_down, dw_up, db_up]`` (None where ``needs`` is False), each in its
    input's dtype, the weights' in their strides (see grad_like)."""
    need_dh, need_dw = needs[0], any(needs[1:5])
    if impl == "triton":
        dh, dw_down, db_down, dw_up, db_up = _triton_adapter().bottleneck_adapter_backward(
            dout2, h2, w_down, b_down, w_up, _data_dtype(h2, autocast_to), need_dh, need_dw
        )
    else:
        dh, dw_down, db_down, dw_up, db_up = _torch_backward(dout2, h2, w_down, b_down, w_up, need_dh, need_dw)
    return [
        dh.to(h2.dtype) if needs[0] else None,
        grad_like(dw_down, w_down) if needs[1] else None,
        grad_like(db_down, b_down) if needs[2] else None,
        grad_like(dw_up, w_up) if needs[3] else None,
        db_up.to(b_up_dtype) if needs[4] else None,
    ]


class BottleneckAdapterFunction(torch.autograd.Function):
    """The adapter on 2-D ``h2 (N, d)``; ``b_down``/``b_up`` may be None.

    ``autocast_to`` is the autocast dtype in force at the call (None outside autocast): the
    projections then run at that precision (the Triton kernels' dots: TF32 for bf16, 3xTF32
    for fp16).
    """

    @staticmethod
    def forward(ctx, h2, w_down, b_down, w_up, b_up, autocast_to, impl):
        ctx.save_for_backward(h2, w_down, b_down, w_up)
        ctx.impl, ctx.autocast_to = impl, autocast_to
        ctx.b_up_dtype = None if b_up is None else b_up.dtype
        return _adapter_forward(h2, w_down, b_down, w_up, b_up, autocast_to, impl)

    @staticmethod
    def backward(ctx, dout2):
        h2, w_down, b_down, w_up = ctx.saved_tensors
        grads = _adapter_backward(
            dout2, h2, w_down, b_down, w_up, ctx.b_up_dtype, ctx.autocast_to, ctx.impl, ctx.needs_input_grad[:5]
        )
        return (*grads, None, None)


# the same computation as PyTorch custom ops, for torch.compile (see ops._common.compiling)
@torch.library.custom_op("kron_kernels::bottleneck_adapter", mutates_args=())
def _adapter_op(
    h2: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
    b_up: Optional[torch.Tensor], autocast_to: Optional[torch.dtype], impl: str,
) -> torch.Tensor:
    return _adapter_forward(h2, w_down, b_down, w_up, b_up, autocast_to, impl)


@_adapter_op.register_fake
def _(h2, w_down, b_down, w_up, b_up, autocast_to, impl):
    return h2.new_empty(h2.shape)


@torch.library.custom_op("kron_kernels::bottleneck_adapter_backward", mutates_args=())
def _adapter_backward_op(
    dout2: torch.Tensor, h2: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor],
    w_up: torch.Tensor, b_up_dtype: Optional[torch.dtype], autocast_to: Optional[torch.dtype], impl: str,
    needs: List[bool],
) -> List[torch.Tensor]:
    """The gradients ``needs`` asks for, in the order ``[dh, dw_down, db_down, dw_up, db_up]``."""
    grads = _adapter_backward(dout2, h2, w_down, b_down, w_up, b_up_dtype, autocast_to, impl, needs)
    return [g for g in grads if g is not None]


@_adapter_backward_op.register_fake
def _(dout2, h2, w_down, b_down, w_up, b_up_dtype, autocast_to, impl, needs):
    likes = [h2.new_empty(h2.shape), w_down, b_down, w_up, dout2.new_empty(dout2.shape[1:], dtype=b_up_dtype)]
    return [torch.empty_like(like) for like, needed in zip(likes, needs) if needed]


def _adapter_setup(ctx, inputs, output):
    h2, w_down, b_down, w_up, b_up, autocast_to, impl = inputs
    ctx.save_for_backward(h2, w_down, b_down, w_up)
    ctx.impl, ctx.autocast_to = impl, autocast_to
    ctx.b_up_dtype = None if b_up is None else b_up.dtype


def _adapter_autograd(ctx, dout2):
    h2, w_down, b_down, w_up = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [bool(need[0]), bool(need[1]), b_down is not None and bool(need[2]), bool(need[3]),
             ctx.b_up_dtype is not None and bool(need[4])]
    grads = iter(_adapter_backward_op(dout2, h2, w_down, b_down, w_up, ctx.b_up_dtype, ctx.autocast_to,
                                      ctx.impl, needs))
    return (*[next(grads) if needed else None for needed in needs], None, None)


_adapter_op.register_autograd(_adapter_autograd, setup_context=_adapter_setup)


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
    ``(d,)`` or None. Accumulates in fp32 (fp64 for fp64 ``h``); the result has ``h``'s dtype,
    the weight gradients their weights' dtypes. The k-dim intermediate never reaches memory
    on the Triton backend. Under autocast the projections run at the autocast precision, as
    two ``nn.Linear`` calls would, while the residual keeps ``h``'s dtype, as the reference's
    ``h + up(...)`` does.
    """
    _check_inputs(h, w_down, b_down, w_up, b_up)
    autocast_to = autocast_target(h)
    impl = backend.select("bottleneck_adapter", h.device, dense=True, cuda_auto=_CUDA_AUTO)
    lead, d = h.shape[:-1], h.shape[-1]
    h2 = h.reshape(-1, d)  # a view whenever the batch dims collapse; the kernels take any 2-D strides
    with torch.autocast(device_type=h.device.type, enabled=False):
        if impl == "dense":
            out2 = _dense_adapter(h2, w_down, b_down, w_up, b_up, autocast_to)
        elif compiling():
            out2 = _adapter_op(h2, w_down, b_down, w_up, b_up, autocast_to, impl)
        else:
            out2 = BottleneckAdapterFunction.apply(h2, w_down, b_down, w_up, b_up, autocast_to, impl)
    return out2.reshape(*lead, d)
