"""The low-rank bottleneck family (DESIGN.md 4.2-4.5): FacT increments, ARC, the LoSA mixer.

Every op here is one instance of ``x -> x @ D -> middle -> @ Up^T (* scale) (+ residual)``:

* :func:`arc`: ``x + drop((x @ U) * lam) @ U.T + bias`` -- diagonal middle, ``Up = D = U``;
* :func:`losa_mixer`: ``h + alpha * GELU((z + h) @ W_down) @ W_up`` -- GELU middle, along
  the channels or, in token mode, along the token axis of ``(..., T, C)`` activations;
* :func:`kron_kernels.bottleneck_adapter` (``ops/adapter.py``, the Compacter adapter):
  ``h + GELU(h @ W_d^T + b_d) @ W_u^T + b_u`` -- GELU middle with a down-projection bias;
* :func:`fact_apply` / :func:`fact_linear`: FacT's ``r x r`` core middles, several slots per
  call sharing one ``x @ U`` (rows: q, k, v or fc1's blocks; cols: fc2's chunks), alone or
  fused with the frozen Linear they adapt;
* :func:`fact_tt_delta` / :func:`fact_tk_delta`: the same increments materialised as the
  ``(S, d, d)`` stack of ``nn.Linear`` weight increments (for merging and inspection;
  applying FacT to activations never needs them).

``arc``, ``losa_mixer``, ``fact_apply`` and ``fact_linear`` run on the Triton kernels of
``triton/bottleneck.py`` on CUDA (the r-dim intermediate stays on chip, forward and backward
each one kernel) and on the structured torch code below elsewhere; per op family both
backends share one autograd Function and the same backward algebra (see the Triton
module's docstring). Neither ever forms a ``d x d`` matrix.

Dropout (``arc``, FacT) acts on the r-dim intermediate after the middle, keeps each element
with probability ``1 - p`` and scales kept ones by ``1 / (1 - p)``. The mask is a function of
a ``seed`` and the element's (row, j) position (FacT: rows ``(n, slot)`` of its ``(N, k, r)``
intermediate) -- Philox in the Triton kernels, a seeded
``torch.Generator`` on the torch backend -- so the backward regenerates (Triton) or reuses
(torch) exactly the forward's mask. A seed of None draws one from torch's global generator,
so ``torch.manual_seed`` makes runs reproducible; the two backends draw different masks for
the same seed. ``dropout_keep_mask`` returns the mask a backend uses. The dense composition
takes the torch backend's mask for a given seed; with a seed of None it runs torch's own
``F.dropout`` (as the references do: on CUDA one fused kernel forward and one backward, where
a drawn seed cost a host-side draw, a Bernoulli launch and a multiply -- the H200's fused steps
were bound by their launches), from torch's global generators (``torch.manual_seed``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from .. import backend
from ._common import (
    FLOAT_DTYPES, LOW_PRECISION, autocast_target, check_int, check_probability, check_scale, check_tensor,
    compiling, compute_dtype, grad_like,
)

__all__ = [
    "fact_tt_delta",
    "fact_tk_delta",
    "fact_apply",
    "fact_linear",
    "FacTFunction",
    "arc",
    "losa_mixer",
    "dropout_keep_mask",
    "BottleneckFunction",
]

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_REFUSES_FP64 = "its kernels take float16/bfloat16/float32 activations, got float64"


# ----------------------------------------------------------------------------------------
# FacT increments: small batched GEMMs in torch on every backend
# ----------------------------------------------------------------------------------------
def _check_fact_uv(U, V):
    check_tensor("U", U, ndim=2)
    check_tensor("V", V, ndim=2, device=U.device)
    d, r = U.shape
    if d < 1 or r < 1:
        raise ValueError(f"U must have shape (d, r) with d, r >= 1, got {tuple(U.shape)}")
    if tuple(V.shape) != (d, r):
        raise ValueError(f"V must have the shape of U, (d, r) = ({d}, {r}), got {tuple(V.shape)}")
    return d, r


def _fact_delta_from_cores(U, V, cores, scale: float) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(U.dtype, V.dtype), cores.dtype)
    acc = compute_dtype(dtype)
    with torch.autocast(device_type=U.device.type, enabled=False):
        # V @ cores[i]^T first: (S, d, r), r x r work per row; then one (S, d, r) @ (r, d) bmm
        # whose output write is the whole cost
        v_cores = torch.matmul(V.to(acc), cores.to(acc).transpose(1, 2))
        delta = torch.matmul(v_cores, U.to(acc).t())
        if scale != 1.0:
            delta = delta * scale
        return delta.to(dtype)


def fact_tt_delta(U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """FacT-TT increments: ``(S, d, d)`` with ``delta[i] = scale * V @ cores[i].T @ U.T``, the
    ``nn.Linear`` weight increment of slot ``i`` (DESIGN.md 4.2: ``delta_i(x) = s ((x U) Σ_i) V^T``).

    ``U, V: (d, r)``, ``cores: (S, r, r)``. Accumulates in fp32 (fp64 for fp64 factors); the
    result has the factors' promoted dtype, also under autocast. Gradients come from torch's
    autograd of the two matmuls.

    This op runs in torch on every backend (cuBLAS on CUDA): its cost is writing the
    ``S d^2`` output (144 x 768^2 floats at ViT-B), which a batched GEMM with a rank-r inner
    dimension already does at memory bandwidth, and its backward is two such GEMMs reading
    the ``(S, d, d)`` gradient once each. A fused kernel would save nothing; training FacT
    should apply the factors to activations instead of materialising increments.
    """
    d, r = _check_fact_uv(U, V)
    check_tensor("cores", cores, ndim=3, device=U.device)
    if tuple(cores.shape[1:]) != (r, r):
        raise ValueError(f"cores must have shape (S, r, r) with r = {r}, got {tuple(cores.shape)}")
    return _fact_delta_from_cores(U, V, cores, check_scale(scale))


def fact_tk_delta(
    U: torch.Tensor, V: torch.Tensor, C: torch.Tensor, P: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """FacT-TK increments: :func:`fact_tt_delta` with ``cores[i] = sum_t P[i, t] C[t]``;
    ``C: (r, r, r)``, ``P: (S, r)``. Torch on every backend, for the reasons given there (the
    ``(S, r) @ (r, r*r)`` core contraction is tiny)."""
    d, r = _check_fact_uv(U, V)
    check_tensor("C", C, ndim=3, device=U.device)
    check_tensor("P", P, ndim=2, device=U.device)
    if tuple(C.shape) != (r, r, r):
        raise ValueError(f"C must have shape (r, r, r) = ({r}, {r}, {r}), got {tuple(C.shape)}")
    if P.shape[1] != r:
        raise ValueError(f"P must have shape (S, r) with r = {r}, got {tuple(P.shape)}")
    acc = compute_dtype(torch.promote_types(C.dtype, P.dtype))
    with torch.autocast(device_type=U.device.type, enabled=False):
        cores = (P.to(acc) @ C.to(acc).reshape(r, r * r)).view(-1, r, r)
    return _fact_delta_from_cores(U, V, cores, check_scale(scale))


# ----------------------------------------------------------------------------------------
# the bottleneck: spec, torch backend, autograd Function
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    """What a bottleneck call computes besides its tensors."""

    mode: str  # "channel": rows of a 2-D (N, d); "token": a 3-D (B, T, C) mixed along T
    middle: str  # "diag" | "gelu"  (the Triton kernels also take "core")
    residual: bool  # add x1 to the output
    p_drop: float
    seed: Optional[int]  # None: the dense composition's F.dropout (module docstring)
    data_dtype: torch.dtype  # the precision the data carry: x's dtype, or the autocast dtype below it


def _torch_keep_mask(n_rows: int, r: int, p_drop: float, seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):  # drawn while torch.compile traces (the dense path)
        return _keep_mask_op(n_rows, r, p_drop, seed, torch.device(device))
    gen = torch.Generator(device=device).manual_seed(seed)
    # one launch (a bool Bernoulli draw), where uniforms and a comparison took two
    return torch.empty((n_rows, r), dtype=torch.bool, device=device).bernoulli_(1.0 - p_drop, generator=gen)


@torch.library.custom_op("kron_kernels::torch_keep_mask", mutates_args=())
def _keep_mask_op(n_rows: int, r: int, p_drop: float, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The torch backend's keep mask for a seed held in a tensor: opaque to torch.compile,
    which cannot seed a torch.Generator from a traced value."""
    return _torch_keep_mask(n_rows, r, p_drop, int(seed), device)


