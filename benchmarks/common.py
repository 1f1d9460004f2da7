"""Cases, variants, timing, peak memory and provenance shared by the pytest suite and the report.

A *case* is one op at one shape in one mode (``fwd+bwd`` or ``fwd``); each case runs in
several *variants*:

* ``fused``      -- the kron_kernels op (activations need grad, fp32 factors trainable,
                    the dense weight frozen);
* ``reference``  -- ``kron_kernels.reference`` (the papers' way: the increment materialised
                    through the 5-D einsum, a dense matmul, and so a dense d x d gradient);
* ``floor``      -- the frozen layer alone: ``F.linear(x, W, b)`` forward + input gradient
                    (weight frozen); for the adapter a copy forward + a copy backward, i.e.
                    the memcpy roofline (``torch.clone``);
* ``peft_lokr``  -- a PEFT LoKr-adapted ``nn.Linear`` of the same shape, where peft is importable.

``build`` turns (case, variant, device, tokens) into a zero-argument step function; the
step runs forward and, in ``fwd+bwd`` mode, ``torch.autograd.grad`` on every trainable
input (so no ``.grad`` accumulates between repeats). ``measure_case`` records each
variant's peak extra memory and times them (``do_bench`` on CUDA; ``perf_counter`` on
CPU, the variants taking turns so that a shared machine's load skews them alike).

Nothing here touches CUDA or imports Triton/PEFT at import time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kron_kernels as kk
from kron_kernels.reference import arc as ref_arc
from kron_kernels.reference import compacter as ref_compacter
from kron_kernels.reference import fact as ref_fact
from kron_kernels.reference import fastfood as ref_fastfood
from kron_kernels.reference import losa as ref_losa
from kron_kernels.reference import kadaptation as ref_kadaptation

REPO_ROOT = Path(__file__).resolve().parents[1]

VIT_TOKENS = 197  # 14 x 14 patches + the class token at 224 px, patch 16
VARIANTS = ("fused", "fused_v2", "triton", "cuda", "cublas", "reference", "floor", "peft_lokr", "fast_hadamard_transform")
FWD_BWD, FWD = "fwd+bwd", "fwd"


# ----------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One op at one shape in one mode; ``params`` as (key, value) pairs so the case hashes."""

    op: str
    shape: str
    mode: str
    variants: Tuple[str, ...]
    params: Tuple[Tuple[str, Any], ...]

    @property
    def p(self) -> Dict[str, Any]:
        return dict(self.params)

    @property
    def group(self) -> str:
        """The pytest-benchmark group and the report's case label, e.g. ``kron_linear-d768-n32-r1``."""
        suffix = "" if self.mode == FWD_BWD else f"-{self.mode}"
        return f"{self.op}-{self.shape}{suffix}"


# (d, n, p): d = n * p; A: (n, n, n), U, V: (n, p, r)  (DESIGN.md 4.1, KAdaptation defaults n = 32)
KRON_SHAPES = (("ViT-B", 768, 32, 24), ("ViT-L", 1024, 32, 32))
KRON_RANKS = (1, 4)
# Compacter: bottleneck k = d / 32, PHM n = 4, rank-one fast weights
ADAPTER_SHAPES = (("ViT-B", 768, 24), ("ViT-L", 1024, 32))
PHM_N = 4


def kron_ops_cases(quick: bool = False) -> List[Case]:
    """The first benchmark set: Kronecker ops and the Compacter adapter at ViT-B/L shapes
    (``quick``: the default rank r = 1 only)."""
    cases = []
    # fused: auto (on CUDA the dense cuBLAS-first composition, ops/kron.py's choice table);
    # triton: the structured Triton kernels, measured beside it so that a GPU run decides
    for op, variants in (
        ("kron_linear", ("fused", "triton", "reference", "floor", "peft_lokr")),
        ("kron_matmul", ("fused", "triton", "reference", "floor")),
    ):
        for model, d, n, p in KRON_SHAPES:
            for r in KRON_RANKS[:1] if quick else KRON_RANKS:
                params = (("model", model), ("d", d), ("n", n), ("p", p), ("r", r))
                cases.append(Case(op, f"d{d}-n{n}-r{r}", FWD_BWD, variants, params))
    for model, d, k in ADAPTER_SHAPES:
        params = (("model", model), ("d", d), ("k", k), ("n", PHM_N))
        # training step: PHM weights rebuilt from their factors, adapter forward + backward
        cases.append(Case("compacter_adapter", f"d{d}-k{k}-n{PHM_N}", FWD_BWD, ("fused", "reference", "floor"), params))
        # the adapter kernel alone (weights prebuilt, no autograd): the bandwidth target
        cases.append(Case("bottleneck_adapter", f"d{d}-k{k}", FWD, ("fused", "triton", "reference", "floor"), params))
    return cases


# Walsh-Hadamard transform (issue 4): row lengths 2^8 ... 2^15; a batch of 16 * 2048 rows on GPU,
# on CPU 256 rows up to n = 4096 (the CPU target's shape) and 2^20 elements beyond. The default
# suite is issue 12's target rows, n = 2^10 ... 2^13 in every dtype (it must finish within 3
# minutes on an H100/H200 together with the fastfood suite: estimated_gpu_seconds); the other
# lengths run with --full (report) / --bench-full (pytest) or when --cases names them.
FWHT_LOGS = tuple(range(8, 16))
FWHT_DEFAULT_LOGS = tuple(range(10, 14))
FWHT_DTYPES = ("float16", "bfloat16", "float32")
FWHT_GPU_ROWS = 16 * 2048
FWHT_CPU_ROWS = 256
FWHT_CPU_ELEMENTS = 2**20


def fwht_cases(quick: bool = False, full: bool = False) -> List[Case]:
    """kk.fwht forward (``fwd``: no autograd; the backward is the same transform) per row length
    and dtype, in the variants ``fused`` (auto: its choice table), ``triton``, ``cuda`` (the
    compiled extension's kernel, on GPU: measured beside auto's choice, so that a run decides
    the table), ``reference`` (the torch butterfly, one vectorised stage per bit), ``floor``
    (``torch.clone``, the memcpy roofline) and Dao's ``fast_hadamard_transform`` where it is
    installed. Default n = 2^10 ... 2^13 (the issue-12 targets), ``full``: 2^8 ... 2^15; quick:
    n = 2^8, 2^12, 2^15 in bf16 and fp32."""
    logs = (8, 12, 15) if quick else FWHT_LOGS if full else FWHT_DEFAULT_LOGS
    dtypes = ("bfloat16", "float32") if quick else FWHT_DTYPES
    variants = ("fused", "triton", "cuda", "reference", "floor", "fast_hadamard_transform")
    return [
        Case("fwht", f"n{2**k}-{dtype}", FWD, variants, (("n", 2**k), ("dtype", dtype)))
        for k in logs
        for dtype in dtypes
    ]


# Fastfood (issue 4): theta in R^d -> P theta in R^D, forward alone (the HBM-write target) and
# a subspace training step of one ViT-B attention module (qkv + proj: D = 2,362,368). On GPU the
# default suite is the target row (d = 2^14, D = 86e6) and the subspace step; --full adds the
# other (d, D) (every D with every d: 16 rows whose reference and Triton variants take up to
# 0.1 s a call at D = 10^8)
FASTFOOD_TARGET = (2**14, 86_000_000)  # d, D of the issue's target (ViT-B has ~86M parameters)
FASTFOOD_GPU_DS, FASTFOOD_GPU_BIG_DS = (2**10, 2**12, 2**14, 2**15), (10**6, 10**7, 86_000_000, 10**8)
FASTFOOD_CPU_DS, FASTFOOD_CPU_BIG_DS = (2**10, 2**14), (10**6,)
FASTFOOD_QUICK_DS, FASTFOOD_QUICK_BIG_DS = (2**14,), (10**5,)
SUBSPACE_D = 2**14


def fastfood_cases(quick: bool = False, device: Optional[torch.device] = None, full: bool = False) -> List[Case]:
    """kk.fastfood forward (``fwd``, fp32 theta) per (d, D) -- GPU: the target d = 2^14, D = 86e6
    (``full``: d = 2^10..2^15, D = 10^6..10^8); CPU: d = 2^10, 2^14, D = 10^6 (default and full);
    quick: d = 2^14, D = 10^5 -- in the variants ``fused`` (auto: the compiled kernel, stacked
    mode, generator 1: the default), ``fused_v2`` (the same with ``generator=2``, timed beside it
    so that a GPU run decides the default), ``triton``, ``reference`` and ``floor`` (writing D
    floats); and a subspace training step of a ViT-B attention module (``subspace_attn``)."""
    device = device or default_device()
    if quick:
        pairs = [(d, D) for D in FASTFOOD_QUICK_BIG_DS for d in FASTFOOD_QUICK_DS]
    elif device.type == "cuda":
        pairs = [(d, D) for D in FASTFOOD_GPU_BIG_DS for d in FASTFOOD_GPU_DS] if full else [FASTFOOD_TARGET]
    else:
        pairs = [(d, D) for D in FASTFOOD_CPU_BIG_DS for d in FASTFOOD_CPU_DS]
    variants = ("fused", "fused_v2", "triton", "reference", "floor")
    cases = [Case("fastfood", f"d{d}-D{D}", FWD, variants, (("d", d), ("D", D))) for d, D in pairs]
    cases.append(Case("subspace_attn", f"d{SUBSPACE_D}", FWD_BWD, ("fused", "reference", "floor"),
                      (("model", BLOCK_MODEL), ("d", SUBSPACE_D))))
    return cases


