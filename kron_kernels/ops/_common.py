"""Input checks, dtype rules and the operand-layout rule shared by the op families."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Raise a TypeError/ValueError naming ``name`` unless ``t`` is a tensor of the right kind."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs must share a device)")
    return t


def check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a Python number, not a tensor")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}") from None
    return value


def as_kernel_operand(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` as the Triton kernels may index it: contiguous (None stays None).

    The kernels index 1-D vectors and factor tensors (biases, ``A``/``U``/``V``, weights
    that are read through a bare pointer) as contiguous; only activations get their strides
    passed. A non-contiguous or expanded (stride-0) operand is therefore copied once here,
    by the op, before it reaches a launcher -- never indexed through a pointer as if it were
    dense, which reads the wrong elements (out of bounds on a GPU). These operands are
    O(d) or O(factor) in size, so the copy is negligible; it is a ``.contiguous()`` in the
    autograd graph, so gradients still reach the caller's tensor."""
    if t is None or t.is_contiguous():
        return t
    return t.contiguous()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``'s type, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