@_keep_mask_op.register_fake
def _(n_rows, r, p_drop, seed, device):
    return torch.empty((n_rows, r), dtype=torch.bool, device=device)


def _mask_scale(spec: _Spec, n_rows: int, r: int, device, acc, batch: int) -> Optional[torch.Tensor]:
    """The scaled keep mask in the torch intermediate's layout: ``(N, r)`` (channel) or
    ``(B, r, C)`` (token; rows are ``(b, c)``), or None without dropout."""
    if spec.p_drop <= 0.0:
        return None
    keep = _torch_keep_mask(n_rows, r, spec.p_drop, spec.seed, device).to(acc) / (1.0 - spec.p_drop)
    if spec.mode == "token":
        keep = keep.view(batch, -1, r).transpose(1, 2)
    return keep


class _TorchBottleneck:
    """Structured torch code for one call: channel mode on ``(N, d)`` with ``(N, r)``
    intermediates; token mode on ``(B, T, C)`` with ``(B, r, C)`` intermediates, contracting
    T by batched GEMMs on views (``D^T @ x``), never transposing the activations."""

    def __init__(self, spec: _Spec, x, down, up_t, diag, down_bias, acc):
        self.spec, self.acc = spec, acc
        self.token = spec.mode == "token"
        self.down, self.up_t = down.to(acc), (down.t() if up_t is None else up_t).to(acc)
        self.diag = None if diag is None else diag.to(acc)
        self.down_bias = None if down_bias is None else down_bias.to(acc)
        r = down.shape[1]
        n_rows = x.shape[0] * x.shape[2] if self.token else x.shape[0]
        self.mask = _mask_scale(spec, n_rows, r, x.device, acc, x.shape[0])

    @staticmethod
    def _left(W, t, add=None):
        """``[add +] W @ t[b]`` for every b as one (b)addbmm on the expanded (stride-0) ``W`` and
        the activations' own strides (``torch.matmul`` would fold and copy them)."""
        if add is None:
            return torch.bmm(W.expand(t.shape[0], *W.shape), t)
        return torch.baddbmm(add, W.expand(t.shape[0], *W.shape), t)

    def up_proj_add(self, a, add):  # add + a @ Up^T in one GEMM pass over the output
        if self.token:
            return self._left(self.up_t.t(), a, add)
        return torch.addmm(add, a, self.up_t)

    def down_proj_t_add(self, d_pre, add):  # add + d_pre @ D^T
        if self.token:
            return self._left(self.down, d_pre, add)
        return torch.addmm(add, d_pre, self.down.t())

    def down_proj(self, x):  # x @ D [+ b_D]
        if self.down_bias is None:
            return self._left(self.down.t(), x) if self.token else x @ self.down
        if self.token:
            return self._left(self.down.t(), x, self.down_bias[:, None])  # broadcast over (b, c)
        return torch.addmm(self.down_bias, x, self.down)

    def up_proj(self, a):  # a @ Up^T
        return self._left(self.up_t.t(), a) if self.token else a @ self.up_t

    def down_proj_t(self, d_pre):  # d_pre @ D^T
        return self._left(self.down, d_pre) if self.token else d_pre @ self.down.t()

    def up_proj_t(self, g):  # g @ Up
        return self._left(self.up_t, g) if self.token else g @ self.up_t.t()

    def outer(self, left, right):
        """``sum_rows left^T right``: weight gradients, ``(r, d)`` from ``(rows, r)``, ``(rows, d)``."""
        if self.token:  # sum_b left[b] @ right[b]^T: a bmm on a transposed view, then a small sum
            return torch.bmm(left, right.transpose(1, 2)).sum(0)
        return left.t() @ right

    def r_vector(self, v):  # a (r,) vector broadcast over the intermediate
        return v[:, None] if self.token else v

    def r_sum(self, t):  # sum over rows of an intermediate -> (r,)
        return t.sum(dim=(0, 2)) if self.token else t.sum(0)

    def middle(self, pre):
        if self.spec.middle == "diag":
            return pre * self.r_vector(self.diag)
        return F.gelu(pre)

    def forward(self, x1, x2, scale, bias):
        x1a = x1.to(self.acc)
        x = x1a if x2 is None else x1a + x2.to(self.acc)
        a = self.middle(self.down_proj(x))
        if self.mask is not None:
            a = a * self.mask
        a = a * scale.to(self.acc)  # on the r-dim intermediate, not the d-dim output
        out = self.up_proj_add(a, x1a) if self.spec.residual else self.up_proj(a)
        if bias is not None:
            out += bias.to(self.acc)
        return out.to(x1.dtype)

    def backward(self, g, x1, x2, scale, need_dx: bool, need_dx2: bool, need_dw: bool):
        g = g.to(self.acc)
        x = x1.to(self.acc) if x2 is None else x1.to(self.acc) + x2.to(self.acc)
        scale = scale.to(self.acc)
        pre = self.down_proj(x)
        dm = self.up_proj_t(g)
        y = self.middle(pre)
        a, d_y = y, dm * scale
        if self.mask is not None:
            a, d_y = y * self.mask, d_y * self.mask
        if self.spec.middle == "diag":
            d_pre = d_y * self.r_vector(self.diag)
        else:
            d_pre = d_y * _gelu_grad(pre)
        grads = {"dx": None, "dx2": None}
        residual = self.spec.residual
        if need_dx2:
            dx2 = self.down_proj_t(d_pre)
            grads["dx2"] = dx2
            grads["dx"] = (dx2 + g if residual else dx2) if need_dx else None
        elif need_dx:
            grads["dx"] = self.down_proj_t_add(d_pre, g) if residual else self.down_proj_t(d_pre)
        if need_dw:
            grads["ddown"] = self.outer(x, d_pre)  # (features, r), in down's own (row-major) layout
            grads["dup_t"] = self.outer(a * scale, g)
            grads["dscale"] = (dm * a).sum()
            grads["ddiag"] = self.r_sum(d_y * pre) if self.spec.middle == "diag" else None
            grads["dbias"] = None if self.token else g.sum(0)
            grads["ddown_bias"] = None if self.down_bias is None else self.r_sum(d_pre)
        return grads


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """``d/dz [z Phi(z)] = Phi(z) + z phi(z)`` for the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


# ``auto`` on CUDA (DESIGN.md 5), per op, with the measurement behind it: the H200 run of
# commit 349dfe8 (shared/gpu/2026-11-27-H200; ViT-B/16, batch 64, bf16 autocast, AdamW):
# * arc: Triton fused step 52.9 ms against the reference's two cuBLAS GEMMs 35.0 ms (0.66x),
#   the forward at 4% of torch.clone's bandwidth -> the dense composition;
# * losa_mixer: 26.5 ms against 17.5 ms (0.66x), forward 6-15% of clone -> dense;
# * fact_apply / fact_linear: Triton 83.8 / 120 ms against the reference's 112 / 152 ms
#   (1.34x / 1.26x faster) -> triton.
# The H200 run of commit 93d8659 (benchmarks/results/NVIDIA-H200) kept the order (FacT-TT/TK
# fused 130 / 120 ms, references 152 / 162; ARC dense 63.6 ms against 51.6 -- its dense path
# then ran fp32 FFMA GEMMs under autocast, fixed since) but found FacT's Triton backward at
# 0.45 ms a call, 48% of the step's kernel time. FacT's dense composition (_dense_fact: bf16
# cuBLAS GEMMs, x @ U once) is new and unmeasured: the bottleneck suite's fact_linear rows time
# it (variant cublas) beside the Triton kernels, and that measurement decides here.
# A new GPU measurement of these rows (models and bottleneck reports) replaces these lines.
_CUDA_AUTO = {"arc": "dense", "losa_mixer": "dense", "fact_apply": "triton", "fact_linear": "triton"}
_DENSE_OPS = ("arc", "losa_mixer", "fact_apply", "fact_linear")  # the ops with a dense composition


def _data_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision a bottleneck's data carry: ``x``'s dtype, or under autocast the autocast
    dtype when it is narrower (fp32 activations in an autocast region: the residual stream of
    a timm ViT). The GEMMs of the dense composition and the Triton kernels' dots run at it,
    as the references' ``matmul`` do under autocast; the result keeps ``x``'s dtype."""
    cast = autocast_target(x)
    return cast if x.dtype == torch.float32 and cast in LOW_PRECISION else x.dtype