# How long a suite takes on an H100/H200, estimated from the one timing there is: the H200 run of
# 2026-11-27 (../shared/gpu/README.md) got through 43 of the full fwht + fastfood report's 187
# variant runs in 70 s before its time box (process start, Triton compilation, the build and
# peak-memory calls and do_bench's 50 + 200 ms budget per run included). The default fwht +
# fastfood suites must fit in GPU_SUITE_BUDGET_S (issue 12).
GPU_SECONDS_PER_RUN = 70 / 43
GPU_SUITE_BUDGET_S = 180


def estimated_gpu_seconds(cases: Sequence[Case]) -> float:
    """The report's wall time for ``cases`` on an H100/H200 at the default timing (an estimate:
    the measured rate per variant run times the number of runs)."""
    return GPU_SECONDS_PER_RUN * sum(len(case.variants) for case in cases)


def fwht_rows(n: int, device: torch.device, tokens: int) -> int:
    """Rows of an fwht case: the suite's batch at the default token count, else ``tokens``
    (``--tokens`` / quick runs scale the batch down)."""
    if tokens != default_tokens(device):
        return tokens
    if device.type == "cuda":
        return FWHT_GPU_ROWS
    return max(1, min(FWHT_CPU_ROWS, FWHT_CPU_ELEMENTS // n))


# The low-rank bottleneck family (issue 3) at ViT-B: d = 768, 197 tokens per image; FacT r = 8
# over S = 144 slots (12 layers x 12), ARC r = 50 with its default dropout 0.1, LoSA r = 64
BOTTLENECK_D = 768
FACT_R, FACT_SLOTS, FACT_SLOTS_QUICK = 8, 144, 12
FACT_DROPOUT = 0.1  # FacT's default
ARC_R, ARC_DROPOUT = 50, 0.1
LOSA_R = 64
# one transformer block of ViT-B/16 adapted by kk.adapt (method defaults) against the frozen block,
# on max(1, tokens // 197) images of 197 tokens
BLOCK_MODEL, BLOCK_METHODS = "vit_base_patch16_224", ("fact_tt", "fact_tk", "arc")


def bottleneck_cases(quick: bool = False) -> List[Case]:
    """kk.fact_tt_delta / fact_tk_delta (fwd+bwd: the (S, d, d) increments and their factor
    gradients; quick: S = 12), kk.arc and kk.losa_mixer (channel and token) in a training step
    (fwd+bwd) and forward alone (``fwd``: the bandwidth target), each against its reference
    and the memcpy floor; and one ViT-B block forward+backward adapted with FacT-TT, FacT-TK
    and ARC (``vit_block``: fused vs reference vs the frozen block)."""
    d, variants = BOTTLENECK_D, ("fused", "reference", "floor")
    slots = FACT_SLOTS_QUICK if quick else FACT_SLOTS
    cases = [
        Case(op, f"d{d}-r{FACT_R}-S{slots}", FWD_BWD, variants,
             (("model", "ViT-B"), ("d", d), ("r", FACT_R), ("S", slots)))
        for op in ("fact_tt_delta", "fact_tk_delta")
    ]
    # fused: auto (on CUDA the dense composition, ops/bottleneck.py's choice table); triton: the
    # fused kernels, measured beside it so that a GPU run decides
    mixer_variants = ("fused", "triton", "reference", "floor")
    for mode in (FWD_BWD, FWD):
        cases.append(Case("arc", f"d{d}-r{ARC_R}", mode, mixer_variants,
                          (("model", "ViT-B"), ("d", d), ("r", ARC_R), ("dropout", ARC_DROPOUT))))
        for axis in ("channel", "token"):
            cases.append(Case(f"losa_{axis}", f"d{d}-r{LOSA_R}", mode, mixer_variants,
                              (("model", "ViT-B"), ("d", d), ("r", LOSA_R), ("axis", axis))))
    # FacT applied in a layer (auto on CUDA: the Triton kernels, ops/bottleneck.py's choice
    # table) beside its cuBLAS composition (backend "dense"), so that a GPU run decides: the
    # H200 profile of commit 93d8659 put 48 % of a FacT step's kernel time in the Triton
    # backward (0.45 ms a call)
    for split, k in (("rows", 3), ("cols", 4)):
        for mode in (FWD_BWD, FWD):
            cases.append(Case("fact_linear", f"d{d}-r{FACT_R}-{split}{k}", mode,
                              ("fused", "cublas", "reference", "floor"),
                              (("model", "ViT-B"), ("d", d), ("r", FACT_R), ("split", split), ("k", k),
                               ("dropout", FACT_DROPOUT))))
    for method in BLOCK_METHODS:
        cases.append(Case("vit_block", f"{method}-d{d}", FWD_BWD, variants,
                          (("model", BLOCK_MODEL), ("d", d), ("method", method))))
    return cases


def select_cases(cases: Sequence[Case], patterns: Optional[Sequence[str]]) -> List[Case]:
    """Cases whose label (``group``) contains any of the substrings (all when none given)."""
    if not patterns:
        return list(cases)
    return [c for c in cases if any(pat in c.group for pat in patterns)]


def parse_case_patterns(values: Optional[Sequence[str]]) -> List[str]:
    """``--bench-cases`` values (each ``PATTERN[,PATTERN...]``, the option repeatable) as a list."""
    return [pat.strip() for value in values or () for pat in value.split(",") if pat.strip()]


def bench_selected(label: str, default: bool, patterns: Sequence[str], full: bool) -> bool:
    """Whether the pytest suite runs a case (benchmarks/conftest.py): with patterns, every case of
    the full lists whose label contains one; else the default cases, and with ``full`` all."""
    if patterns:
        return any(pat in label for pat in patterns)
    return default or full


# ----------------------------------------------------------------------------------------
# devices and dtypes
# ----------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def training_autocast(device: torch.device):
    """The autocast context of a training step: bf16 on CUDA (fp32 weights, bf16 GEMMs), none on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def activation_dtype(device: torch.device) -> torch.dtype:
    """bf16 activations and frozen weights on GPU, fp32 on CPU; factors are always fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_tokens(device: torch.device, quick: bool = False) -> int:
    """Tokens per step: a batch of 64 ViT images on GPU, 8 on CPU (quick: 8 on GPU, 1 on CPU)."""
    if device.type == "cuda":
        return (8 if quick else 64) * VIT_TOKENS
    return (1 if quick else 8) * VIT_TOKENS


# ----------------------------------------------------------------------------------------
# building the step functions
# ----------------------------------------------------------------------------------------
class Unavailable(Exception):
    """A variant that cannot run here (a missing optional dependency); shown as skipped."""


@dataclass
class Bench:
    """A ready-to-run step: ``fn()`` does one forward (+ backward); returns nothing so that
    everything it allocates is freed when it returns."""

    fn: Callable[[], None]
    bytes_moved: Optional[int] = None  # the memcpy-roofline bytes (read input + write output), fwd cases
    extra: Dict[str, Any] = field(default_factory=dict)


class _CopyForwardCopyBackward(torch.autograd.Function):
    """``x.clone()`` whose backward also copies: one read + one write of the activation each
    way, the memory-traffic floor of any residual adapter (clone's own backward is free)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _randn(gen, *shape, std=1.0, device, dtype, requires_grad=False):
    t = (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _step(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: Optional[torch.Tensor]):
    """One step: forward, then (with ``grad_out``) the gradients of every input in ``inputs``."""
    if grad_out is None:

        def fwd_only():
            with torch.no_grad():
                forward()

        return fwd_only

    inputs = tuple(inputs)

    def fwd_bwd():
        torch.autograd.grad(forward(), inputs, grad_out)

    return fwd_bwd


def _on_backend(op: Callable[[], Any], name: str) -> Callable[[], Any]:
    """``op`` run on kron_kernels backend ``name``."""
    def run():
        with kk.use_backend(name):
            return op()

    return run


def _on_triton(op: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``op`` on the structured Triton kernels (variant ``triton``: measured beside ``fused``,
    i.e. ``auto``, so that a GPU run can decide the choice tables); Unavailable where Triton
    cannot run."""
    ok, reason = kk.backend.triton_status(device)
    if not ok:
        raise Unavailable(f"Triton cannot run here: {reason}")
    return _on_backend(op, "triton")


def build(case: Case, variant: str, device: torch.device, tokens: int, seed: int = 0) -> Bench:
    """The step function of ``variant`` of ``case``; raises :class:`Unavailable` to skip."""
    if variant not in case.variants:
        raise ValueError(f"case {case.group} has no variant {variant!r} (it has {case.variants})")
    gen = torch.Generator().manual_seed(seed)
    if case.op in ("kron_linear", "kron_matmul"):
        return _build_kron(case, variant, device, tokens, gen)
    if case.op == "compacter_adapter":
        return _build_compacter(case, variant, device, tokens, gen)
    if case.op == "bottleneck_adapter":
        return _build_adapter_forward(case, variant, device, tokens, gen)
    if case.op == "fwht":
        return _build_fwht(case, variant, device, tokens, gen)
    if case.op in ("fact_tt_delta", "fact_tk_delta"):
        return _build_fact_delta(case, variant, device, gen)
    if case.op == "arc" or case.op.startswith("losa_"):
        return _build_bottleneck(case, variant, device, tokens, gen)
    if case.op == "fact_linear":
        return _build_fact_linear(case, variant, device, tokens, gen)
    if case.op == "vit_block":
        return _build_vit_block(case, variant, device, tokens, gen)
    if case.op == "fastfood":
        return _build_fastfood(case, variant, device, gen)
    if case.op == "subspace_attn":
        return _build_subspace_attn(case, variant, device, tokens, gen)
    raise ValueError(f"unknown op {case.op!r}")


def _build_kron(case, variant, device, tokens, gen) -> Bench:
    prm = case.p
    d, n, p, r = prm["d"], prm["n"], prm["p"], prm["r"]
    dtype = activation_dtype(device)
    linear = case.op == "kron_linear"
    x = _randn(gen, tokens, d, device=device, dtype=dtype, requires_grad=True)
    weight = _randn(gen, d, d, std=d**-0.5, device=device, dtype=dtype)  # frozen
    bias = _randn(gen, d, std=0.02, device=device, dtype=dtype) if linear else None
    A = _randn(gen, n, n, n, std=n**-0.5, device=device, dtype=torch.float32, requires_grad=True)
    U = _randn(gen, n, p, r, std=p**-0.5, device=device, dtype=torch.float32, requires_grad=True)
    V = _randn(gen, n, p, r, std=p**-0.5, device=device, dtype=torch.float32, requires_grad=True)
    grad_out = _randn(gen, tokens, d, device=device, dtype=dtype)
    scale = 1.0
    factors = (x, A, U, V)
    extra: Dict[str, Any] = {}

    if variant in ("fused", "triton"):
        if linear:
            op = lambda: kk.kron_linear(x, weight, bias, A, U, V, scale)  # noqa: E731
        else:
            op = lambda: kk.kron_matmul(x, A, U, V, scale)  # noqa: E731
        forward = op
        if variant == "triton":
            forward = _on_triton(op, device)
            extra["note"] = "the structured Triton kernels (backend 'triton')"
        return Bench(_step(forward, factors, grad_out), extra=extra)
    if variant == "reference":
        if linear:
            forward = lambda: ref_kadaptation.kron_linear(x, weight, bias, A, U, V, scale)  # noqa: E731
        else:
            forward = lambda: ref_kadaptation.kron_matmul(x, A, U, V, scale)  # noqa: E731
        return Bench(_step(forward, factors, grad_out), extra=extra)
    if variant == "floor":
        forward = lambda: F.linear(x, weight, bias)  # noqa: E731
        extra["floor"] = "frozen F.linear(x, W, b): forward + input gradient only"
        return Bench(_step(forward, (x,), grad_out), extra=extra)
    if variant == "peft_lokr":
        return _build_peft_lokr(x, weight, bias, n, r, grad_out)
    raise ValueError(f"unknown variant {variant!r}")


class _OneLinear(nn.Module):
    """The smallest module PEFT can adapt: one ``nn.Linear`` named ``linear``."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.linear(x)


def _build_peft_lokr(x, weight, bias, n, r, grad_out) -> Bench:
    try:
        import peft
        from peft import LoKrConfig, get_peft_model
    except Exception as exc:  # ImportError, or a peft/transformers version clash
        raise Unavailable(f"peft is not importable ({type(exc).__name__}: {exc})") from None
    d_out, d_in = weight.shape
    module = _OneLinear(d_in, d_out, bias is not None).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        module.linear.weight.copy_(weight)
        if bias is not None:
            module.linear.bias.copy_(bias)
    # decompose_factor = n gives w1: (n, n) and w2 = w2_a @ w2_b: (d/n, d/n) of rank r -- the
    # same block structure as one of our n Kronecker terms (LoKr has a single term).
    config = LoKrConfig(r=r, alpha=r, target_modules=["linear"], decompose_factor=n, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(module, config)
    model.train()
    trainable = [t for t in model.parameters() if t.requires_grad]
    if not trainable:
        raise RuntimeError("PEFT LoKr produced no trainable parameter")
    shapes = {
        name.split("linear.")[-1].replace(".default", ""): list(t.shape)
        for name, t in model.named_parameters()
        if t.requires_grad
    }
    extra = {
        "peft_version": getattr(peft, "__version__", "unknown"),
        "peft_lokr": (
            f"LoKrConfig(r={r}, alpha={r}, decompose_factor={n}): one Kronecker term kron(w1, w2_a @ w2_b) "
            f"with trainable {shapes}, dtype {trainable[0].dtype}; ours has {n} terms of rank {r}"
        ),
    }
    return Bench(_step(lambda: model(x), (x, *trainable), grad_out), extra=extra)


def _phm_factors(case, device, gen):
    """Shared A (n, n, n) and rank-one s/t factors of the down (d->k) and up (k->d) PHM layers."""
    prm = case.p
    d, k, n = prm["d"], prm["k"], prm["n"]
    f32 = dict(device=device, dtype=torch.float32, requires_grad=True)
    A = _randn(gen, n, n, n, std=n**-0.5, **f32)
    s_down = _randn(gen, n, k // n, 1, std=(k // n) ** -0.5, **f32)
    t_down = _randn(gen, n, d // n, 1, std=(d // n) ** -0.5, **f32)
    b_down = _randn(gen, k, std=0.02, **f32)
    s_up = _randn(gen, n, d // n, 1, std=(d // n) ** -0.5, **f32)
    t_up = _randn(gen, n, k // n, 1, std=(k // n) ** -0.5, **f32)
    b_up = _randn(gen, d, std=0.02, **f32)
    return A, s_down, t_down, b_down, s_up, t_up, b_up


def _bottleneck_adapter_op():
    op = getattr(kk, "bottleneck_adapter", None)
    if op is None:
        raise Unavailable(
            "kk.bottleneck_adapter is not in this checkout yet (kron_kernels/ops/adapter.py); "
            "the fused adapter variants are skipped"
        )
    return op


def _build_compacter(case, variant, device, tokens, gen) -> Bench:
    d = case.p["d"]
    dtype = activation_dtype(device)
    h = _randn(gen, tokens, d, device=device, dtype=dtype, requires_grad=True)
    factors = _phm_factors(case, device, gen)
    A, s_down, t_down, b_down, s_up, t_up, b_up = factors
    grad_out = _randn(gen, tokens, d, device=device, dtype=dtype)
    inputs = (h, *factors)

    if variant == "fused":
        adapter = _bottleneck_adapter_op()

        def forward():
            # as kron_kernels.nn's Compacter adapter does: the (k x d) PHM weights are rebuilt from
            # the factors every step and passed in the factors' dtype; the op casts them
            w_down = kk.kron_delta(A, s_down, t_down)
            w_up = kk.kron_delta(A, s_up, t_up)
            return adapter(h, w_down, b_down, w_up, b_up)

        return Bench(_step(forward, inputs, grad_out))
    if variant == "reference":
        forward = lambda: ref_compacter.compacter_adapter(h, *factors)  # noqa: E731
        return Bench(_step(forward, inputs, grad_out))
    if variant == "floor":
        forward = lambda: _CopyForwardCopyBackward.apply(h)  # noqa: E731
        return Bench(
            _step(forward, (h,), grad_out),
            extra={"floor": "memcpy roofline: clone forward + clone backward of the activation"},
        )
    raise ValueError(f"unknown variant {variant!r}")


def _build_adapter_forward(case, variant, device, tokens, gen) -> Bench:
    d = case.p["d"]
    dtype = activation_dtype(device)
    h = _randn(gen, tokens, d, device=device, dtype=dtype)
    A, s_down, t_down, b_down, s_up, t_up, b_up = _phm_factors(case, device, gen)
    with torch.no_grad():  # fp32 as the nn module passes them; the reference's F.linear needs h's dtype
        w_down, w_up = kk.kron_delta(A, s_down, t_down), kk.kron_delta(A, s_up, t_up)
        weights = tuple(t.detach() for t in (w_down, b_down, w_up, b_up))
        weights_cast = tuple(t.to(dtype) for t in weights)
    bytes_moved = 2 * h.numel() * h.element_size()  # read h, write the output
    extra = {"note": "forward alone under no_grad, PHM weights prebuilt"}
    if variant in ("fused", "triton"):
        adapter = _bottleneck_adapter_op()
        forward = lambda: adapter(h, *weights)  # noqa: E731
        if variant == "triton":
            forward = _on_triton(forward, device)
    elif variant == "reference":
        forward = lambda: ref_compacter.bottleneck_adapter(h, *weights_cast)  # noqa: E731
    elif variant == "floor":
        forward = lambda: torch.clone(h)  # noqa: E731
        extra = {"floor": "torch.clone(h): the memcpy roofline"}
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return Bench(_step(forward, (), None), bytes_moved=bytes_moved, extra=extra)


def _build_fwht(case, variant, device, tokens, gen) -> Bench:
    n, dtype = case.p["n"], getattr(torch, case.p["dtype"])
    rows = fwht_rows(n, device, tokens)
    x = _randn(gen, rows, n, device=device, dtype=dtype)
    bytes_moved = 2 * x.numel() * x.element_size()  # read x, write the transform
    extra: Dict[str, Any] = {"rows": rows}
    if variant == "fused":
        forward = lambda: kk.fwht(x)  # noqa: E731
    elif variant in ("triton", "cuda", "reference"):
        impl = "torch" if variant == "reference" else variant
        if impl == "triton":
            ok, reason = kk.backend.triton_status(device)
            if not ok:
                raise Unavailable(f"Triton cannot run here: {reason}")
        elif impl == "cuda":
            if device.type != "cuda":
                raise Unavailable("the cuda variant times the extension's GPU kernel (on CPU it is fused)")
            ok, reason = kk.backend.extension_status()
            if not ok:
                raise Unavailable(reason)
            extra["note"] = "the compiled extension's CUDA C++ kernel (backend 'cuda')"
        else:
            extra["note"] = "the torch butterfly (kron_kernels' torch backend: one vectorised stage per bit)"

        def forward():
            with kk.use_backend(impl):
                kk.fwht(x)

    elif variant == "floor":
        forward = lambda: torch.clone(x)  # noqa: E731
        extra["floor"] = "torch.clone(x): the memcpy roofline"
    elif variant == "fast_hadamard_transform":
        if device.type != "cuda":
            raise Unavailable("fast_hadamard_transform (Dao) runs on CUDA only")
        try:
            from fast_hadamard_transform import hadamard_transform
        except Exception as exc:
            raise Unavailable(f"fast_hadamard_transform is not importable ({type(exc).__name__}: {exc})") from None
        forward = lambda: hadamard_transform(x, 1.0)  # noqa: E731
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return Bench(_step(forward, (), None), bytes_moved=bytes_moved, extra=extra)


def _build_fact_delta(case, variant, device, gen) -> Bench:
    """The FacT increments and their factor gradients (independent of the token count)."""
    d, r, S = case.p["d"], case.p["r"], case.p["S"]
    f32 = dict(device=device, dtype=torch.float32, requires_grad=True)
    U, V = _randn(gen, d, r, std=d**-0.5, **f32), _randn(gen, d, r, std=d**-0.5, **f32)
    grad_out = _randn(gen, S, d, d, device=device, dtype=torch.float32)
    if case.op == "fact_tt_delta":
        factors = (U, V, _randn(gen, S, r, r, **f32))
        fused, ref = kk.fact_tt_delta, ref_fact.fact_tt_delta
    else:
        factors = (U, V, _randn(gen, r, r, r, std=r**-0.5, **f32), _randn(gen, S, r, **f32))
        fused, ref = kk.fact_tk_delta, ref_fact.fact_tk_delta
    if variant == "fused":
        extra = {"note": "torch matmul/bmm on every backend (cuBLAS on CUDA)"}
        return Bench(_step(lambda: fused(*factors), factors, grad_out), extra=extra)
    if variant == "reference":
        return Bench(_step(lambda: ref(*factors), factors, grad_out))
    if variant == "floor":
        delta = _randn(gen, S, d, d, device=device, dtype=torch.float32, requires_grad=True)
        forward = lambda: _CopyForwardCopyBackward.apply(delta)  # noqa: E731
        return Bench(_step(forward, (delta,), grad_out),
                     extra={"floor": "memcpy roofline: clone forward + clone backward of the (S, d, d) increments"})
    raise ValueError(f"unknown variant {variant!r}")


def _build_fact_linear(case, variant, device, tokens, gen) -> Bench:
    """A FacT layer of a ViT-B: ``split="rows"`` is the fused qkv (k = 3 slots reading x),
    ``"cols"`` fc2 (k = 4 chunks of x); frozen bf16 weight, fp32 U, V, cores, dropout 0.1."""
    d, r, k, split = case.p["d"], case.p["r"], case.p["k"], case.p["split"]
    dtype = activation_dtype(device)
    train = case.mode == FWD_BWD
    p = case.p["dropout"] if train else 0.0  # fwd rows: no dropout, as the mixers' fwd rows
    f32 = dict(device=device, dtype=torch.float32, requires_grad=True)
    d_in, d_out = (d, k * d) if split == "rows" else (k * d, d)
    x = _randn(gen, tokens, d_in, device=device, dtype=dtype, requires_grad=train)
    weight = _randn(gen, d_out, d_in, std=d_in**-0.5, device=device, dtype=dtype)  # frozen
    bias = _randn(gen, d_out, std=0.02, device=device, dtype=dtype)
    U, V = _randn(gen, d, r, std=d**-0.5, **f32), _randn(gen, d, r, std=d**-0.5, **f32)
    cores = _randn(gen, k, r, r, std=r**-0.5, **f32)
    inputs = (x, U, V, cores) if train else ()
    grad_out = _randn(gen, tokens, d_out, device=device, dtype=dtype) if train else None
    fused = lambda: kk.fact_linear(x, weight, bias, U, V, cores, 1.0, p, split=split, seed=1)  # noqa: E731
    extra: Dict[str, Any] = {}
    if variant in ("fused", "cublas"):
        op = fused
        if variant == "cublas":
            op = _on_backend(fused, "dense")
            extra["note"] = ("the dense composition (backend 'dense': cuBLAS GEMMs in the activations' dtype, "
                             "x @ U once)")
        return Bench(_step(op, inputs, grad_out), extra=extra)
    if variant == "reference":
        def forward():
            xs = x.chunk(k, dim=-1) if split == "cols" else [x] * k
            incs = [ref_fact.fact_apply(xj, U.to(dtype), V.to(dtype), cores[j].to(dtype), 1.0, p)
                    for j, xj in enumerate(xs)]
            inc = torch.cat(incs, dim=-1) if split == "rows" else sum(incs)
            return F.linear(x, weight, bias) + inc

        return Bench(_step(forward, inputs, grad_out), extra=extra)
    if variant == "floor":
        forward = lambda: F.linear(x, weight, bias)  # noqa: E731
        extra["floor"] = "frozen F.linear(x, W, b): forward (+ input gradient)"
        return Bench(_step(forward, (x,) if train else (), grad_out), extra=extra)
    raise ValueError(f"unknown variant {variant!r}")


def _build_bottleneck(case, variant, device, tokens, gen) -> Bench:
    """ARC (``x`` trainable-through, U / lam / bias trainable, dropout 0.1) and the LoSA mixer
    (``h`` the side network's state, ``z`` the frozen backbone's output without grad; the
    token mixer takes ``max(1, tokens // 197)`` images of 197 tokens)."""
    d, r = case.p["d"], case.p["r"]
    dtype = activation_dtype(device)
    f32 = dict(device=device, dtype=torch.float32, requires_grad=True)
    train = case.mode == FWD_BWD
    act = dict(device=device, dtype=dtype)
    if case.op == "arc":
        shape = (tokens, d)
        x = _randn(gen, *shape, **act, requires_grad=train)
        U, lam, bias = _randn(gen, d, r, std=d**-0.5, **f32), _randn(gen, r, **f32), _randn(gen, d, std=0.02, **f32)
        p = case.p["dropout"] if train else 0.0
        inputs, acts = (x, U, lam, bias), (x,)
        fused = lambda: kk.arc(x, U, lam, bias, p)  # noqa: E731
        # the reference's matmuls need one dtype: factors cast to the activations' (a graph op)
        ref = lambda: _ref_arc_in_dtype(x, U, lam, bias, p, dtype)  # noqa: E731
        bytes_moved = 2 * x.numel() * x.element_size()  # read x, write the output
    else:
        axis = case.p["axis"]
        shape = (tokens, d) if axis == "channel" else (max(1, tokens // VIT_TOKENS), VIT_TOKENS, d)
        n = d if axis == "channel" else VIT_TOKENS
        h = _randn(gen, *shape, **act, requires_grad=train)
        z = _randn(gen, *shape, **act)
        W_down, W_up = _randn(gen, n, r, std=n**-0.5, **f32), _randn(gen, r, n, std=r**-0.5, **f32)
        alpha = torch.ones((), **f32)
        inputs, acts = (h, W_down, W_up, alpha), (h,)
        fused = lambda: kk.losa_mixer(h, z, W_down, W_up, alpha, axis)  # noqa: E731
        ref = lambda: ref_losa.losa_mixer(h, z, W_down.to(dtype), W_up.to(dtype), alpha.to(dtype), axis)  # noqa: E731
        bytes_moved = 3 * h.numel() * h.element_size()  # read h and z, write the output
    grad_out = _randn(gen, *shape, **act) if train else None
    extra: Dict[str, Any] = {"shape": list(shape)}
    if variant in ("fused", "triton"):
        op = fused if variant == "fused" else _on_triton(fused, device)
        step = _step(op, inputs if train else (), grad_out)
    elif variant == "reference":
        step = _step(ref, inputs if train else (), grad_out)
    elif variant == "floor":
        base = acts[0]
        if train:
            step = _step(lambda: _CopyForwardCopyBackward.apply(base), (base,), grad_out)
            extra["floor"] = "memcpy roofline: clone forward + clone backward of the activation"
        else:
            step = _step(lambda: torch.clone(base), (), None)
            extra["floor"] = "torch.clone of the activation: the memcpy roofline"
            bytes_moved = 2 * base.numel() * base.element_size()
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return Bench(step, bytes_moved=None if train else bytes_moved, extra=extra)


def _ref_arc_in_dtype(x, U, lam, bias, p, dtype):
    return ref_arc.arc(x, U.to(dtype), lam.to(dtype), bias.to(dtype), p)


def _reference_fastfood_params(D: int, d: int, device):
    """The intrinsic-dimension codes' projection: one padded block of ``2^ceil(log2 D)``
    (Li et al.), its (B, Pi, G) stored -- generated here by ``kk.fastfood_params``."""
    return kk.fastfood_params(D, d, seed=0, mode="padded", device=device)


def _build_fastfood(case, variant, device, gen) -> Bench:
    """``P theta`` for fp32 ``theta: (d,)``; ``bytes_moved`` is the output write (4 D bytes:
    theta is read from cache), so ``gbps`` is the write bandwidth the op reaches."""
    d, D = case.p["d"], case.p["D"]
    theta = _randn(gen, d, device=device, dtype=torch.float32)
    extra: Dict[str, Any] = {}
    if variant in ("fused", "fused_v2", "triton"):
        if variant == "triton":
            ok, reason = kk.backend.triton_status(device)
            if not ok:
                raise Unavailable(f"Triton cannot run here: {reason}")
        impl = "triton" if variant == "triton" else "auto"
        generator = 2 if variant == "fused_v2" else 1

        def forward():
            with kk.use_backend(impl):
                kk.fastfood(theta, D, generator=generator)

        extra["note"] = (f"stacked mode (Lb = 2^ceil(log2 d)), B/Pi/G regenerated from the seed by generator "
                         f"{generator}, nothing stored")
        extra["generator"] = generator
    elif variant == "reference":
        B, Pi, G = _reference_fastfood_params(D, d, device)
        forward = lambda: ref_fastfood.fastfood_reference(theta, D, B, Pi, G)  # noqa: E731
        stored_mib = sum(t.numel() * t.element_size() for t in (B, Pi, G)) / 2**20
        extra["note"] = (f"padded mode (one block of Lb = {B.shape[1]}), stored B/Pi/G "
                         f"({stored_mib:.0f} MiB, resident, not in the peak)")
    elif variant == "floor":
        forward = lambda: torch.zeros(D, device=device, dtype=torch.float32)  # noqa: E731
        extra["floor"] = "torch.zeros(D): the write roofline"
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return Bench(_step(forward, (), None), bytes_moved=4 * D, extra=extra)


def _build_subspace_attn(case, variant, device, tokens, gen) -> Bench:
    """A subspace training step of block 0's attention of a ViT-B/16: ``theta`` (d = 2^14)
    projected into the module's D = 2,362,368 parameters (``Theta = Theta0 + P theta``), the
    attention forward and the backward to theta and the input. ``fused``:
    ``kk.nn.FastfoodSubspace`` (stacked, regenerated projection); ``reference``: the same
    reparameterisation through ``reference.fastfood`` (padded, stored B/Pi/G); ``floor``: the
    frozen attention (forward + input gradient). bf16 autocast on CUDA, fp32 on CPU."""
    try:
        import timm
    except Exception as exc:
        raise Unavailable(f"timm is not importable ({type(exc).__name__}: {exc})") from None
    from torch.func import functional_call

    torch.manual_seed(0)
    model = timm.create_model(case.p["model"], pretrained=False, depth=1, num_classes=0)
    attn = model.blocks[0].attn.to(device).requires_grad_(False)
    d = case.p["d"]
    shape = (max(1, tokens // VIT_TOKENS), VIT_TOKENS, model.embed_dim)
    x = _randn(gen, *shape, device=device, dtype=activation_dtype(device), requires_grad=True)
    grad_out = _randn(gen, *shape, device=device, dtype=activation_dtype(device))
    extra: Dict[str, Any] = {"shape": list(shape)}
    if variant == "fused":
        module = kk.nn.FastfoodSubspace(attn, d).to(device)
        inputs = (x, module.theta)
        run = lambda: module(x)  # noqa: E731
        extra["D"] = module.D
    elif variant == "reference":
        names = [n for n, _ in attn.named_parameters()]
        theta0 = [p.detach() for p in attn.parameters()]
        D = sum(t.numel() for t in theta0)
        B, Pi, G = _reference_fastfood_params(D, d, device)
        theta = torch.zeros(d, device=device, requires_grad=True)
        inputs = (x, theta)

        def run():
            flat = ref_fastfood.fastfood_reference(theta, D, B, Pi, G)
            params, start = {}, 0
            for name, t0 in zip(names, theta0):
                params[name] = t0 + flat[start:start + t0.numel()].view_as(t0).to(t0.dtype)
                start += t0.numel()
            return functional_call(attn, params, (x,))

        extra["D"] = D
    elif variant == "floor":
        inputs = (x,)
        run = lambda: attn(x)  # noqa: E731
        extra["floor"] = "the frozen attention: forward + input gradient"
    else:
        raise ValueError(f"unknown variant {variant!r}")

    def forward():
        with training_autocast(device):
            return run()

    return Bench(_step(forward, inputs, grad_out), extra=extra)


def _build_vit_block(case, variant, device, tokens, gen) -> Bench:
    """Block 0 of a one-block timm ViT-B/16 (random init, ``pretrained=False``) in a training
    step: the block's input requires grad (as inside a deep model, the backward runs through
    the block) and, for ``fused`` / ``reference``, the factors ``kk.adapt(model, method,
    impl=variant)`` made trainable get their gradients; ``floor`` is the frozen block with the
    input gradient alone. bf16 autocast on CUDA (fp32 weights, bf16 activations), fp32 on CPU."""
    try:
        import timm
    except Exception as exc:
        raise Unavailable(f"timm is not importable ({type(exc).__name__}: {exc})") from None
    torch.manual_seed(0)
    model = timm.create_model(case.p["model"], pretrained=False, depth=1, num_classes=0)
    if model.embed_dim != case.p["d"]:
        raise ValueError(f"{case.p['model']} has d = {model.embed_dim}, the case says {case.p['d']}")
    model.requires_grad_(False)
    if variant in ("fused", "reference"):
        torch.manual_seed(1)
        model = kk.adapt(model, case.p["method"], impl=variant)
    elif variant != "floor":
        raise ValueError(f"unknown variant {variant!r}")
    model = model.to(device).train()
    block = model.blocks[0]
    # the adapter's factors (FacT's global U, V, cores; ARC's shared U) live outside the block
    # but are used by it; the head is not part of the step
    factors = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("head")]
    shape = (max(1, tokens // VIT_TOKENS), VIT_TOKENS, case.p["d"])
    x = _randn(gen, *shape, device=device, dtype=activation_dtype(device), requires_grad=True)
    grad_out = _randn(gen, *shape, device=device, dtype=activation_dtype(device))
    inputs = [x] + factors

    def step():
        with training_autocast(device):
            out = block(x)
        torch.autograd.grad(out, inputs, grad_out)

    extra: Dict[str, Any] = {"shape": list(shape), "trainable_params": sum(p.numel() for p in factors)}
    if variant == "floor":
        extra["floor"] = "the frozen block: forward + input gradient, no adapter"
    return Bench(step, extra=extra)


# ----------------------------------------------------------------------------------------
# which backend a call actually took
# ----------------------------------------------------------------------------------------
def observed_backends(fn: Callable[[], None]) -> List[str]:
    """Run ``fn`` once and return ``"op:impl"`` for every kron_kernels dispatch it made.

    The ops ask ``kron_kernels.backend.select``; wrapping it for one call shows what was
    really chosen (auto may fall back, e.g. for a dtype the Triton kernels refuse).
    """
    seen: List[str] = []
    original = kk.backend.select

    def recording(op, *args, **kwargs):
        impl = original(op, *args, **kwargs)
        entry = f"{op}:{impl}"
        if entry not in seen:
            seen.append(entry)
        return impl

    kk.backend.select = recording
    try:
        fn()
    finally:
        kk.backend.select = original
    return seen


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
@dataclass
class TimingConfig:
    reps: int = 20  # CPU: timed repeats
    warmup: int = 3  # CPU: untimed calls first
    rep_ms: int = 200  # CUDA: do_bench timing budget (ms)
    warmup_ms: int = 50  # CUDA: do_bench warm-up budget (ms)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted sequence."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _cpu_repeat_plan(fn: Callable[[], None], warmup: int, min_repeat_s: float) -> int:
    """Run the warm-up calls; the last one sizes a repeat (how many calls it loops)."""
    estimate = 0.0
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        fn()
        estimate = time.perf_counter() - start
    return max(1, math.ceil(min_repeat_s / estimate)) if estimate > 0 else 1


def _summary(samples: List[float], method: str) -> Timing:
    samples = sorted(samples)
    return Timing(_quantile(samples, 0.5), _quantile(samples, 0.2), _quantile(samples, 0.8), method)


summarise = _summary  # median, p20, p80 of samples in ms


def time_cpu_interleaved(
    fns: Dict[str, Callable[[], None]], reps: int = 20, warmup: int = 3, min_repeat_s: float = 2e-3
) -> Dict[str, Any]:
    """Median and 20/80th percentiles (ms) of ``reps`` repeats of each function, the functions
    taking turns repeat by repeat (in rotating order) so that every one of them sees the same
    machine: on a shared CPU, load that comes and goes then skews them alike and the ratios
    between them hold. A repeat loops fast calls until it lasts ``min_repeat_s`` so that timer
    resolution never dominates. Values are :class:`Timing`, or the exception a function raised.
    """
    results: Dict[str, Any] = {}
    inner: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            inner[name] = _cpu_repeat_plan(fn, warmup, min_repeat_s)
        except Exception as exc:
            results[name] = exc
    live = [name for name in fns if name in inner]
    samples: Dict[str, List[float]] = {name: [] for name in live}
    for rep in range(max(reps, 1)):
        order = live[rep % len(live):] + live[: rep % len(live)] if live else []
        for name in order:
            if name in results:
                continue
            fn, calls = fns[name], inner[name]
            try:
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls * 1e3)
            except Exception as exc:
                results[name] = exc
    for name in live:
        if name not in results:
            method = f"perf_counter, variants interleaved: {warmup} warm-up + {reps} repeats x {inner[name]} call(s)"
            results[name] = _summary(samples[name], method)
    return results


def time_cpu(fn: Callable[[], None], reps: int = 20, warmup: int = 3, min_repeat_s: float = 2e-3) -> Timing:
    """:func:`time_cpu_interleaved` for one function."""
    result = time_cpu_interleaved({"fn": fn}, reps, warmup, min_repeat_s)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def time_cuda(fn: Callable[[], None], rep_ms: int = 200, warmup_ms: int = 50) -> Timing:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed between calls): median, p20, p80 in ms."""
    from triton.testing import do_bench

    fn()  # first call: Triton compilation / autotuning, cuBLAS workspaces
    torch.cuda.synchronize()
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    method = f"triton.testing.do_bench(warmup={warmup_ms}ms, rep={rep_ms}ms)"
    return Timing(float(median), float(p20), float(p80), method)


def time_many(fns: Dict[str, Callable[[], None]], device: torch.device, cfg: TimingConfig) -> Dict[str, Any]:
    """Timings of several step functions (values: :class:`Timing` or the exception raised):
    interleaved on CPU, one after another with ``do_bench`` on CUDA (a GPU is not shared)."""
    if device.type != "cuda":
        return time_cpu_interleaved(fns, cfg.reps, cfg.warmup)
    results: Dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            results[name] = time_cuda(fn, cfg.rep_ms, cfg.warmup_ms)
        except Exception as exc:
            results[name] = exc
    return results


# ----------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated - memory_allocated before the step"
CPU_MEMORY_METHOD = "torch.profiler(profile_memory=True): peak of the running sum of CPU allocator events"


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what the profiler's C++ side prints on fd 2 (Kineto start/stop lines)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


quiet_native_stderr = _quiet_native_stderr  # around any torch.profiler run (models' kernel breakdown)


def peak_memory_cuda(fn: Callable[[], None], warm: bool = True) -> int:
    """Bytes allocated by one step beyond what was allocated before it (inputs, weights).

    The step must have run once before (``warm=True`` runs it here): the first call also
    allocates cuBLAS workspaces and Triton autotuning buffers that are not the step's.
    """
    if warm:
        fn()
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_memory_cpu(fn: Callable[[], None], warm: bool = True) -> Optional[int]:
    """Peak extra CPU bytes of one step from the profiler's allocator events, or None.

    Every torch CPU tensor goes through the c10 allocator, which reports each allocation and
    free to the profiler with its size; the running sum's maximum is the step's peak.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        if warm:
            fn()
        with _quiet_native_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        cpu = torch.autograd.DeviceType.CPU
        allocations = sorted(  # stable: events with equal timestamps keep their recorded order
            (
                (ev.start_ns(), ev.nbytes())
                for ev in prof.profiler.kineto_results.events()
                if ev.name() == "[memory]" and ev.device_type() == cpu
            ),
            key=lambda event: event[0],
        )
    except Exception:
        return None
    if not allocations:
        return None
    running = peak = 0
    for _, nbytes in allocations:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable[[], None], device: torch.device, warm: bool = True) -> Tuple[Optional[int], str]:
    if device.type == "cuda":
        return peak_memory_cuda(fn, warm), CUDA_MEMORY_METHOD
    return peak_memory_cpu(fn, warm), CPU_MEMORY_METHOD


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# one measured row
# ----------------------------------------------------------------------------------------
@dataclass
class Row:
    suite: str
    case: str
    op: str
    shape: str
    mode: str
    variant: str
    params: Dict[str, Any]
    device: str
    dtype: str
    tokens: int
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    backend: str = ""
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    timing_method: str = ""
    peak_extra_bytes: Optional[int] = None
    memory_method: str = ""
    bytes_moved: Optional[int] = None
    gbps: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def variant_backend(variant: str, fn: Callable[[], None]) -> str:
    """Runs ``fn`` once and says what served it: for ``fused`` the kron_kernels dispatches observed."""
    seen = observed_backends(fn)
    if seen:  # also variants that call kron_kernels on a fixed backend (e.g. fwht's triton, torch)
        return ", ".join(seen)
    if variant == "fused":
        return "no kron_kernels dispatch observed"
    return {"reference": "kron_kernels.reference (torch)", "floor": "torch", "peft_lokr": "peft"}.get(variant, "")


def _failure(row: Row, exc: BaseException) -> None:
    if isinstance(exc, Unavailable):
        row.status, row.reason = "skipped", str(exc)
        return
    row.status, row.reason = "error", f"{type(exc).__name__}: {exc}".strip()
    if len(row.reason) > 500:
        row.reason = row.reason[:500] + " ..."


record_failure = _failure  # an exception into a row's status (skipped: Unavailable; else error)


def measure_case(
    suite: str,
    case: Case,
    device: torch.device,
    tokens: int,
    cfg: TimingConfig,
    variants: Optional[Sequence[str]] = None,
) -> List[Row]:
    """Build, memory-profile and time the variants of one case; never raises (a variant that
    fails or cannot run becomes an ``error`` / ``skipped`` row)."""
    rows: Dict[str, Row] = {}
    benches: Dict[str, Bench] = {}
    for variant in variants or case.variants:
        row = rows[variant] = Row(
            suite=suite,
            case=case.group,
            op=case.op,
            shape=case.shape,
            mode=case.mode,
            variant=variant,
            params=case.p,
            device=device.type,
            dtype=case.p.get("dtype", str(activation_dtype(device)).replace("torch.", "")),
            tokens=tokens,
        )
        try:
            bench = build(case, variant, device, tokens)
            row.extra.update(bench.extra)
            row.backend = variant_backend(variant, bench.fn)  # also the first (compiling, warming) call
            row.peak_extra_bytes, row.memory_method = peak_memory(bench.fn, device, warm=False)
            benches[variant] = bench
        except Exception as exc:  # an op that fails is reported, not allowed to end the run
            _failure(row, exc)
    try:
        timings = time_many({v: b.fn for v, b in benches.items()}, device, cfg)
        for variant, timing in timings.items():
            row, bench = rows[variant], benches[variant]
            if isinstance(timing, Exception):
                _failure(row, timing)
                continue
            row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
            row.timing_method = timing.method
            if bench.bytes_moved is not None:
                row.bytes_moved = bench.bytes_moved
                row.gbps = bench.bytes_moved / (timing.median_ms * 1e-3) / 1e9
    finally:
        benches.clear()
        free_memory(device)
    return list(rows.values())


def measure(suite: str, case: Case, variant: str, device: torch.device, tokens: int, cfg: TimingConfig) -> Row:
    """:func:`measure_case` for one variant."""
    return measure_case(suite, case, device, tokens, cfg, [variant])[0]


# ----------------------------------------------------------------------------------------
# targets and formatting shared by the report's suites
# ----------------------------------------------------------------------------------------
@dataclass
class Target:
    """One performance goal, checked against the measured rows (reported, never asserted)."""

    goal: str
    case: str
    measured: str
    status: str  # met | not met | n/a: ... | not measured: ...


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, or None when either is missing or ``b`` is zero (a ratio column's cell)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def check_target(value: Optional[float], ok: Callable[[float], bool], applies: Optional[str], missing: str) -> str:
    """``not measured: <missing>`` without a value, ``n/a: <applies>`` when the run is not the
    one the target is stated for, else ``met`` / ``not met``."""
    if value is None:
        return f"not measured: {missing}"
    if applies:
        return f"n/a: {applies}"
    return "met" if ok(value) else "not met"


def format_number(value: Optional[float]) -> str:
    """About three significant digits; ``-`` for None or a non-finite value."""
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


# ----------------------------------------------------------------------------------------
# the Fastfood kernel's arithmetic roofline: a model, never a measurement
# (docs/fastfood_roofline.md derives every number below)
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakRates:
    """Published peak rates of one GPU (per SM per clock, from NVIDIA's documents; see
    docs/fastfood_roofline.md for the sources): the inputs of the roofline model."""

    name: str
    sms: int
    boost_ghz: float
    hbm_tb_s: float  # peak HBM bandwidth, TB/s (10^12 B/s)
    fp32_per_clk_sm: int = 128  # FADD/FMUL/FFMA lanes (67 TFLOP/s FMA on H100 SXM = 132 x 128 x 2 x 1.98 GHz)
    int32_per_clk_sm: int = 64  # 32-bit integer add/mul/shift/logic/compare
    xu_per_clk_sm: int = 16  # MUFU (rsqrt, lg2, sin, cos ...) and 32-bit int<->float conversions
    shfl_per_clk_sm: int = 32  # warp shuffles
    issue_per_clk_sm: int = 128  # 4 schedulers x 1 warp instruction (32 threads) per clock
    shared_wavefronts_per_clk_sm: int = 1  # one pass over the 32 banks (128 B) per clock

    def per_second(self, per_clk_sm: float) -> float:
        return per_clk_sm * self.sms * self.boost_ghz * 1e9


PEAK_RATES_SOURCE = ("CUDA C++ Programming Guide, throughput of native arithmetic instructions, compute "
                     "capability 9.0; NVIDIA H100 Tensor Core GPU Architecture whitepaper; NVIDIA H100 / H200 "
                     "datasheets")
PEAK_RATES: Dict[str, PeakRates] = {
    "H100 SXM": PeakRates("NVIDIA H100 SXM5 (80 GB HBM3)", sms=132, boost_ghz=1.98, hbm_tb_s=3.35),
    "H100 PCIe": PeakRates("NVIDIA H100 PCIe (80 GB HBM2e)", sms=114, boost_ghz=1.755, hbm_tb_s=2.0),
    "H200": PeakRates("NVIDIA H200 SXM (141 GB HBM3e)", sms=132, boost_ghz=1.98, hbm_tb_s=4.8),
}
NO_ROOFLINE = "unknown device: no roofline"


def peak_rates(device_name: Optional[str]) -> Optional[PeakRates]:
    """The tabulated rates of a device name as torch reports it (``NVIDIA H100 80GB HBM3``,
    ``NVIDIA H100 PCIe``, ``NVIDIA H200``), or None: any other GPU (H100 NVL, H200 NVL, GH200
    and everything older have other clocks, SM counts or memory) and every CPU."""
    name = device_name or ""
    if re.search(r"\bH200\b", name) and "NVL" not in name:
        return PEAK_RATES["H200"]
    if re.search(r"\bH100\b", name) and "NVL" not in name:
        return PEAK_RATES["H100 PCIe" if "PCIe" in name else "H100 SXM"]
    return None


@dataclass(frozen=True)
class FastfoodOps:
    """Work of the CUDA Fastfood forward kernel per computed element (a block of Lb, stacked or
    padded), each component of the generator and the transforms separately (``parts``: name ->
    {unit: count}). Units: thread instructions on the ``int32``, ``fp32`` and ``xu`` (MUFU and
    conversions) pipes, warp ``shfl``, ``shared`` loads/stores and ``global`` loads/stores (all
    issued by the schedulers), and ``shared_wavefronts``: shared-memory passes (one per clock per
    SM; a bank conflict costs more passes) per element. The generator's counts are those of the
    PTX that nvcc 13.0 emits for sm_90 from csrc/fastfood.h (``-O3 --use_fast_math``), before
    ptxas; the transforms' follow from their structure (``fwht_row_registers``). SASS can fuse a
    few (LOP3, LEA): the floors are a model to within some 20%, not a bound to the cycle
    (docs/fastfood_roofline.md)."""

    Lb: int
    pi_rounds: int
    parts: Dict[str, Dict[str, float]]
    generator: int = 1  # the generator version (ops/fastfood.py)

    ISSUED = ("int32", "fp32", "xu", "shfl", "shared", "global")
    UNITS = ISSUED + ("shared_wavefronts",)

    def total(self, unit: str) -> float:
        return sum(part.get(unit, 0.0) for part in self.parts.values())

    @property
    def transform_adds(self) -> int:
        """FP32 adds/subtracts of the two Walsh-Hadamard transforms: 2 log2(Lb) per element."""
        return 2 * (self.Lb.bit_length() - 1)

    @property
    def issued(self) -> float:
        """Thread instructions per element, every pipe: what the schedulers issue."""
        return sum(self.total(unit) for unit in self.ISSUED)

    @property
    def TRANSCENDENTALS(self) -> Dict[str, float]:  # noqa: N802 (read as a constant of the generator)
        """Transcendental functions evaluated per element. Generator 1: one Box-Muller evaluation
        per element (its sin half unused); log and cos are libdevice polynomials on the FP32 pipe
        (the accurate __nv_logf/__nv_cosf: no MUFU), the sqrt a MUFU.RSQ plus a Newton step
        (__fsqrt_rn). Generator 2: one evaluation per pair, so half of each per element ("cos" is
        then the pair's __nv_sincosf)."""
        per = 1 if self.generator == 1 else 0.5
        return {"log": per, "cos": per, "sqrt": per}


# Shared-memory passes of a warp's access (32 lanes): 1 without bank conflict; the gather xs[Pi(k)]
# hits random banks of Lb words (expected largest bank load of 32 random words: 3.53); a Feistel
# round's 128-entry uint16 table is 64 words, two per bank (2 passes); 16-byte accesses at a
# 32-byte lane stride (a thread's 8 consecutive fp32) pass twice per quarter warp (8 per warp
# instruction instead of 4). The warp-bit exchange (fwht_row_registers) addresses its slots
# through exchange_slot, an XOR swizzle that gives every warp-wide access 32 distinct banks: four
# scalar accesses per element and exchange (store, transposed load, transposed store, load), one
# pass each. (Before the swizzle: two 16-byte accesses of 8 passes and two scalar accesses at a
# stride of 8 words, 4 banks, 8 passes each -- 1.25 of 1.80 passes per element at Lb = 2^14.)
_GATHER_PASSES, _TABLE_PASSES, _VEC_PASSES = 3.53, 2.0, 8.0


def fastfood_ops_per_element(Lb: int, pi_rounds: Optional[int] = None, generator: Optional[int] = None) -> FastfoodOps:
    """:class:`FastfoodOps` of the CUDA forward kernel (csrc/fastfood_cuda.cuh) for a block of
    ``Lb = 2^n`` (``pi_rounds``: the Feistel rounds, default the generator's PI_ROUNDS;
    ``generator``: its version, default DEFAULT_GENERATOR). Version 2's counts are derived from
    version 1's PTX counts by the kernel's structure (docs/fastfood_roofline.md), not counted in
    its own PTX."""
    from kron_kernels.ops._fastfood_generator import DEFAULT_GENERATOR, GENERATORS, PI_ROUNDS

    if isinstance(Lb, bool) or not isinstance(Lb, int) or Lb < 1 or Lb & (Lb - 1):
        raise ValueError(f"Lb must be a power of two, got {Lb!r}")
    generator = DEFAULT_GENERATOR if generator is None else generator
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    rounds = PI_ROUNDS if pi_rounds is None else pi_rounds
    n = Lb.bit_length() - 1
    h = n // 2
    # RowConfig (csrc/fwht_cuda.cuh): kE = 8 elements per thread, up to 256 threads per row
    elts = min(8, Lb)
    threads = min(Lb // elts, 256)
    lanes = min(threads, 32)
    lane_stages = lanes.bit_length() - 1
    vec = elts == 8  # a thread's 8 fp32 move as two 16-byte accesses
    vec_instr, vec_passes = (0.25, 2 * _VEC_PASSES / (32 * 8)) if vec else (1.0, 1 / 32)
    spill = {"shared": vec_instr, "shared_wavefronts": vec_passes}
    if threads > lanes:  # the warp bits through shared memory: 4 conflict-free scalar accesses per element
        exchange = {"shared": 4.0, "shared_wavefronts": 4 / 32}
    else:
        exchange = {"shared": 0.0, "shared_wavefronts": 0.0}
    table_entries = rounds * 2 ** (n - h) / Lb  # Feistel round-function table entries per element
    parts: Dict[str, Dict[str, float]] = {
        # word(B, j, i) = mix(key + i W): IMAD, 2 shifts, 2 xors, 2 IMULs (the last shift/xor of
        # mix is dropped: only the top bit is used), the sign test and select, i < d; theta * B_j[i]
        "B: sign hash": {"int32": 10, "fp32": 1, "global": 1},
        # two more words (radius, angle): 2 x (add + mix 8) + i W + 2 shifts + 1 add; 2 u32 -> f32;
        # u1, u2 scaled by 2^-24, the angle (2 u2 - 1) pi
        "G: two hash words, uniforms": {"int32": 22, "fp32": 4, "xu": 2},
        "G: logf (libdevice)": {"int32": 7, "fp32": 14, "xu": 1},
        "G: -2 ln u1": {"int32": 2, "fp32": 1},
        "G: cosf (libdevice, |x| <= pi)": {"int32": 9, "fp32": 11, "xu": 2},
        "G: sqrt (correctly rounded)": {"int32": 2, "fp32": 5, "xu": 1},
        "G: product, ||G_j||^2, x G_j": {"fp32": 3},
        # x ^= key, then per round: shift, and, table index, xor, shift, or + the lookup's address;
        # a table lookup per round, then the gather xs[Pi(k)]
        "Pi: Feistel rounds (table)": {"int32": 1 + 7 * rounds, "shared": rounds + 1,
                                       "shared_wavefronts": (rounds * _TABLE_PASSES + _GATHER_PASSES) / 32},
        # rounds * 2^(n-h) entries per block: 2 mixes + 2 adds/xors each (~18 ops), one uint16 store
        "Pi: round-function table fill": {"int32": 18 * table_entries, "shared": table_entries,
                                          "shared_wavefronts": table_entries / 32},
        # 2 log2(Lb) adds/subtracts; warp shuffles for the lane bits; the spill between the transforms
        # and, for rows over several warps, the exchange of each transform
        "H twice: butterflies": {"fp32": 2 * n, "shfl": 2 * lane_stages,
                                 "shared": spill["shared"] + 2 * exchange["shared"],
                                 "shared_wavefronts": spill["shared_wavefronts"] + 2 * exchange["shared_wavefronts"]},
        "scale, 16-byte store": {"fp32": 1, "global": 0.25 if vec else 1},
    }
    if generator == 2:
        # B: one word per thread's elts consecutive elements (they share word i >> 5): IMAD + the whole
        # mix (9: every bit is read), and + shift to the thread's first bit; per element the bit test,
        # the select, i < d; theta * B_j[i]
        del parts["B: sign hash"]
        b_part = {"B: sign word (32 signs; one per thread's elements)": {"int32": 3 + 11 / elts, "fp32": 1,
                                                                          "global": 1}}
        # G: one Box-Muller evaluation per pair: every part of version 1's evaluation halved, the
        # sincos as version 1's cosf plus the sine's polynomial (4 fp32 per pair); the product, the
        # norm and x G_j stay per element
        half = {name: {u: c / 2 for u, c in parts.pop(name).items()} for name in
                ("G: two hash words, uniforms", "G: logf (libdevice)", "G: -2 ln u1", "G: sqrt (correctly rounded)")}
        cos = parts.pop("G: cosf (libdevice, |x| <= pi)")
        sincos = {"G: sincosf per pair (libdevice, |x| <= pi)": {"int32": cos["int32"] / 2,
                                                                 "fp32": (cos["fp32"] + 4) / 2, "xu": cos["xu"] / 2}}
        parts = {**b_part, **half, **sincos, **parts}
    return FastfoodOps(Lb, rounds, parts, generator)


@dataclass(frozen=True)
class Roofline:
    """Time floors (ms) of one Fastfood forward on a device: the arithmetic units' and the
    write's, all derived from published peak rates and the op counts (a model)."""

    device: PeakRates
    ops: FastfoodOps
    d: int
    D: int
    elements: int  # nb * Lb: the kernel computes whole blocks
    floors_ms: Dict[str, float]  # unit -> ms: int32, fp32, xu, shfl, shared_wavefronts, issue
    write_ms: float  # 4 D bytes at the peak HBM bandwidth

    @property
    def arithmetic_ms(self) -> float:
        return max(self.floors_ms.values())

    @property
    def binding_unit(self) -> str:
        return max(self.floors_ms, key=self.floors_ms.get)

    @property
    def binds(self) -> str:
        """``arithmetic`` or ``write``: which floor is higher."""
        return "arithmetic" if self.arithmetic_ms > self.write_ms else "write"

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": "derived from published peak rates and op counts, not measured",
            "device": self.device.name, "sms": self.device.sms, "boost_ghz": self.device.boost_ghz,
            "hbm_tb_s": self.device.hbm_tb_s, "source": PEAK_RATES_SOURCE,
            "d": self.d, "D": self.D, "Lb": self.ops.Lb, "pi_rounds": self.ops.pi_rounds,
            "generator": self.ops.generator,
            "elements": self.elements,
            "ops_per_element": {unit: self.ops.total(unit) for unit in FastfoodOps.UNITS},
            "transform_adds_per_element": self.ops.transform_adds,
            "issued_per_element": self.ops.issued,
            "floors_ms": dict(self.floors_ms), "arithmetic_ms": self.arithmetic_ms,
            "binding_unit": self.binding_unit, "write_ms": self.write_ms, "binds": self.binds,
        }


def fastfood_roofline(device_name: Optional[str], d: int, D: int, mode: str = "stacked",
                      pi_rounds: Optional[int] = None, generator: Optional[int] = None) -> Optional[Roofline]:
    """The roofline of ``kk.fastfood`` of ``d`` into ``D`` on the named device, or None on a device
    without tabulated rates (:data:`NO_ROOFLINE`). Floors: elements x ops per element / (units per
    clock per SM x SMs x boost clock) for each unit, and 4 D bytes / peak HBM bandwidth."""
    from kron_kernels.ops.fastfood import fastfood_block_size

    rates = peak_rates(device_name)
    if rates is None:
        return None
    Lb, nb = fastfood_block_size(D, d, mode)
    ops = fastfood_ops_per_element(Lb, pi_rounds, generator)
    elements = nb * Lb
    per_clk = {"int32": rates.int32_per_clk_sm, "fp32": rates.fp32_per_clk_sm, "xu": rates.xu_per_clk_sm,
               "shfl": rates.shfl_per_clk_sm, "shared_wavefronts": rates.shared_wavefronts_per_clk_sm}
    floors = {unit: elements * ops.total(unit) / rates.per_second(rate) * 1e3 for unit, rate in per_clk.items()}
    floors["issue"] = elements * ops.issued / rates.per_second(rates.issue_per_clk_sm) * 1e3
    write_ms = 4 * D / (rates.hbm_tb_s * 1e12) * 1e3
    return Roofline(rates, ops, d, D, elements, floors, write_ms)


# ----------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except Exception:
        return None
    return out.stdout.strip()


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", "unknown")


def cpu_name() -> str:
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "CPU"
    return f"{name} ({os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_label(device: torch.device) -> str:
    """The results folder name: the GPU's name as a slug (``NVIDIA-H100-80GB-HBM3``), or ``CPU``."""
    if device.type == "cuda":
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-") or "GPU"
    return "CPU"


def provenance(device: torch.device) -> Dict[str, Any]:
    """Where and with what the numbers were measured."""
    # a copy of the tree sent elsewhere (the lent GPU machine) may carry no .git, or a stale one
    # (H200 run of 93d8659: the copy's .git named the session's first commit, "uncommitted
    # changes"): gpu_session.sh passes the commit it runs, and that wins
    commit = os.environ.get("KRON_KERNELS_COMMIT")
    status = None if commit else _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    if not commit:
        commit = _git("rev-parse", "HEAD")
    info: Dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit or "unknown",
        "git_dirty": None if status is None else bool(status),
        "kron_kernels": getattr(kk, "__version__", "unknown"),
        "kron_kernels_backend_setting": kk.get_backend(),
        "compiled_extension": "available" if kk.backend.extension_status()[0] else "not built",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "peft": _version("peft"),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: say how busy it was
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_sm_count"] = props.multi_processor_count
    return info
