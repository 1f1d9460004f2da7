"""Walsh-Hadamard transform ``fwht`` along the last dimension (DESIGN.md 3, 4.6).

``fwht(x, scale) = scale * x @ H`` with ``H`` the unnormalised Sylvester Hadamard matrix of
order ``n = x.shape[-1]`` (a power of two), in ``scipy.linalg.hadamard``'s ordering:
``H[i, j] = (-1)^popcount(i & j)``, ``H_{2n} = [[H_n, H_n], [H_n, -H_n]] = H_2 (x) H_n``.
H is symmetric, so the backward is the same transform of the gradient, times ``scale``
(not ``1/sqrt(n)``: see the intrinsic-dimension defect in DESIGN.md 4.8).

Backends: the compiled extension (``csrc/``: CUDA kernels, and a cache-blocked C++ kernel that
serves CPU tensors), Triton on CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``), and the
torch butterfly below. All compute in fp32 (fp64 for fp64 input) and return x's dtype.

Under ``torch.compile`` the transform is the custom op ``kron_kernels::fwht`` (its backward the
same op), opaque to Dynamo and Inductor (``ops._common.compiling``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import backend
from ._common import FLOAT_DTYPES, check_scale, check_tensor, compiling, compute_dtype

__all__ = ["fwht", "FwhtFunction"]


# A process constant, so torch.compile takes it as one instead of tracing the probe; a tuple,
# not a frozenset: Dynamo cannot guard a frozenset constant (`in` on one fails to trace).
@backend.cached_constant
def _extension_device_types(fp64: bool) -> Tuple[str, ...]:
    ok, _ = backend.extension_status()
    devices = set(backend.extension().kernels()["fwht"]) if ok else {"cuda", "cpu"}
    return tuple(sorted(devices & {"cpu"} if fp64 else devices))


def _extension_devices(fp64: bool) -> frozenset:
    """Device types the compiled extension has fwht kernels for: both in a CUDA build, the CPU
    alone in a CPU-only build (a CUDA tensor then goes to Triton under auto); its CUDA kernels
    take 16-bit and fp32 rows only. Without an extension: both, so that an explicit 'cuda'
    backend reports why the extension is missing."""
    return frozenset(_extension_device_types(fp64))


# ``auto`` on CUDA (DESIGN.md 5), per (n, dtype) class, with the measurement behind it: on the
# H200 (commit 349dfe8, shared/gpu/2026-11-27-H200/fwht.md; bf16, 32768 rows) the Triton row
# kernel took 1.49x / 1.09x / 1.08x torch.clone's time at n = 2^10 / 2^12 / 2^13 and the
# extension's CUDA kernel 3.13x / 3.34x / 3.45x: Triton for 2-byte rows of 2^10 ... 2^13 (fp16
# runs the same 2-byte code path). Unmeasured classes (fp32, n < 2^10, n > 2^13: the multi-pass
# transforms) keep the extension until a GPU run decides.
_TRITON_MEASURED_LOGS = range(10, 14)


def _cuda_auto(x: torch.Tensor, n: int):
    two_byte = x.dtype in (torch.float16, torch.bfloat16)
    return "triton" if two_byte and n.bit_length() - 1 in _TRITON_MEASURED_LOGS else None


def _torch_fwht(x2: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch butterfly, one vectorised stage per index bit (Pease's form): the pairs of
    the lowest bit ``(a, b)`` become ``(a + b, a - b)`` stacked as the new *top* bit, the other
    bits shift down one; after log2(n) stages every bit was transformed once and the order is
    back where it began."""
    rows, n = x2.shape
    y = x2.to(compute_dtype(x2.dtype))
    for _ in range(n.bit_length() - 1):
        pairs = y.view(rows, n // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        y = torch.stack((a + b, a - b), dim=1).view(rows, n)
    if scale != 1.0 or y is x2:  # n == 1 in the compute dtype: still return a new tensor
        y = y * scale
    return y.to(x2.dtype)


def _extension_fwht(x2: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty_like(x2)
    backend.extension().fwht_out(x2, out, scale)
    return out


def _forward(x2: torch.Tensor, scale: float, impl: str) -> torch.Tensor:
    if impl == "cuda":
        return _extension_fwht(x2, scale)
    if impl == "triton":
        from ..triton import fwht as triton_fwht  # imported on first use: never at package import

        return triton_fwht.fwht_forward(x2, scale)
    if impl == "torch":
        return _torch_fwht(x2, scale)
    raise ValueError(f"unknown fwht implementation {impl!r}")


class FwhtFunction(torch.autograd.Function):
    """``scale * x2 @ H`` on contiguous 2-D ``x2``; the backward is the same transform of the
    gradient (H symmetric), itself differentiable."""

    @staticmethod
    def forward(ctx, x2, scale, impl):
        ctx.scale, ctx.impl = scale, impl
        return _forward(x2, scale, impl)

    @staticmethod
    def backward(ctx, grad):
        return FwhtFunction.apply(grad.contiguous(), ctx.scale, ctx.impl), None, None


# the same computation as a PyTorch custom op, for torch.compile (see ops._common.compiling)
@torch.library.custom_op("kron_kernels::fwht", mutates_args=())
def _fwht_op(x2: torch.Tensor, scale: float, impl: str) -> torch.Tensor:
    """``scale * x2 @ H`` on contiguous 2-D ``x2``, in x2's dtype (contiguous)."""
    return _forward(x2, scale, impl)


@_fwht_op.register_fake
def _(x2, scale, impl):
    return x2.new_empty(x2.shape)


def _fwht_setup(ctx, inputs, output):
    _, ctx.scale, ctx.impl = inputs


def _fwht_autograd(ctx, grad):
    # H is symmetric: the same op on the gradient, itself differentiable (double backward)
    return _fwht_op(grad.contiguous(), ctx.scale, ctx.impl), None, None


_fwht_op.register_autograd(_fwht_autograd, setup_context=_fwht_setup)


def _check_input(x) -> int:
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"x's last dim must be a power of two (Walsh-Hadamard order), got shape {tuple(x.shape)}")
    return n


def fwht(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ H`` along the last dim: the unnormalised Walsh-Hadamard transform in
    ``scipy.linalg.hadamard``'s (Sylvester) ordering, in x's dtype (fp32 arithmetic).

    ``fwht(fwht(x)) == n * x``; ``scale = n ** -0.5`` gives the orthonormal transform.
    """
    n = _check_input(x)
    scale = check_scale(scale)
    fp64 = x.dtype == torch.float64
    impl = backend.select(
        "fwht",
        x.device,
        cuda_ops=_extension_devices(fp64),
        triton_refuses="its kernels compute in float32, got float64" if fp64 else None,
        cuda_auto=_cuda_auto(x, n),
    )
    x2 = x.reshape(-1, n).contiguous()
    if compiling():
        return _fwht_op(x2, scale, impl).view(x.shape)
    return FwhtFunction.apply(x2, scale, impl).view(x.shape)