def _dense_bottleneck(x1, x2, down, up_t, diag, scale, bias, spec: _Spec):
    """The composition the references run, in plain autograd: two dense GEMMs at the data's
    precision (``spec.data_dtype``: bf16 GEMMs on tensor cores for bf16 activations and under
    bf16 autocast, as the references' under autocast), the r-wide intermediate materialised,
    autograd's backward; the residual and the bias are added in ``x1``'s dtype. Same dropout
    mask as the torch backend (``_torch_keep_mask``). (On the H200, commit 93d8659, ARC's dense
    path under autocast ran fp32 FFMA GEMMs on the fp32 residual stream: 0.81x its reference.)"""
    dt = spec.data_dtype
    x = x1 if x2 is None else x1 + x2
    x = x.to(dt)
    D = down.to(dt)
    # tied (ARC: the up-projection is U^T): one cast serves both GEMMs, and autograd sums the
    # two gradients before the one cast back, as the reference's autocast weight cache does.
    # A scale (LoSA's alpha) rides on the (features, r) up weight, not on the (rows, features)
    # output: no full-size multiply either way, no full-size tensor saved for alpha's gradient
    # (the reference's alpha * out keeps `out`: 12 x 19 MB bf16 at ViT-B, batch 64), and that
    # gradient is a sum over features x r products in fp32 (the weight's dtype) of one
    # GEMM-rounded dUp each.
    if scale is None:
        Up = D if up_t is None else up_t.t().to(dt)  # (features, r)
    else:
        Up = ((down if up_t is None else up_t.t()) * scale.reshape(())).to(dt)
    token = spec.mode == "token"
    # token mixing through a transpose, as the reference: (B, C, T) @ (T, r) folds into ONE
    # GEMM over every (b, c) row, so D's gradient is one GEMM reducing over B*C in fp32. The
    # broadcast (r, T) @ (B, T, C) it replaced made B bf16-rounded partial gradients summed in
    # bf16: over the low-precision rule on an H200 at ViT sizes (commit 93d8659), not on CPU.
    pre = (x.transpose(-1, -2) if token else x) @ D  # (B, C, r) | (N, r)
    # each launch counts: on the H200 the fused steps were bound by the host (commit 93d8659),
    # so a seeded mask's 1 / (1 - p) rides on ARC's diagonal and the mask multiplies as a bool
    seeded = spec.p_drop > 0.0 and spec.seed is not None
    inv_keep = 1.0 / (1.0 - spec.p_drop) if seeded else None
    if spec.middle == "diag":
        a = pre * (diag if inv_keep is None else diag * inv_keep).to(dt)
    else:
        a = F.gelu(pre) if inv_keep is None else F.gelu(pre) * inv_keep  # (LoSA has no dropout)
    if seeded:
        r = down.shape[1]
        n_rows = x1.shape[0] * x1.shape[2] if token else x1.shape[0]
        keep = _torch_keep_mask(n_rows, r, spec.p_drop, spec.seed, x1.device)  # rows (b, c) | n
        a = a * (keep.view(x1.shape[0], -1, r) if token else keep)
    elif spec.p_drop > 0.0:  # no seed asked for: torch's own dropout (module docstring)
        a = F.dropout(a, spec.p_drop, training=True)
    out = a @ Up.t()  # (B, C, T) | (N, d)
    if token:
        out = out.transpose(-1, -2)
    if spec.residual:
        out = x1 + out  # promotes to x1's dtype
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x1.dtype)


def _triton_bottleneck():
    from ..triton import bottleneck as triton_bottleneck  # imported on first use: never at package import

    return triton_bottleneck


def _bottleneck_forward(x1, x2, down, up_t, diag, scale, bias, down_bias, spec: _Spec, impl: str):
    """The forward of :class:`BottleneckFunction` and of the custom op."""
    if impl == "triton":
        return _triton_bottleneck().bottleneck_forward(
            x1, x2, down, up_t, None, diag, scale, bias,
            mode=spec.mode, middle=spec.middle, residual=spec.residual, p_drop=spec.p_drop,
            seed=spec.seed, data_dtype=spec.data_dtype, down_bias=down_bias,
        )
    acc = compute_dtype(x1.dtype)
    return _TorchBottleneck(spec, x1, down, up_t, diag, down_bias, acc).forward(x1, x2, scale, bias)


