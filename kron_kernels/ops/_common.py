"""Input checks, dtype rules, the operand- and gradient-layout rules, and the torch.compile
rule shared by the op families."""
from __future__ import annotations

import math
import numbers
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


def check_scale(scale, name: str = "scale") -> float:
    """``scale`` as a finite Python float, or a TypeError/ValueError naming ``name``: a tensor,
    a bool or a string is not a number, and an infinite or NaN scale only yields NaN."""
    if isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, not a tensor")
    if isinstance(scale, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# ----------------------------------------------------------------------------------------
# numeric hyperparameters: one shared set of validators (TypeError for a value that is not
# a number of the right kind -- a bool, a string, a tensor, None, 0.5 as a count --,
# ValueError for one out of range or not finite; both name the argument)
# ----------------------------------------------------------------------------------------
def _not_a_number(value) -> bool:
    return isinstance(value, (bool, str, bytes, torch.Tensor)) or not isinstance(value, numbers.Real)


def check_int(name: str, value, *, min: Optional[int] = None, max: Optional[int] = None,
              desc: Optional[str] = None) -> int:
    """``value`` as a Python int in ``[min, max]`` (either bound optional), or a TypeError
    (not an integer: a bool, a float such as ``1.5`` or ``2.0``, a string, a tensor) /
    ValueError (out of range) naming ``name``. ``desc`` replaces the default wording of
    what is expected ("a positive int", "an int in [0, 7]", ...)."""
    if desc is None:
        if min == 1 and max is None:
            desc = "a positive int"
        elif min == 0 and max is None:
            desc = "a non-negative int"
        elif min is not None and max is not None:
            desc = f"an int in [{min}, {max}]"
        elif min is not None:
            desc = f"an int >= {min}"
        elif max is not None:
            desc = f"an int <= {max}"
        else:
            desc = "an int"
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {desc}, got {type(value).__name__} {value!r}")
    value = int(value)
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name} must be {desc}, got {value!r}")
    return value


def check_float(name: str, value, *, min: Optional[float] = None, max: Optional[float] = None,
                min_open: bool = False, max_open: bool = False, finite: bool = True) -> float:
    """``value`` (an int or a float, not a bool/str/tensor) as a Python float, finite unless
    ``finite=False`` (NaN is always refused), within ``min``/``max`` (open bounds with
    ``min_open``/``max_open``); else a TypeError/ValueError naming ``name``."""
    fin = "finite " if finite else ""
    if min is not None and max is not None:
        desc = f"a {fin}number in {'(' if min_open else '['}{min:g}, {max:g}{')' if max_open else ']'}"
    elif min is not None:
        desc = f"a {fin}number {'>' if min_open else '>='} {min:g}"
    elif max is not None:
        desc = f"a {fin}number {'<' if max_open else '<='} {max:g}"
    else:
        desc = f"a {fin}number"
    if min is not None and max is not None:  # a bounded range is finite: "must be in [0, 1)"
        desc = desc.split(" number ", 1)[1]
    if _not_a_number(value):
        raise TypeError(f"{name} must be {desc}, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (finite and not math.isfinite(v)):
        raise ValueError(f"{name} must be {desc}, got {v}")
    if min is not None and (v < min or (min_open and v == min)):
        raise ValueError(f"{name} must be {desc}, got {v}")
    if max is not None and (v > max or (max_open and v == max)):
        raise ValueError(f"{name} must be {desc}, got {v}")
    return v


def check_probability(name: str, value, *, max_open: bool = False) -> float:
    """``value`` as a float in ``[0, 1]`` (``[0, 1)`` with ``max_open``, e.g. a dropout
    probability), or a TypeError/ValueError naming ``name``."""
    return check_float(name, value, min=0.0, max=1.0, max_open=max_open)


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (a flag), else a TypeError naming ``name``: ``"no"``, ``0``
    or ``None`` are not flags."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
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


def grad_like(grad: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``grad`` in ``like``'s dtype *and strides*: what an autograd Function returns for the
    parameter-like input ``like`` (a factor, weight, bias, diagonal or scale; None stays None).

    Backward code computes factor gradients in whatever layout its GEMMs leave them -- e.g.
    the rank-major ``(m, r, k)`` result viewed as ``(m, k, r)`` through a transpose, or a
    Triton launcher's buffer. A gradient with other strides than its parameter is copied
    again by ``AccumulateGrad`` (when a dim of size > 1 differs) or, when only the strides of
    size-1 dims differ (a ``(32, 8, 1)`` factor receiving strides ``(8, 1, 8)``), is kept as
    ``.grad`` and then copied by ``DistributedDataParallel`` into its bucket on every step,
    with the warning "Grad strides do not match bucket view strides". So the layout is fixed
    here, once, and only when it differs: free (a view) when just size-1 strides differ, else
    one copy of a factor-sized tensor, fused with the dtype cast."""
    if grad is None:
        return None
    if grad.stride() == like.stride():
        return grad if grad.dtype == like.dtype else grad.to(like.dtype)
    if grad.is_contiguous() and like.is_contiguous():  # same memory order, only size-1 strides differ
        flat = grad.view(-1).view(like.shape)  # canonical contiguous strides, no copy
        if flat.stride() == like.stride():
            return flat if flat.dtype == like.dtype else flat.to(like.dtype)
    out = torch.empty_like(like)  # like's strides when it is dense (every parameter is)
    if out.stride() != like.stride():  # an overlapping / non-dense view: no layout to match
        return grad if grad.dtype == like.dtype else grad.to(like.dtype)
    return out.copy_(grad)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``'s type, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_target(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype an op on activations ``x`` runs its projections in under autocast (as an
    ``nn.Linear`` would), or None: autocast off, or float64 ``x`` (left as it is)."""
    cast = autocast_dtype(x.device)
    return None if cast is None or x.dtype == torch.float64 else cast


def compiling() -> bool:
    """Whether ``torch.compile`` (Dynamo) is tracing this call.

    Every op family registers its kernels as PyTorch custom ops (``torch.ops.kron_kernels.*``,
    with fake-tensor and autograd registrations), so that Dynamo captures a call whole and
    Inductor treats it as one opaque kernel -- the Triton launchers and the extension are never
    traced. The public ops call those custom ops while compiling and apply their autograd
    Functions directly in eager mode: both run the same forward and backward functions, but the
    dispatcher's Python custom-op path costs about 30 us more per forward and 70 us more per
    forward + backward than an autograd Function (measured on the 2-core CI host, torch 2.14,
    a 4 x 4 call) -- milliseconds per ViT step with dozens of adapted layers, which eager
    training should not pay. Backend selection stays in the Python wrapper, outside the
    captured graph: Dynamo guards on it, so a change of backend recompiles, never breaks."""
    return torch.compiler.is_compiling()


def grad_flags(needs, count: int) -> list:
    """``ctx.needs_input_grad`` entry of a ``List[Tensor]`` custom-op input as ``count`` bools
    (torch passes a nested list for list inputs; a single bool is spread over the list)."""
    if isinstance(needs, (list, tuple)):
        return [bool(n) for n in needs]
    return [bool(needs)] * count
