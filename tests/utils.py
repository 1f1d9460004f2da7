"""One helper for "compare every output and gradient with a reference", plus tolerances.

Tolerances by dtype (errors are max-abs over outputs normalised by the reference's max-abs):
* float64: the structured and the naive computations differ only by summation order,
  ~1e-15 relative; 1e-10 leaves room for the condition of a sum of m*r products.
* float32 (torch, or the interpreter's numpy dot): ~1e-6 relative; 1e-4 covers sums of up to
  ~10^4 terms at fp32 epsilon 1.2e-7.
* fp16/bf16: DESIGN.md rule -- the fused op's error vs a float64 reference is at most twice
  the error of the naive reference run in the same low precision, plus a small atol.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(actual).any():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def assert_rel_close(actual, expected, tol: float, name: str = "output"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative max error {err:.3e} > {tol:.1e}"


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_out_seed: int = 0):
    """Run ``fn(*inputs)`` and backprop a fixed random cotangent; returns {name: tensor}."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    g = g.to(device=out.device, dtype=out.dtype)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, g) if wrt else []
    result: Dict[str, torch.Tensor] = {"out": out}
    it = iter(grads)
    for i, t in enumerate(leaves):
        if t.requires_grad:
            result[f"grad[{i}]"] = next(it)
    return result


def compare_with_reference(
    fn: Callable, ref: Callable, inputs: Sequence[torch.Tensor], tol: float, ref_dtype=None
):
    """Assert fn and ref agree on the output and every input gradient (relative max error).

    With ``ref_dtype`` (e.g. float64) the reference runs on the inputs cast to it: the fused
    op is then judged against the exact result rather than against another rounding.
    """
    ref_inputs = inputs if ref_dtype is None else [t.to(ref_dtype) for t in inputs]
    got, want = outputs_and_grads(fn, inputs), outputs_and_grads(ref, ref_inputs)
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], tol, name)


def compare_low_precision(
    fn: Callable, ref: Callable, inputs: Sequence[torch.Tensor], dtype, activations=(0,), atol: float = 1e-3
):
    """DESIGN.md 6: err(fn in dtype vs ref in float64) <= 2 * err(ref in dtype vs ref in float64) + atol.

    The fused op gets the inputs at positions ``activations`` (activations, frozen weights)
    in ``dtype`` and keeps the trainable factors in float32, as in training; the naive
    reference runs with every input in ``dtype``.
    """
    exact = outputs_and_grads(ref, [t.double() for t in inputs])
    lowp_inputs = [t.to(dtype) for t in inputs]
    naive = outputs_and_grads(ref, lowp_inputs)
    fused_inputs = [t.to(dtype) if i in activations else t for i, t in enumerate(inputs)]
    fused = outputs_and_grads(fn, fused_inputs)
    for name in exact:
        e_fused = rel_err(fused[name], exact[name])
        e_naive = rel_err(naive[name], exact[name])
        assert e_fused <= 2 * e_naive + atol, (
            f"{name}: fused error {e_fused:.3e} > 2 x naive {dtype} error {e_naive:.3e} + {atol:g}"
        )