def _bottleneck_backward(dout, x1, x2, down, up_t, diag, scale, bias_dtype, down_bias, spec: _Spec, impl: str,
                         needs):
    """``[dx1, dx2, ddown, dup_t, ddiag, dscale, dbias, ddown_bias]`` (None where ``needs`` is
    False), the activations' in x1's dtype, the parameters' in their dtypes and strides (see
    grad_like)."""
    need_dx, need_dx2, need_dw = needs[0], needs[1], any(needs[2:8])
    if impl == "triton":
        grads = _triton_bottleneck().bottleneck_backward(
            dout, x1, x2, down, up_t, None, diag, scale,
            mode=spec.mode, middle=spec.middle, residual=spec.residual, p_drop=spec.p_drop,
            seed=spec.seed, data_dtype=spec.data_dtype,
            need_dx=need_dx, need_dx2=need_dx2, need_dw=need_dw, down_bias=down_bias,
        )
    else:
        acc = compute_dtype(x1.dtype)
        grads = _TorchBottleneck(spec, x1, down, up_t, diag, down_bias, acc).backward(
            dout, x1, x2, scale, need_dx, need_dx2, need_dw
        )
    ddown = None
    if needs[2] and up_t is None:  # tied: D and Up are one tensor (the Triton kernel sums them)
        ddown = grads["ddown"] if impl == "triton" else grads["ddown"] + grads["dup_t"].t()
        ddown = grad_like(ddown, down)
    elif needs[2]:
        ddown = grad_like(grads["ddown"], down)
    return [
        grads["dx"].to(x1.dtype) if need_dx else None,
        grads["dx2"].to(x1.dtype) if need_dx2 else None,
        ddown,
        grad_like(grads["dup_t"], up_t) if needs[3] else None,
        grad_like(grads["ddiag"], diag) if needs[4] else None,
        grad_like(grads["dscale"].reshape(scale.shape), scale) if needs[5] else None,
        grads["dbias"].to(bias_dtype) if needs[6] else None,
        grad_like(grads["ddown_bias"], down_bias) if needs[7] else None,
    ]


class BottleneckFunction(torch.autograd.Function):
    """``[x1 +] scale * drop(middle((x1 [+ x2]) @ down [+ down_bias])) @ up_t [+ bias]`` on a
    2-D (channel) or 3-D (token) ``x1``; ``up_t`` None ties the up-projection to ``down.T``
    (ARC)."""

    @staticmethod
    def forward(ctx, x1, x2, down, up_t, diag, scale, bias, down_bias, spec: _Spec, impl: str):
        ctx.save_for_backward(x1, x2, down, up_t, diag, scale, down_bias)
        ctx.spec, ctx.impl = spec, impl
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _bottleneck_forward(x1, x2, down, up_t, diag, scale, bias, down_bias, spec, impl)

    @staticmethod
    def backward(ctx, dout):
        x1, x2, down, up_t, diag, scale, down_bias = ctx.saved_tensors
        grads = _bottleneck_backward(dout, x1, x2, down, up_t, diag, scale, ctx.bias_dtype, down_bias, ctx.spec,
                                     ctx.impl, ctx.needs_input_grad[:8])
        return (*grads, None, None)


# the same computation as PyTorch custom ops, for torch.compile (see ops._common.compiling);
# the spec travels as its fields, the dropout seed as a 0-d int64 CPU tensor (under compile a
# seed of None is drawn in the graph: see _resolve_seed)
def _spec_of(mode, middle, residual, p_drop, seed, data_dtype) -> _Spec:
    return _Spec(mode, middle, residual, p_drop, int(seed), data_dtype)


@torch.library.custom_op("kron_kernels::bottleneck", mutates_args=())
def _bottleneck_op(
    x1: torch.Tensor, x2: Optional[torch.Tensor], down: torch.Tensor, up_t: Optional[torch.Tensor],
    diag: Optional[torch.Tensor], scale: torch.Tensor, bias: Optional[torch.Tensor],
    down_bias: Optional[torch.Tensor], mode: str, middle: str, residual: bool, p_drop: float, seed: torch.Tensor,
    data_dtype: torch.dtype, impl: str,
) -> torch.Tensor:
    spec = _spec_of(mode, middle, residual, p_drop, seed, data_dtype)
    return _bottleneck_forward(x1, x2, down, up_t, diag, scale, bias, down_bias, spec, impl)


@_bottleneck_op.register_fake
def _(x1, x2, down, up_t, diag, scale, bias, down_bias, mode, middle, residual, p_drop, seed, data_dtype, impl):
    return x1.new_empty(x1.shape)


@torch.library.custom_op("kron_kernels::bottleneck_backward", mutates_args=())
def _bottleneck_backward_op(
    dout: torch.Tensor, x1: torch.Tensor, x2: Optional[torch.Tensor], down: torch.Tensor,
    up_t: Optional[torch.Tensor], diag: Optional[torch.Tensor], scale: torch.Tensor,
    bias_dtype: Optional[torch.dtype], down_bias: Optional[torch.Tensor], mode: str, middle: str, residual: bool,
    p_drop: float, seed: torch.Tensor, data_dtype: torch.dtype, impl: str, needs: List[bool],
) -> List[torch.Tensor]:
    """The gradients ``needs`` asks for, in the order ``[dx1, dx2, ddown, dup_t, ddiag, dscale,
    dbias, ddown_bias]``."""
    spec = _spec_of(mode, middle, residual, p_drop, seed, data_dtype)
    grads = _bottleneck_backward(dout, x1, x2, down, up_t, diag, scale, bias_dtype, down_bias, spec, impl, needs)
    return [g for g in grads if g is not None]


@_bottleneck_backward_op.register_fake
def _(dout, x1, x2, down, up_t, diag, scale, bias_dtype, down_bias, mode, middle, residual, p_drop, seed,
      data_dtype, impl, needs):
    dx = x1.new_empty(x1.shape)
    likes = [dx, dx, down, up_t, diag, scale, x1.new_empty(x1.shape[-1:], dtype=bias_dtype), down_bias]
    return [torch.empty_like(like) for like, needed in zip(likes, needs) if needed]


def _bottleneck_setup(ctx, inputs, output):
    x1, x2, down, up_t, diag, scale, bias, down_bias, *spec, impl = inputs
    ctx.save_for_backward(x1, x2, down, up_t, diag, scale, down_bias, spec[4])
    ctx.spec, ctx.impl = spec, impl
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bottleneck_autograd(ctx, dout):
    x1, x2, down, up_t, diag, scale, down_bias, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    present = (True, x2 is not None, True, up_t is not None, diag is not None, True, ctx.bias_dtype is not None,
               down_bias is not None)
    needs = [p and bool(n) for p, n in zip(present, need[:8])]
    mode, middle, residual, p_drop, _, data_dtype = ctx.spec
    grads = iter(_bottleneck_backward_op(dout, x1, x2, down, up_t, diag, scale, ctx.bias_dtype, down_bias, mode,
                                         middle, residual, p_drop, seed, data_dtype, ctx.impl, needs))
    return (*[next(grads) if needed else None for needed in needs], *[None] * 7)


_bottleneck_op.register_autograd(_bottleneck_autograd, setup_context=_bottleneck_setup)


def _apply_bottleneck(x1, x2, down, up_t, diag, scale, bias, spec: _Spec, impl: str, down_bias=None):
    """The bottleneck through the path the call runs on: the dense composition (plain autograd,
    traced by torch.compile), the custom op while compiling, else the autograd Function.
    ``down_bias`` (the adapter's ``b_d``) is taken by the torch and Triton backends only: the
    adapter keeps its own dense composition (``ops/adapter.py``)."""
    if impl == "dense":
        if down_bias is not None:
            raise ValueError("the dense bottleneck composition takes no down_bias (ops/adapter.py has its own)")
        return _dense_bottleneck(x1, x2, down, up_t, diag, scale, bias, spec)
    if compiling():
        return _bottleneck_op(x1, x2, down, up_t, diag, scale, bias, down_bias, spec.mode, spec.middle,
                              spec.residual, spec.p_drop, _seed_tensor(spec.seed), spec.data_dtype, impl)
    return BottleneckFunction.apply(x1, x2, down, up_t, diag, scale, bias, down_bias, spec, impl)


# ----------------------------------------------------------------------------------------
# FacT applied to activations: several slots per call, optionally fused with the frozen Linear
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FacTSpec:
    split: str  # "rows" | "cols"
    scale: float
    p_drop: float
    seed: Optional[int]  # None: the dense composition's F.dropout (the kernels' dot precision follows
    # from x's dtype, the autocast dtype under autocast)


def _torch_fact_keep(spec: _FacTSpec, n: int, k: int, r: int, device, acc) -> Optional[torch.Tensor]:
    """The ``(N, k, r)`` scaled keep mask (rows ``(n, j)`` of the ``(N k, r)`` torch mask), or None."""
    if spec.p_drop <= 0.0:
        return None
    return _torch_keep_mask(n * k, r, spec.p_drop, spec.seed, device).view(n, k, r).to(acc) / (1.0 - spec.p_drop)


class _TorchFacT:
    """Structured torch code for one call, the Triton kernels' algebra (their module docstring)
    on ``(N, k, r)`` intermediates: GEMMs against ``U``, ``V`` and the stacked cores, never a
    ``d x d`` matrix."""

    def __init__(self, spec: _FacTSpec, x2, U, V, cores):
        self.spec, self.acc = spec, compute_dtype(x2.dtype)
        self.rows = spec.split == "rows"
        self.U, self.V, self.cores = U.to(self.acc), V.to(self.acc), cores.to(self.acc)
        self.n, self.k, self.r = x2.shape[0], cores.shape[0], cores.shape[1]
        self.d = U.shape[0]
        self.keep = _torch_fact_keep(spec, self.n, self.k, self.r, x2.device, self.acc)

    def _pre(self, xa):
        """``x @ U``: ``(N, r)`` once for every slot (rows) or ``(N, k, r)`` per chunk (cols)."""
        if self.rows:
            return xa @ self.U
        return (xa.reshape(self.n * self.k, self.d) @ self.U).view(self.n, self.k, self.r)

    def _through_cores(self, pre):
        """``(N, k, r)``: ``pre @ C_j`` for every slot j."""
        k, r = self.k, self.r
        if self.rows:  # one GEMM against the cores side by side, (r, k r)
            return (pre @ self.cores.permute(1, 0, 2).reshape(r, k * r)).view(-1, k, r)
        return torch.bmm(pre.transpose(0, 1), self.cores).transpose(0, 1)

    def _masked(self, t):  # s * m_j * t on an (N, k, r) intermediate
        t = t * self.spec.scale
        return t if self.keep is None else t * self.keep

    def forward(self, x2, weight, bias):
        xa = x2.to(self.acc)
        a = self._masked(self._through_cores(self._pre(xa)))
        if self.rows:
            out = (a.reshape(-1, self.r) @ self.V.t()).view(self.n, self.k * self.d)
        else:
            out = a.sum(1) @ self.V.t()  # the slots' outputs are summed: sum before the shared V
        if bias is not None:
            out += bias.to(self.acc)
        if weight is not None:
            out.addmm_(xa, weight.to(self.acc).t())
        return out.to(x2.dtype)

    def backward(self, g2, x2, weight, need_dx: bool, need_dw: bool):
        xa, g = x2.to(self.acc), g2.to(self.acc)
        n, k, r, d = self.n, self.k, self.r, self.d
        pre = self._pre(xa)
        if self.rows:
            dt = (g.reshape(n * k, d) @ self.V).view(n, k, r)
        else:
            dt = (g @ self.V)[:, None, :].expand(n, k, r)
        d_a = self._masked(dt)  # the gradient of pre_j @ C_j
        grads = {"dx": None}
        if self.rows:
            d_pre = d_a.reshape(n, k * r) @ self.cores.transpose(1, 2).reshape(k * r, r)  # sum_j d_a_j C_j^T
        else:
            d_pre = torch.bmm(d_a.transpose(0, 1), self.cores.transpose(1, 2)).transpose(0, 1)
        if need_dx:
            dx = (d_pre.reshape(-1, r) @ self.U.t()).view(x2.shape)
            if weight is not None:
                dx.addmm_(g, weight.to(self.acc))
            grads["dx"] = dx
        if need_dw:
            a = self._masked(self._through_cores(pre))
            if self.rows:
                grads["dcores"] = (pre.t() @ d_a.reshape(n, k * r)).view(r, k, r).transpose(0, 1)
                grads["dU"] = xa.t() @ d_pre
                grads["dV"] = g.reshape(n * k, d).t() @ a.reshape(n * k, r)
            else:
                grads["dcores"] = torch.bmm(pre.permute(1, 2, 0), d_a.transpose(0, 1))
                grads["dU"] = xa.reshape(n * k, d).t() @ d_pre.reshape(n * k, r)
                grads["dV"] = g.t() @ a.sum(1)
        return grads


def _fact_forward(x2, weight, bias, U, V, cores, spec: _FacTSpec, impl: str, keep_padded: bool = False):
    """The forward of :class:`FacTFunction` and of the custom op (``keep_padded``, Triton only:
    ``(out, the padded factors)`` for the backward)."""
    if impl == "triton":
        return _triton_bottleneck().fact_forward(
            x2, weight, bias, U, V, cores, split=spec.split, scale=spec.scale, p_drop=spec.p_drop,
            seed=spec.seed, keep_padded=keep_padded,
        )
    return _TorchFacT(spec, x2, U, V, cores).forward(x2, weight, bias)


def _fact_backward(dout, x2, weight, U, V, cores, bias_dtype, spec: _FacTSpec, impl: str, needs, padded=None):
    """``[dx, dweight, dbias, dU, dV, dcores]`` (None where ``needs`` is False); parameter
    gradients in their parameter's dtype and strides (see grad_like)."""
    need_dx, need_dw = needs[0], any(needs[3:6])
    if impl == "triton":
        grads = _triton_bottleneck().fact_backward(
            dout, x2, weight, U, V, cores, split=spec.split, scale=spec.scale, p_drop=spec.p_drop,
            seed=spec.seed, need_dx=need_dx, need_dw=need_dw,
            padded=padded,
        )
    else:
        grads = _TorchFacT(spec, x2, U, V, cores).backward(dout, x2, weight, need_dx, need_dw)
    acc = compute_dtype(x2.dtype)
    return [
        grads["dx"].to(x2.dtype) if need_dx else None,
        grad_like(dout.to(acc).t() @ x2.to(acc), weight) if needs[1] else None,
        dout.to(acc).sum(0).to(bias_dtype) if needs[2] else None,
        grad_like(grads["dU"], U) if needs[3] else None,
        grad_like(grads["dV"], V) if needs[4] else None,
        grad_like(grads["dcores"], cores) if needs[5] else None,
    ]


def _dense_fact(x2, weight, bias, U, V, cores, spec: _FacTSpec):
    """FacT as cuBLAS GEMMs in plain autograd, in the activations' dtype (bf16 tensor cores
    under autocast; the factors cast to it, their gradients back to fp32 by autograd): ``x @ U``
    once for every slot (rows) or one GEMM over the ``k`` chunks (cols), the cores side by side
    (rows) or batched (cols), dropout with the torch backend's mask (its scale and ``s`` folded
    into the tiny cores), the frozen GEMM with its bias, then ``@ V^T`` adding onto it through
    cuBLAS's ``beta = 1`` epilogue (``addmm``): ~10 launches forward, no activation ever in
    fp32 (the torch backend's structured code accumulates in fp32 and runs the frozen GEMM
    there too: fine on a CPU, FFMA on a GPU)."""
    dt = x2.dtype
    n, (k, r) = x2.shape[0], cores.shape[:2]
    d = U.shape[0]
    seeded = spec.p_drop > 0.0 and spec.seed is not None
    s = spec.scale * (1.0 / (1.0 - spec.p_drop) if seeded else 1.0)
    Ud, Vd = U.to(dt), V.to(dt)
    if spec.split == "rows":
        # the cores side by side, (r, k r): scaled, converted and laid out in two launches
        side = (cores.permute(1, 0, 2) * s).to(dt, memory_format=torch.contiguous_format).reshape(r, k * r)
        pre = x2 @ Ud  # (N, r), once for the k slots
        a = (pre @ side).view(n * k, r)  # rows (n, j)
    else:
        pre = (x2.reshape(n * k, d) @ Ud).view(n, k, r)
        a = torch.bmm(pre.transpose(0, 1), (cores * s).to(dt)).transpose(0, 1).reshape(n * k, r)  # (n, j) rows
    if seeded:
        a = a * _torch_keep_mask(n * k, r, spec.p_drop, spec.seed, x2.device)
    elif spec.p_drop > 0.0:  # no seed asked for: torch's own dropout (module docstring)
        a = F.dropout(a, spec.p_drop, training=True)
    if spec.split == "cols":
        a = a.view(n, k, r).sum(1)  # the slots' outputs are summed: sum before the shared V
    # the frozen GEMM (with the bias) first, the increments added in the V GEMM's epilogue
    if weight is not None:
        base = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    elif bias is not None:
        base = bias.expand(n, bias.shape[0])
    else:
        base = None
    rows = n * k if spec.split == "rows" else n
    if base is None:
        out = a @ Vd.t()
    else:
        out = torch.addmm(base.reshape(rows, d), a, Vd.t())
    return out.view(n, k * d if spec.split == "rows" else d)  # sizes named: n may be 0


class FacTFunction(torch.autograd.Function):
    """``[x2 @ weight^T + bias +]`` the FacT increments of the slots of ``cores`` on a 2-D
    ``x2`` (:func:`fact_linear`); ``weight``/``bias`` may be None (:func:`fact_apply`)."""

    @staticmethod
    def forward(ctx, x2, weight, bias, U, V, cores, spec: _FacTSpec, impl: str):
        ctx.spec, ctx.impl = spec, impl
        ctx.bias_dtype = None if bias is None else bias.dtype
        if impl != "triton":
            ctx.save_for_backward(x2, weight, U, V, cores)
            return _fact_forward(x2, weight, bias, U, V, cores, spec, impl)
        # the Triton backward reuses the forward's zero-padded factors (six launches a call: on
        # the H200 the FacT steps were host-bound at 2,281 launches, commit 93d8659)
        out, padded = _fact_forward(x2, weight, bias, U, V, cores, spec, impl, keep_padded=True)
        ctx.save_for_backward(x2, weight, U, V, cores, *padded)
        return out

    @staticmethod
    def backward(ctx, dout):
        x2, weight, U, V, cores, *padded = ctx.saved_tensors
        grads = _fact_backward(dout, x2, weight, U, V, cores, ctx.bias_dtype, ctx.spec, ctx.impl,
                               ctx.needs_input_grad[:6], padded or None)
        return (*grads, None, None)


@torch.library.custom_op("kron_kernels::fact", mutates_args=())
def _fact_op(
    x2: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], U: torch.Tensor,
    V: torch.Tensor, cores: torch.Tensor, split: str, scale: float, p_drop: float, seed: torch.Tensor, impl: str,
) -> torch.Tensor:
    spec = _FacTSpec(split, scale, p_drop, int(seed))
    return _fact_forward(x2, weight, bias, U, V, cores, spec, impl)


def _fact_width(x2, U, cores, split):
    return cores.shape[0] * U.shape[0] if split == "rows" else U.shape[0]


@_fact_op.register_fake
def _(x2, weight, bias, U, V, cores, split, scale, p_drop, seed, impl):
    return x2.new_empty((x2.shape[0], _fact_width(x2, U, cores, split)))


@torch.library.custom_op("kron_kernels::fact_backward", mutates_args=())
def _fact_backward_op(
    dout: torch.Tensor, x2: torch.Tensor, weight: Optional[torch.Tensor], U: torch.Tensor, V: torch.Tensor,
    cores: torch.Tensor, bias_dtype: Optional[torch.dtype], split: str, scale: float, p_drop: float,
    seed: torch.Tensor, impl: str, needs: List[bool],
) -> List[torch.Tensor]:
    """The gradients ``needs`` asks for, in the order ``[dx, dweight, dbias, dU, dV, dcores]``."""
    spec = _FacTSpec(split, scale, p_drop, int(seed))
    grads = _fact_backward(dout, x2, weight, U, V, cores, bias_dtype, spec, impl, needs)
    return [g for g in grads if g is not None]


@_fact_backward_op.register_fake
def _(dout, x2, weight, U, V, cores, bias_dtype, split, scale, p_drop, seed, impl, needs):
    dbias = x2.new_empty((_fact_width(x2, U, cores, split),), dtype=bias_dtype)
    likes = [x2.new_empty(x2.shape), weight, dbias, U, V, cores]
    return [torch.empty_like(like) for like, needed in zip(likes, needs) if needed]


def _fact_setup(ctx, inputs, output):
    x2, weight, bias, U, V, cores, *spec, impl = inputs
    ctx.save_for_backward(x2, weight, U, V, cores, spec[3])
    ctx.spec, ctx.impl = spec, impl
    ctx.bias_dtype = None if bias is None else bias.dtype


def _fact_autograd(ctx, dout):
    x2, weight, U, V, cores, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    present = (True, weight is not None, ctx.bias_dtype is not None, True, True, True)
    needs = [p and bool(n) for p, n in zip(present, need[:6])]
    split, scale, p_drop, _ = ctx.spec
    grads = iter(_fact_backward_op(dout, x2, weight, U, V, cores, ctx.bias_dtype, split, scale, p_drop, seed,
                                   ctx.impl, needs))
    return (*[next(grads) if needed else None for needed in needs], *[None] * 5)


_fact_op.register_autograd(_fact_autograd, setup_context=_fact_setup)


def _fact_call(x, weight, bias, U, V, cores, scale, dropout, training, split, seed, op: str):
    """Validate, apply autocast, flatten batch dims and run :class:`FacTFunction`."""
    d, r = _check_fact_uv(U, V)
    check_tensor("x", x, min_ndim=1, dtypes=_ACTIVATION_DTYPES, device=U.device)
    check_tensor("cores", cores, ndim=3, device=U.device)
    k = cores.shape[0]
    if k < 1 or tuple(cores.shape[1:]) != (r, r):
        raise ValueError(f"cores must have shape (k, r, r) with k >= 1 and r = {r}, got {tuple(cores.shape)}")
    if split not in ("rows", "cols"):
        raise ValueError(f"split must be 'rows' or 'cols', got {split!r}")
    width, d_out = (d, k * d) if split == "rows" else (k * d, d)
    if x.shape[-1] != width:
        raise ValueError(f"x's last dim must be {'d' if split == 'rows' else 'k * d'} = {width} for split={split!r}, "
                         f"got {tuple(x.shape)}")
    if weight is not None:
        check_tensor("weight", weight, ndim=2, device=U.device)
        if tuple(weight.shape) != (d_out, width):
            raise ValueError(f"weight must have shape (out, in) = ({d_out}, {width}) for {k} slots of d = {d} "
                             f"and split={split!r}, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=U.device)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    scale = check_scale(scale)
    p_drop = _check_dropout(dropout)  # validated also when not training
    if not training:
        p_drop = 0.0
    # under autocast the activations and the frozen Linear run in the autocast dtype, as an
    # nn.Linear's would; the factors stay in their own dtype (fp32 accumulation throughout)
    cast = autocast_target(x)
    if cast is not None:
        x, weight, bias = (None if t is None else t.to(cast) for t in (x, weight, bias))
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast one of them (or use autocast)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, width)  # a view whenever the batch dims collapse; the kernels take any 2-D strides
    impl = _activation_backend(op, x)
    # the dense composition without a seed: torch's own dropout (module docstring)
    seed = None if impl == "dense" and seed is None else _resolve_seed(seed, p_drop, x2.shape[0] * k * r)
    spec = _FacTSpec(split, scale, p_drop, seed)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if impl == "dense":
            out = _dense_fact(x2, weight, bias, U, V, cores, spec)
        elif compiling():
            out = _fact_op(x2, weight, bias, U, V, cores, split, scale, p_drop, _seed_tensor(seed), impl)
        else:
            out = FacTFunction.apply(x2, weight, bias, U, V, cores, spec, impl)
    return out.reshape(*lead, d_out)


def fact_apply(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    cores: torch.Tensor,
    scale: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    split: str = "rows",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """The FacT increments of ``k = cores.shape[0]`` slots applied to activations, with
    ``x @ U`` computed once for all of them (DESIGN.md 4.2; the FacT code recomputes it per slot).

    ``split="rows"``: every slot reads ``x: (..., d)``; returns ``(..., k*d)`` with slot ``j``'s
    ``s * drop((x @ U) @ cores[j]) @ V.T`` in features ``[j d, (j+1) d)`` (timm's fused qkv:
    q, k, v; fc1's 4 row blocks). ``split="cols"``: ``x: (..., k*d)`` is ``k`` contiguous chunks,
    slot ``j`` reads chunk ``j``, and the ``(..., d)`` sum of the slots' increments is returned
    (fc2's 4 column blocks). ``dropout`` acts on the ``(..., k, r)`` intermediate (per slot and
    rank index) when ``training``; ``seed`` fixes its mask (None: drawn from torch's global
    generator; see the module docstring -- the mask is :func:`dropout_keep_mask` for
    ``N * k`` rows, viewed as ``(N, k, r)``).

    Triton on CUDA (one kernel forward, one persistent kernel backward; the r-dim
    intermediate never leaves the chip), structured torch code elsewhere; backend ``"dense"``
    runs cuBLAS GEMMs in the activations' dtype in plain autograd (``_dense_fact``); ``x`` of any
    strides, fp16/bf16/fp32 (fp64 on the torch backend), fp32 accumulation, the result in
    ``x``'s dtype (the autocast dtype under autocast), factor gradients in the factors' dtypes.
    """
    return _fact_call(x, None, None, U, V, cores, scale, dropout, training, split, seed, "fact_apply")


def fact_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    V: torch.Tensor,
    cores: torch.Tensor,
    scale: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    split: str = "rows",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + fact_apply(x, U, V, cores, ...)``, fused: a FacT layer
    (``weight: (k*d, d)`` for ``split="rows"``, ``(d, k*d)`` for ``"cols"``; ``bias`` of the
    output width or None). On Triton the kernel writes the increments plus the bias into the
    output and cuBLAS adds the frozen ``x @ weight.T`` in its ``beta = 1`` epilogue; the
    backward's ``dx`` gets ``dout @ weight`` the same way. ``weight``/``bias`` receive gradients
    only if they require them (normally frozen). Under autocast ``x``, ``weight`` and ``bias``
    run in the autocast dtype, as an ``nn.Linear``'s would; otherwise they must share ``x``'s
    dtype. Other arguments as :func:`fact_apply`.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (use fact_apply for the increment alone), "
                        f"got {type(weight).__name__}")
    return _fact_call(x, weight, bias, U, V, cores, scale, dropout, training, split, seed, "fact_linear")


# ----------------------------------------------------------------------------------------
# public functional API
# ----------------------------------------------------------------------------------------
def _check_dropout(dropout) -> float:
    """A dropout probability in [0, 1) (shared validator: TypeError for a bool, a string or
    a tensor, ValueError out of range or NaN)."""
    return check_probability("dropout", dropout, max_open=True)


def _resolve_seed(seed, p_drop: float, n_elements: int) -> int:
    if p_drop == 0.0:
        return 0
    if n_elements >= 2**31:
        # the kernels' Philox counter is the element index n * r + j in int32
        raise ValueError(f"dropout supports fewer than 2**31 intermediate elements (rows * r), got {n_elements}")
    if seed is None:
        # from torch's global CPU generator: torch.manual_seed makes the masks reproducible.
        # While torch.compile traces, the draw stays in the graph as a 0-d tensor (an .item()
        # would break it; the kernels' custom ops take the seed as that tensor)
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        return seed if compiling() else int(seed.item())
    return check_int("seed", seed, min=0, max=2**31 - 1, desc="an int or None, in [0, 2**31)")


def _seed_tensor(seed) -> torch.Tensor:
    """A seed as the custom ops take it: a 0-d int64 CPU tensor."""
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


def _activation_backend(op: str, x: torch.Tensor) -> str:
    refuses = _TRITON_REFUSES_FP64 if x.dtype == torch.float64 else None
    return backend.select(op, x.device, triton_refuses=refuses, dense=op in _DENSE_OPS, cuda_auto=_CUDA_AUTO[op])


def arc(
    x: torch.Tensor,
    U: torch.Tensor,
    lam: torch.Tensor,
    bias: Optional[torch.Tensor],
    dropout: float = 0.0,
    training: bool = True,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """ARC (DESIGN.md 4.3): ``x + drop((x @ U) * lam) @ U.T + bias``, fused.

    ``x: (..., d)`` of any strides, fp16/bf16/fp32 (fp64 on the torch backend); ``U: (d, r)``
    (shared down-projection, its transpose the up-projection); ``lam: (r,)``; ``bias: (d,)``
    or None. ``dropout`` acts on the r-dim intermediate ``(x @ U) * lam`` when ``training``;
    ``seed`` fixes its mask (None: drawn from torch's global generator; see the module
    docstring). Accumulates in fp32 (fp64 for fp64 ``x``); the result has ``x``'s dtype, the
    factor gradients their factors' dtypes. Never forms ``U diag(lam) U^T``. The projections
    run at the data's precision: ``x``'s dtype, or under autocast the autocast dtype for fp32
    ``x`` (as the reference's matmuls would): bf16 GEMMs on the dense path, the Triton
    kernels' dots as TF32 for bf16 and 3xTF32 for fp16 (the structured torch backend keeps
    the accumulation dtype); the residual and the result stay in ``x``'s dtype.
    """
    check_tensor("x", x, min_ndim=1, dtypes=_ACTIVATION_DTYPES)
    check_tensor("U", U, ndim=2, device=x.device)
    check_tensor("lam", lam, ndim=1, device=x.device)
    d, r = U.shape
    if d < 1 or r < 1:
        raise ValueError(f"U must have shape (d, r) with d, r >= 1, got {tuple(U.shape)}")
    if x.shape[-1] != d:
        raise ValueError(f"x's last dim must be d = {d} (U has shape (d, r) = {tuple(U.shape)}), got {tuple(x.shape)}")
    if lam.shape[0] != r:
        raise ValueError(f"lam must have shape (r,) = ({r},), got {tuple(lam.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if bias.shape[0] != d:
            raise ValueError(f"bias must have shape (d,) = ({d},), got {tuple(bias.shape)}")
    p_drop = _check_dropout(dropout)  # validated also when not training
    if not training:
        p_drop = 0.0
    lead = x.shape[:-1]
    rows = x.reshape(-1, d)  # a view whenever the batch dims collapse; the kernels take any 2-D strides
    impl = _activation_backend("arc", x)
    # the dense composition without a seed: torch's own dropout (module docstring)
    seed = None if impl == "dense" and seed is None else _resolve_seed(seed, p_drop, rows.shape[0] * r)
    spec = _Spec("channel", "diag", True, p_drop, seed, _data_dtype(x))
    # the kernels and the torch backend take a scale operand; the dense path needs none
    one = None if impl == "dense" else torch.ones((), dtype=compute_dtype(x.dtype), device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = _apply_bottleneck(rows, None, U, None, lam, one, bias, spec, impl)
    return out.reshape(*lead, d)


def losa_mixer(
    h: torch.Tensor,
    z: torch.Tensor,
    W_down: torch.Tensor,
    W_up: torch.Tensor,
    alpha: Union[float, torch.Tensor],
    axis: str = "channel",
) -> torch.Tensor:
    """LoSA's low-rank mixer (DESIGN.md 4.4): ``h + alpha * GELU(x @ W_down) @ W_up`` with
    ``x = z + h`` (exact GELU), fused.

    ``axis="channel"``: along the last axis, ``h, z: (..., C)``, ``W_down: (C, r)``,
    ``W_up: (r, C)``. ``axis="token"``: along the token axis of ``h, z: (..., T, C)``, with
    ``W_down: (T, r)``, ``W_up: (r, T)`` -- the kernels read the token axis through its stride,
    with no transposed copy. ``alpha``: a Python number or a one-element tensor (the learned
    scale; it gets a gradient when it requires one). ``z`` is the frozen backbone's block
    output and usually needs no gradient (none is computed then). fp16/bf16/fp32 activations
    (fp64 on the torch backend), fp32 accumulation; the result has ``h``'s dtype. Under
    autocast the projections of fp32 ``h`` run at the autocast dtype, as for :func:`arc`.
    """
    if axis not in ("channel", "token"):
        raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")
    token = axis == "token"
    check_tensor("h", h, min_ndim=2 if token else 1, dtypes=_ACTIVATION_DTYPES)
    check_tensor("z", z, dtypes=_ACTIVATION_DTYPES, device=h.device)
    if z.shape != h.shape:
        raise ValueError(f"z must have h's shape {tuple(h.shape)}, got {tuple(z.shape)}")
    if z.dtype != h.dtype:
        raise TypeError(f"z has dtype {z.dtype} but h has {h.dtype}; they must match")
    check_tensor("W_down", W_down, ndim=2, device=h.device)
    check_tensor("W_up", W_up, ndim=2, device=h.device)
    n_feat, r = W_down.shape
    if n_feat < 1 or r < 1:
        raise ValueError(f"W_down must have shape (features, r) with both >= 1, got {tuple(W_down.shape)}")
    feat_dim, feat_name = (-2, "T (h's second to last dim)") if token else (-1, "C (h's last dim)")
    if h.shape[feat_dim] != n_feat:
        raise ValueError(
            f"W_down must have shape ({feat_name} = {h.shape[feat_dim]}, r) for axis={axis!r}, "
            f"got {tuple(W_down.shape)}"
        )
    if tuple(W_up.shape) != (r, n_feat):
        raise ValueError(
            f"W_up must have shape (r, {n_feat}) = ({r}, {n_feat}) to match W_down, got {tuple(W_up.shape)}"
        )
    acc = compute_dtype(h.dtype)
    if isinstance(alpha, torch.Tensor):
        check_tensor("alpha", alpha, device=h.device, dtypes=FLOAT_DTYPES)
        if alpha.numel() != 1:
            raise ValueError(f"alpha must have one element, got shape {tuple(alpha.shape)}")
        scale = alpha
    else:
        scale = torch.tensor(check_scale(alpha, "alpha"), dtype=acc, device=h.device)

    impl = _activation_backend("losa_mixer", h)
    spec = _Spec(axis, "gelu", True, 0.0, 0, _data_dtype(h))
    if token:
        rows_h, rows_z = h.reshape(-1, *h.shape[-2:]), z.reshape(-1, *z.shape[-2:])  # (B, T, C)
    else:
        rows_h, rows_z = h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1])  # (N, C)
    with torch.autocast(device_type=h.device.type, enabled=False):
        out = _apply_bottleneck(rows_h, rows_z, W_down, W_up, None, scale, None, spec, impl)
    return out.reshape(h.shape)


def dropout_keep_mask(n_rows: int, r: int, dropout: float, seed: int, device, impl: str) -> torch.Tensor:
    """The ``(n_rows, r)`` bool keep mask that backend ``impl`` (``"torch"``/``"triton"``)
    applies for ``(dropout, seed)`` to the r-dim intermediate of ``n_rows`` flattened rows
    (token mode: rows ``(b, c)``, b-major)."""
    if impl == "triton":
        return _triton_bottleneck().dropout_keep_mask(n_rows, r, dropout, seed, device)
    return _torch_keep_mask(n_rows, r, dropout, seed, torch.device(device))
