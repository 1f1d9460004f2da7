"""The benchmark report (``make bench``): ``python -m benchmarks.report [--quick] [--full] [--cases ...]``.

Runs every case of every selected suite in each of its variants, prints a Markdown report
(results, adapter bandwidth, targets; for fastfood the roofline model of its CUDA kernel beside
the measured write floor, docs/fastfood_roofline.md), and writes ``<suite>.md``, ``<suite>.json`` (rows,
derived ratios, targets, provenance) and ``<suite>.png`` under
``benchmarks/results/<device>/``; its last line on stdout is that folder.

A *suite* is a list of cases, the function that measures one (case, variant) into a
:class:`~benchmarks.common.Row`, and the targets read from its rows. A suite may bring its
own cases from the run's options, its own measurement, Markdown, derived columns and plots:
the model-level suite ``models`` (:mod:`benchmarks.models`, a timm ViT training step per
method of ``kk.METHODS``) does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import kron_kernels as kk
from kron_kernels import triton as kk_triton

from . import choices, common
from . import models
from .common import FWD, Case, Row, Target, TimingConfig

MIB = 2**20


@dataclass
class RunConfig:
    device: torch.device
    tokens: int
    default_tokens: int  # the token count the suite's targets are stated at
    timing: TimingConfig
    quick: bool = False
    full: bool = False  # fwht / fastfood: every row length and (d, D), not only the target rows
    case_patterns: List[str] = field(default_factory=list)
    backend: str = "auto"
    # the models suite's options (None: its defaults for the device)
    model: Optional[str] = None
    batch: Optional[int] = None
    img: Optional[int] = None
    methods: Optional[List[str]] = None
    depth: Optional[int] = None
    model_reps: Optional[int] = None
    memory_snapshot: Optional[str] = None
    profile_steps: Optional[int] = None  # steps of the per-row torch.profiler breakdown (0: none)
    folder: Optional[Path] = None

    def describe(self) -> Dict[str, Any]:
        timing = (
            {"rep_ms": self.timing.rep_ms, "warmup_ms": self.timing.warmup_ms}
            if self.device.type == "cuda"
            else {"reps": self.timing.reps, "warmup": self.timing.warmup}
        )
        return {
            "device": self.device.type,
            "tokens": self.tokens,
            "dtype": _dtype(self.device),
            "factor_dtype": "float32",
            "quick": self.quick,
            "full": self.full,
            "cases": self.case_patterns or "all",
            "backend": self.backend,
            "timing": timing,
            "models": {
                "model": self.model, "batch": self.batch, "img": self.img, "depth": self.depth,
                "methods": self.methods or "all",
                "reps": models.reps_for(self.device, self.quick, self.model_reps),
                "memory_snapshot": self.memory_snapshot,
                "profile_steps": models.profile_steps_for(self.device, self.quick, self.profile_steps),
            },
        }


@dataclass
class Suite:
    name: str  # file stem of its results
    title: str
    cases: Callable[[bool], List[Case]]  # quick -> the cases
    targets: Callable[[List[Row], RunConfig], List[Target]]
    measure: Callable[..., List[Row]] = common.measure_case  # (suite, case, device, tokens, timing) -> rows
    notes: Optional[Sequence[str]] = None  # what the variants are; None: the Kronecker suite's notes
    # optional hooks of a suite that needs more than the op suites' shared machinery
    cases_for: Optional[Callable[[RunConfig], List[Case]]] = None  # cases from the run's options
    measure_run: Optional[Callable[[str, Case, RunConfig], List[Row]]] = None  # (suite, case, cfg) -> rows
    derive: Optional[Callable[[Row, Sequence[Row]], Dict[str, Optional[float]]]] = None
    render: Optional[Callable[..., str]] = None  # (suite, rows, targets, cfg, prov) -> Markdown
    draw: Optional[Callable[..., Any]] = None  # (suite, rows, cfg, prov, folder) -> the PNGs written

    def case_list(self, cfg: RunConfig) -> List[Case]:
        cases = self.cases_for(cfg) if self.cases_for is not None else self.cases(cfg.quick)
        return common.select_cases(cases, cfg.case_patterns)


# ----------------------------------------------------------------------------------------
# derived ratios
# ----------------------------------------------------------------------------------------
def _ok(rows: Sequence[Row], case: str, variant: str) -> Optional[Row]:
    for row in rows:
        if row.case == case and row.variant == variant and row.status == "ok":
            return row
    return None


def derived(row: Row, rows: Sequence[Row]) -> Dict[str, Optional[float]]:
    """Ratios of a row against its case's reference and floor."""
    ref, floor = _ok(rows, row.case, "reference"), _ok(rows, row.case, "floor")
    ok = row.status == "ok"
    return {
        "speedup_vs_reference": common.ratio(ref.median_ms, row.median_ms) if ok and ref else None,
        "time_vs_floor": common.ratio(row.median_ms, floor.median_ms) if ok and floor else None,
        "memory_ratio_vs_reference": common.ratio(row.peak_extra_bytes, ref.peak_extra_bytes) if ok and ref else None,
        "bandwidth_vs_floor": common.ratio(row.gbps, floor.gbps) if ok and floor else None,
    }


# ----------------------------------------------------------------------------------------
# targets of the kron ops suite (issue: first benchmark set)
# ----------------------------------------------------------------------------------------
_check = common.check_target


def _missing(rows: Sequence[Row], case: str, variants: Sequence[str]) -> str:
    reasons = []
    for variant in variants:
        found = [r for r in rows if r.case == case and r.variant == variant]
        if not found:
            reasons.append(f"{variant} not run")
        elif found[0].status != "ok":
            reasons.append(f"{variant} {found[0].status}")
    return "; ".join(reasons) or "no data"


def kron_ops_targets(rows: List[Row], cfg: RunConfig) -> List[Target]:
    gpu, cpu = cfg.device.type == "cuda", cfg.device.type == "cpu"
    at_size = cfg.tokens == cfg.default_tokens
    size_note = f"this run used N={cfg.tokens}, the target is stated at N={cfg.default_tokens}"
    gpu_na = None if gpu and at_size else ("GPU target, this run is on CPU" if not gpu else size_note)
    cpu_n = 8 * common.VIT_TOKENS
    targets: List[Target] = []

    for r in common.KRON_RANKS:
        case = f"kron_linear-d768-n32-r{r}"
        fused, ref, floor = (_ok(rows, case, v) for v in ("fused", "reference", "floor"))
        vs_floor = common.ratio(fused and fused.median_ms, floor and floor.median_ms)
        speedup = common.ratio(ref and ref.median_ms, fused and fused.median_ms)
        memory = common.ratio(fused and fused.peak_extra_bytes, ref and ref.peak_extra_bytes)
        targets += [
            Target(
                "GPU bf16 ViT-B: kron_linear fwd+bwd time <= 1.5x floor",
                case,
                "-" if vs_floor is None else f"{vs_floor:.2f}x floor",
                _check(vs_floor, lambda v: v <= 1.5, gpu_na, _missing(rows, case, ("fused", "floor"))),
            ),
            Target(
                "GPU bf16 ViT-B: kron_linear fwd+bwd >= 3x faster than reference",
                case,
                "-" if speedup is None else f"{speedup:.2f}x faster",
                _check(speedup, lambda v: v >= 3.0, gpu_na, _missing(rows, case, ("fused", "reference"))),
            ),
            Target(
                "GPU bf16 ViT-B: kron_linear fwd+bwd peak memory <= reference",
                case,
                "-" if memory is None else f"{memory:.3f}x reference",
                _check(memory, lambda v: v <= 1.0, gpu_na, _missing(rows, case, ("fused", "reference"))),
            ),
        ]
    for _, d, k in common.ADAPTER_SHAPES:
        case = f"bottleneck_adapter-d{d}-k{k}-{FWD}"
        fused, floor = _ok(rows, case, "fused"), _ok(rows, case, "floor")
        frac = common.ratio(fused and fused.gbps, floor and floor.gbps)
        measured = "-" if frac is None else f"{frac:.0%} of clone ({fused.gbps:.1f} / {floor.gbps:.1f} GB/s)"
        targets.append(
            Target(
                "GPU: Compacter adapter forward >= 70% of torch.clone bandwidth",
                case,
                measured,
                _check(frac, lambda v: v >= 0.7, gpu_na, _missing(rows, case, ("fused", "floor"))),
            )
        )
    for r in common.KRON_RANKS:
        case = f"kron_linear-d768-n32-r{r}"
        fused, ref = _ok(rows, case, "fused"), _ok(rows, case, "reference")
        speedup = common.ratio(ref and ref.median_ms, fused and fused.median_ms)
        if not cpu:
            na = "CPU target, this run is on CUDA"
        elif cfg.tokens != cpu_n:
            na = f"this run used N={cfg.tokens}, the target is stated at N={cpu_n}"
        elif fused is not None and "torch" not in fused.backend:
            na = f"the fused row ran on {fused.backend}, the target is for the torch backend"
        else:
            na = None
        targets.append(
            Target(
                f"CPU: torch-backend kron_linear fwd+bwd >= 2x faster than reference (N={cpu_n}, d=768)",
                case,
                "-" if speedup is None else f"{speedup:.2f}x faster",
                _check(speedup, lambda v: v >= 2.0, na, _missing(rows, case, ("fused", "reference"))),
            )
        )
    return targets


def fwht_targets(rows: List[Row], cfg: RunConfig) -> List[Target]:
    """Issue 12 (GPU, 16*2048 rows, n <= 2^13, the kernel ``auto`` takes): fp16/bf16 fwht <= 1.15x
    torch.clone at n >= 2^10 and <= 1.3x below, fp32 <= 1.3x (issue 4 asked 1.3x for fp16/bf16);
    CPU compiled kernel >= 3x faster than the torch butterfly at 256 x 4096 fp32."""
    gpu, cpu = cfg.device.type == "cuda", cfg.device.type == "cpu"
    at_size = cfg.tokens == cfg.default_tokens
    targets: List[Target] = []
    for k in common.FWHT_LOGS:
        if 2**k > 2**13:
            continue
        for dtype in common.FWHT_DTYPES:
            case = f"fwht-n{2**k}-{dtype}-{FWD}"
            if not any(r.case == case for r in rows):
                continue
            fused, floor = _ok(rows, case, "fused"), _ok(rows, case, "floor")
            vs_floor = common.ratio(fused and fused.median_ms, floor and floor.median_ms)
            na = None
            if not gpu:
                na = "GPU target, this run is on CPU"
            elif not at_size:
                na = f"this run used {cfg.tokens} rows, the target is stated at {common.FWHT_GPU_ROWS}"
            if dtype == "float32":
                limit, goal = 1.3, "GPU fp32: fwht time <= 1.3x torch.clone (n <= 2^13, 16*2048 rows)"
            elif 2**k >= 1024:
                limit, goal = 1.15, "GPU fp16/bf16: fwht time <= 1.15x torch.clone (2^10 <= n <= 2^13, 16*2048 rows)"
            else:
                limit, goal = 1.3, "GPU fp16/bf16: fwht time <= 1.3x torch.clone (n < 2^10, 16*2048 rows)"
            targets.append(Target(
                goal,
                case,
                "-" if vs_floor is None else f"{vs_floor:.2f}x clone",
                _check(vs_floor, lambda v, limit=limit: v <= limit, na, _missing(rows, case, ("fused", "floor"))),
            ))
    case = f"fwht-n4096-float32-{FWD}"
    fused, ref = _ok(rows, case, "fused"), _ok(rows, case, "reference")
    speedup = common.ratio(ref and ref.median_ms, fused and fused.median_ms)
    if not cpu:
        na = "CPU target, this run is on CUDA"
    elif fused is not None and fused.extra.get("rows") != common.FWHT_CPU_ROWS:
        na = f"this run used {fused.extra.get('rows')} rows, the target is stated at {common.FWHT_CPU_ROWS}"
    elif fused is not None and "fwht:cuda" not in fused.backend:
        na = f"the fused row ran on {fused.backend}, the target is for the compiled CPU kernel"
    else:
        na = None
    if any(r.case == case for r in rows):
        targets.append(Target(
            "CPU: compiled kk.fwht >= 3x faster than the torch butterfly (256 x 4096, fp32)",
            case,
            "-" if speedup is None else f"{speedup:.2f}x faster",
            _check(speedup, lambda v: v >= 3.0, na, _missing(rows, case, ("fused", "reference"))),
        ))
    return targets


FWHT_NOTES = (
    "- **fused**: `kk.fwht` on the default backend (its choice table: on GPU the CUDA kernel, or Triton "
    "for 16-bit rows of 2^10..2^13; the cache-blocked C++ kernel on CPU); the notes column names the "
    "backend each dispatch took.",
    "- **triton**: `kk.fwht` on the Triton backend (GPU only). **cuda**: on the compiled extension's "
    "CUDA C++ kernel (GPU only); both are timed beside `fused` (auto) so that a run decides its table.",
    "- **reference**: the torch butterfly (kron_kernels' torch backend, one vectorised stage per bit).",
    "- **floor**: `torch.clone(x)`, the memcpy roofline: the transform reads and writes x once.",
    "- **fast_hadamard_transform**: Dao's package, where it is installed (GPU only).",
    "- Every row is the forward alone (no autograd; the backward is the same transform).",
)


def bottleneck_targets(rows: List[Row], cfg: RunConfig) -> List[Target]:
    """Issue 3 (GPU bf16, ViT-B): ARC and LoSA mixers forward >= 75% of torch.clone bandwidth;
    each fused op >= 2x faster than its reference; FacT/ARC adapter overhead <= 15% of the frozen
    block's forward+backward time (``vit_block`` rows: fused / floor - 1)."""
    gpu = cfg.device.type == "cuda"
    na = None
    if not gpu:
        na = "GPU target, this run is on CPU"
    elif cfg.tokens != cfg.default_tokens:
        na = f"this run used N={cfg.tokens}, the target is stated at N={cfg.default_tokens}"
    targets: List[Target] = []
    for op in ("arc", "losa_channel", "losa_token"):
        r = common.ARC_R if op == "arc" else common.LOSA_R
        case = f"{op}-d{common.BOTTLENECK_D}-r{r}-{FWD}"
        fused, floor = _ok(rows, case, "fused"), _ok(rows, case, "floor")
        frac = common.ratio(fused and fused.gbps, floor and floor.gbps)
        measured = "-" if frac is None else f"{frac:.0%} of clone ({fused.gbps:.1f} / {floor.gbps:.1f} GB/s)"
        if any(row.case == case for row in rows):
            targets.append(Target("GPU bf16: forward >= 75% of torch.clone bandwidth", case, measured,
                                  _check(frac, lambda v: v >= 0.75, na, _missing(rows, case, ("fused", "floor")))))
    blocks = sorted({row.case for row in rows if row.op == "vit_block"})
    for case in blocks:
        fused, floor = _ok(rows, case, "fused"), _ok(rows, case, "floor")
        slower = common.ratio(fused and fused.median_ms, floor and floor.median_ms)
        overhead = None if slower is None else slower - 1.0
        targets.append(Target("GPU bf16: adapter overhead <= 15% of the frozen block's fwd+bwd", case,
                              "-" if overhead is None else f"{overhead:+.0%} vs the frozen block",
                              _check(overhead, lambda v: v <= 0.15, na, _missing(rows, case, ("fused", "floor")))))
    for case in sorted({row.case for row in rows} - set(blocks)):
        fused, ref = _ok(rows, case, "fused"), _ok(rows, case, "reference")
        speedup = common.ratio(ref and ref.median_ms, fused and fused.median_ms)
        targets.append(Target("GPU bf16: fused >= 2x faster than its reference", case,
                              "-" if speedup is None else f"{speedup:.2f}x faster",
                              _check(speedup, lambda v: v >= 2.0, na, _missing(rows, case, ("fused", "reference")))))
    return targets


def fastfood_targets(rows: List[Row], cfg: RunConfig) -> List[Target]:
    """GPU, d = 2^14 into D = 86e6: issue 12's forward in <= 6x the ``torch.zeros(D)`` write
    time (the floor row); issue 4's >= 70% of HBM write bandwidth (the same ratio, stricter),
    >= 20x faster than the reference, with no stored B/Pi/G (the fused call's peak extra memory
    is its output); and issue 12's subspace step of a ViT-B attention <= 1.25x the frozen
    attention's step."""
    d, D = common.FASTFOOD_TARGET
    case = f"fastfood-d{d}-D{D}-{FWD}"
    na = None if cfg.device.type == "cuda" else "GPU target, this run is on CPU"
    targets: List[Target] = []
    if not any(r.case == case for r in rows):
        why = na or "the case was not selected (a quick or --cases run)"
        targets.append(Target("GPU: <= 6x torch.zeros(D), >= 70% of HBM write bandwidth, >= 20x the reference, "
                              "nothing stored", case, "-", f"n/a: {why}"))
    else:
        fused, floor, ref = (_ok(rows, case, v) for v in ("fused", "floor", "reference"))
        frac = common.ratio(fused and fused.gbps, floor and floor.gbps)
        vs_floor = common.ratio(fused and fused.median_ms, floor and floor.median_ms)
        speedup = common.ratio(ref and ref.median_ms, fused and fused.median_ms)
        peak = fused.peak_extra_bytes if fused is not None else None
        over_output = None if peak is None else peak / (4 * D)
        targets += [
            Target("GPU: forward <= 6x the torch.zeros(D) write time", case,
                   "-" if vs_floor is None else f"{vs_floor:.2f}x torch.zeros(D)",
                   _check(vs_floor, lambda v: v <= 6.0, na, _missing(rows, case, ("fused", "floor")))),
            Target("GPU: >= 70% of HBM write bandwidth (torch.zeros(D))", case,
                   "-" if frac is None else f"{frac:.0%} ({fused.gbps:.0f} / {floor.gbps:.0f} GB/s)",
                   _check(frac, lambda v: v >= 0.70, na, _missing(rows, case, ("fused", "floor")))),
            Target("GPU: fused >= 20x faster than the reference", case,
                   "-" if speedup is None else f"{speedup:.1f}x faster",
                   _check(speedup, lambda v: v >= 20.0, na, _missing(rows, case, ("fused", "reference")))),
            Target("no stored B/Pi/G: fused peak extra memory <= 1.01x its output (4 D bytes)", case,
                   "-" if over_output is None else f"{over_output:.3f}x the output",
                   _check(over_output, lambda v: v <= 1.01, na, _missing(rows, case, ("fused",)))),
        ]
    subspace = f"subspace_attn-d{common.SUBSPACE_D}"
    if any(r.case == subspace for r in rows):
        fused, floor = _ok(rows, subspace, "fused"), _ok(rows, subspace, "floor")
        slower = common.ratio(fused and fused.median_ms, floor and floor.median_ms)
        size_na = None if cfg.tokens == cfg.default_tokens else (
            f"this run used N={cfg.tokens}, the target is stated at N={cfg.default_tokens}")
        targets.append(Target("GPU: subspace step of a ViT-B attention <= 1.25x the frozen attention's", subspace,
                              "-" if slower is None else f"{slower:.2f}x the frozen attention",
                              _check(slower, lambda v: v <= 1.25, na or size_na,
                                     _missing(rows, subspace, ("fused", "floor")))))
    return targets


FASTFOOD_NOTES = (
    "- **fused**: `kk.fastfood(theta, D)` on the default backend, stacked mode (Lb = 2^ceil(log2 d)), "
    "B/Pi/G regenerated from the seed inside the kernel (the compiled extension: CUDA C++ on GPU for "
    "Lb <= 2^15, C++ on CPU); the notes column names the backend each dispatch took.",
    "- **triton**: the same call on the Triton backend (fused kernel for Lb <= 2^13; larger blocks "
    "take the kk.fwht chain with temporary B/Pi/G).",
    "- **reference**: `kron_kernels.reference.fastfood` as the intrinsic-dimension code runs it: one "
    "padded block of 2^ceil(log2 D), B/Pi/G stored (generated before timing, resident, so not in the "
    "peak), a torch butterfly with one op per stage. Both compute a P theta in R^D with unit-norm "
    "columns; the reference's projection is the padded one.",
    "- **floor**: `torch.zeros(D)`, the write roofline (gbps = 4 D bytes / time for every variant).",
    "- **subspace_attn** rows: block 0's attention of a ViT-B/16 (qkv + proj, D = 2,362,368) "
    "reparameterised as Theta0 + P theta, d = 2^14, forward + backward to theta and the input; fused "
    "`kk.nn.FastfoodSubspace`, reference the same through `reference.fastfood` (padded, stored "
    "B/Pi/G), floor the frozen attention (forward + input gradient); bf16 autocast on CUDA.",
)


BOTTLENECK_NOTES = (
    "- **fused**: `kk.fact_tt_delta` / `kk.fact_tk_delta` (torch matmul/bmm on every backend), "
    "`kk.fact_linear`, `kk.arc`, `kk.losa_mixer` on the default backend (`auto`: its CUDA choice "
    "table); the notes column names the backend each dispatch took. **triton**: the same on the "
    "Triton kernels; **cublas**: `kk.fact_linear` on backend `dense` (cuBLAS GEMMs in the activations' dtype) -- "
    "measured beside `fused` so that a GPU run decides the choice tables.",
    "- **fact_linear** rows: a ViT-B FacT layer at r=8, dropout 0.1: `rows3` the fused qkv (3 slots "
    "reading x), `cols4` fc2 (4 chunks of x); frozen bf16 weight and bias, fp32 U, V, cores; "
    "reference: FacT's chain per slot (x @ U recomputed per slot) plus `F.linear`; floor: the "
    "frozen `F.linear` (forward + input gradient).",
    "- **reference**: `kron_kernels.reference.fact` (the paper's einsum), `.arc` (two matmuls, "
    "F.dropout), `.losa` (plain torch; token mixing through transposes).",
    "- **floor**: the memcpy roofline: `torch.clone` of the activation (of the (S, d, d) increments "
    "for FacT), plus a clone in the backward for fwd+bwd rows.",
    "- **vit_block** rows: block 0 of a one-block timm ViT-B/16 (random init) in a training step, "
    "bf16 autocast on CUDA: `kk.adapt(model, method, impl=...)` with the method's defaults (FacT-TT r=4, "
    "FacT-TK r=8, dropout 0.1; ARC r=50, dropout 0.1; fused vs reference), the block's input and the "
    "adapter's factors get gradients; **floor** is the frozen block (forward + input gradient).",
    "- fwd+bwd rows: ARC trains x, U, lam, bias with dropout 0.1; LoSA trains h, W_down, W_up, alpha "
    "(z, the frozen backbone's output, needs no gradient); the token mixer runs on "
    "max(1, N // 197) images of 197 tokens. fwd rows: forward alone under no_grad, no dropout.",
)


def _full_lists(cfg: RunConfig) -> bool:
    """The fwht and fastfood suites' full case lists: with ``--full``, and whenever ``--cases``
    names cases (they are picked from every row, not only the default target rows)."""
    return cfg.full or bool(cfg.case_patterns)


SUITES: Dict[str, Suite] = {
    "kron_ops": Suite(
        name="kron_ops",
        title="Kronecker ops and the Compacter adapter",
        cases=common.kron_ops_cases,
        targets=kron_ops_targets,
    ),
    "fwht": Suite(
        name="fwht",
        title="Walsh-Hadamard transform",
        cases=common.fwht_cases,
        targets=fwht_targets,
        notes=FWHT_NOTES,
        cases_for=lambda cfg: common.fwht_cases(cfg.quick, full=_full_lists(cfg)),
    ),
    "bottleneck": Suite(
        name="bottleneck",
        title="Low-rank bottleneck ops: FacT increments, ARC, LoSA mixers, adapted ViT-B blocks",
        cases=common.bottleneck_cases,
        targets=bottleneck_targets,
        notes=BOTTLENECK_NOTES,
    ),
    "fastfood": Suite(
        name="fastfood",
        title="Fastfood projection and subspace training",
        cases=common.fastfood_cases,
        targets=fastfood_targets,
        notes=FASTFOOD_NOTES,
        cases_for=lambda cfg: common.fastfood_cases(cfg.quick, cfg.device, full=_full_lists(cfg)),
    ),
    "models": Suite(
        name="models",
        title="Model-level training step: every method of kk.METHODS vs its reference, the floor and PEFT LoRA",
        cases=models.cases,
        targets=models.targets,
        cases_for=lambda cfg: models.model_cases(cfg.device, cfg.quick, cfg.model, cfg.batch, cfg.img, cfg.methods,
                                                cfg.depth),
        measure_run=models.measure_case,
        derive=models.derived,
        render=models.markdown,
        draw=models.plot,
    ),
}


# ----------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------
def _dtype(device: torch.device) -> str:
    return str(common.activation_dtype(device)).replace("torch.", "")


_num = common.format_number


def _times(row: Row) -> str:
    if row.status != "ok":
        return row.status
    return f"{_num(row.median_ms)} ({_num(row.p20_ms)}–{_num(row.p80_ms)})"


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{_num(value)}×"


def _mib(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else _num(nbytes / MIB)


def _note(row: Row) -> str:
    if row.status != "ok":
        return row.reason.replace("|", "\\|").replace("\n", " ")
    if row.variant in ("fused", "triton"):
        return row.backend
    if row.variant == "peft_lokr":
        return "PEFT LoKr, 1 Kronecker term (see notes)"
    return ""


def _size_line(suite: Suite, rows: List[Row], cfg: RunConfig) -> str:
    if suite.name == "fwht":
        batch = sorted({r.extra["rows"] for r in rows if "rows" in r.extra})
        return (f"x of shape (rows, n), rows = {', '.join(map(str, batch)) or '-'} "
                "(fewer for long rows on CPU); the dtype is in the case label.")
    if suite.name == "fastfood":
        return (f"theta float32 of d elements into D outputs (in the case label); subspace rows: N = {cfg.tokens} "
                f"tokens, activations {_dtype(cfg.device)}.")
    return (f"N = {cfg.tokens} tokens per step, activations and frozen weight "
            f"{_dtype(cfg.device)}, trainable factors float32.")


def markdown(suite: Suite, rows: List[Row], targets: List[Target], cfg: RunConfig, prov: Dict[str, Any]) -> str:
    lines = [f"# {suite.title} — {prov['device']}", ""]
    lines += [
        f"Measured {prov['date_utc']} on **{prov['device']}**; commit `{prov['git_commit'][:12]}`"
        + (" (uncommitted changes)" if prov.get("git_dirty") else "")
        + f"; torch {prov['torch']}, triton {prov['triton']}, CUDA {prov['torch_cuda']}, "
        f"timm {prov['timm']}, peft {prov['peft']}; kron_kernels backend `{cfg.backend}`.",
        "",
        _size_line(suite, rows, cfg)
        + (" **Quick run** (small sizes, few repeats): indicative only." if cfg.quick else ""),
        "",
        "| case | variant | time median (p20–p80) ms | speed-up vs reference | time / floor "
        "| peak extra memory MiB | memory ratio vs reference | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = derived(row, rows)
        label = row.case if row.mode != FWD else f"{row.case} (no_grad)"
        lines.append(
            f"| {label} | {row.variant} | {_times(row)} | {_x(ratios['speedup_vs_reference'])} "
            f"| {_x(ratios['time_vs_floor'])} | {_mib(row.peak_extra_bytes) if row.status == 'ok' else '-'} "
            f"| {_x(ratios['memory_ratio_vs_reference'])} | {_note(row)} |"
        )
    bandwidth = [r for r in rows if r.bytes_moved is not None and r.status == "ok"]
    if bandwidth:
        lines += [
            "",
            "## Forward bandwidth",
            "",
            "Bytes moved = the output write (4 D bytes); the floor is `torch.zeros(D)`, the write roofline."
            if suite.name == "fastfood" else
            "Bytes moved = read the input + write the output (the memcpy roofline's traffic); the floor is "
            "`torch.clone` of the input.",
            "",
            "| case | variant | time median ms | GB/s | fraction of the floor's bandwidth |",
            "|---|---|---|---|---|",
        ]
        for row in bandwidth:
            frac = derived(row, rows)["bandwidth_vs_floor"]
            lines.append(
                f"| {row.case} | {row.variant} | {_num(row.median_ms)} | {_num(row.gbps)} "
                f"| {'-' if frac is None else f'{frac:.0%}'} |"
            )
    if suite.name == "fastfood":
        lines += fastfood_roofline_lines(rows, prov)
    lines += ["", "## Targets", "", "| target | case | measured | status |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t.goal} | {t.case} | {t.measured} | {t.status} |")
    peft_notes = sorted({r.extra["peft_lokr"] for r in rows if "peft_lokr" in r.extra})
    timing_methods = sorted({r.timing_method.split(":")[0] for r in rows if r.timing_method})
    variant_notes = list(suite.notes) if suite.notes is not None else [
        "- **fused**: the kron_kernels op (activations need grad, factors trainable, dense weight frozen); "
        "the notes column names the backend each dispatch actually took.",
        "- **reference**: `kron_kernels.reference` (the papers' way: the increment materialised through the "
        "5-D einsum, added to the weight, a dense matmul, so a dense d×d gradient flows to the factors).",
        "- **floor**: for kron_linear/kron_matmul the frozen `F.linear(x, W, b)` forward + input gradient "
        "(weight frozen); for the adapter a copy forward + a copy backward (`torch.clone`), the memcpy roofline.",
        "- **peft_lokr**: a PEFT LoKr-adapted `nn.Linear` of the same shape (kron_linear only).",
        "- `(no_grad)` rows: the adapter forward alone with the PHM weights prebuilt; every other row is one "
        "forward + `torch.autograd.grad` of every trainable input.",
    ]
    lines += ["", "## Notes", ""] + variant_notes + [
        f"- Timing: {', '.join(timing_methods) or '-'}; peak memory: "
        f"{common.CUDA_MEMORY_METHOD if cfg.device.type == 'cuda' else common.CPU_MEMORY_METHOD} "
        "(bytes beyond the inputs and weights allocated before the step).",
    ]
    if cfg.device.type == "cpu":
        lines.append(
            f"- CPU: {prov['cpu']}, {prov['torch_threads']} torch threads; 1-min load average "
            f"{prov.get('load_average_1min_at_start', 'n/a')} at the start, "
            f"{prov.get('load_average_1min_at_end', 'n/a')} at the end (a load above the core count means other "
            "work shared the CPU: the variants of a case are timed in turns, so their ratios hold better "
            "than their absolute times)."
        )
    for note in peft_notes:
        lines.append(f"- PEFT: {note}.")
    problems = [r for r in rows if r.status != "ok"]
    for row in problems:
        lines.append(f"- {row.status}: {row.case} / {row.variant}: {row.reason}")
    return "\n".join(lines) + "\n"


def _fastfood_rooflines(rows: Sequence[Row], prov: Dict[str, Any]) -> List["common.Roofline"]:
    """The model's roofline of every fastfood forward case in the rows (none on a device without
    tabulated peak rates)."""
    cases = dict.fromkeys((r.case, r.params["d"], r.params["D"]) for r in rows if r.op == "fastfood")
    found = (common.fastfood_roofline(prov.get("device"), d, D) for _, d, D in cases)
    return [r for r in found if r is not None]


def fastfood_roofline_json(rows: Sequence[Row], prov: Dict[str, Any]) -> Dict[str, Any]:
    """The roofline section of fastfood.json: derived figures, labelled as such."""
    rooflines = _fastfood_rooflines(rows, prov)
    if not rooflines:
        return {"status": f"{common.NO_ROOFLINE} ({prov.get('device')})"}
    return {"status": "model: derived from published peak rates and op counts, not measured",
            "cases": [r.to_dict() for r in rooflines]}


def fastfood_roofline_lines(rows: Sequence[Row], prov: Dict[str, Any]) -> List[str]:
    """Markdown: the arithmetic roofline of the CUDA kernel (work per element x published peak
    rates, docs/fastfood_roofline.md) beside the measured write floor ``torch.zeros(D)``."""
    lines = ["", "## Roofline of the CUDA kernel (a model: derived, not measured)", ""]
    rooflines = _fastfood_rooflines(rows, prov)
    if not rooflines:
        tabulated = ", ".join(sorted(common.PEAK_RATES))
        lines.append(f"{common.NO_ROOFLINE}: peak rates are tabulated for {tabulated}; this run is on "
                     f"{prov.get('device')}. (docs/fastfood_roofline.md derives the floors.)")
        return lines
    rates = rooflines[0].device
    lines += [
        f"**Model figures, not measurements.** Work per computed element of the CUDA forward kernel (PTX "
        f"instruction counts of csrc/fastfood*.h, docs/fastfood_roofline.md) at the published peak rates of the "
        f"{rates.name}: {rates.sms} SMs at {rates.boost_ghz} GHz boost; per SM per clock {rates.fp32_per_clk_sm} "
        f"FP32, {rates.int32_per_clk_sm} INT32, {rates.xu_per_clk_sm} MUFU/conversion, {rates.shfl_per_clk_sm} "
        f"shuffle lanes, {rates.issue_per_clk_sm // 32} warp instructions, {rates.shared_wavefronts_per_clk_sm} "
        f"shared-memory pass; HBM {rates.hbm_tb_s} TB/s ({common.PEAK_RATES_SOURCE}). Only the "
        "`torch.zeros(D)` and fused columns are measured (the rows above).",
        "",
        "| Lb | int32 | fp32 (transform adds) | MUFU + conversions | log / cos / sqrt | shuffles | shared ld/st "
        "(passes) | instructions issued |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ops in {r.ops.Lb: r.ops for r in rooflines}.values():
        lines.append(
            f"| 2^{ops.Lb.bit_length() - 1} | {_num(ops.total('int32'))} | {_num(ops.total('fp32'))} "
            f"({ops.transform_adds}) | {_num(ops.total('xu'))} | "
            f"{' / '.join(str(ops.TRANSCENDENTALS[f]) for f in ('log', 'cos', 'sqrt'))} | {_num(ops.total('shfl'))} "
            f"| {_num(ops.total('shared'))} ({_num(ops.total('shared_wavefronts'))}) | {_num(ops.issued)} |")
    lines += [
        "",
        "| case | elements (nb·Lb) | model floor ms: int32 / fp32 / MUFU / shuffle / shared / issue "
        "| model arithmetic floor ms | model write floor ms (4 D B at peak HBM) | `torch.zeros(D)` ms (measured) "
        "| model arithmetic floor / `torch.zeros(D)` | fused ms (measured) | fused / model arithmetic floor "
        "| binds (model) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rooflines:
        case = f"fastfood-d{r.d}-D{r.D}-{FWD}"
        zeros, fused = _ok(rows, case, "floor"), _ok(rows, case, "fused")
        zeros_ms, fused_ms = zeros and zeros.median_ms, fused and fused.median_ms
        lines.append(
            f"| {case} | {r.elements} | {' / '.join(_num(r.floors_ms[u]) for u in _ROOFLINE_UNITS)} "
            f"| {_num(r.arithmetic_ms)} ({_ROOFLINE_UNITS[r.binding_unit]}) | {_num(r.write_ms)} "
            f"| {_num(zeros_ms)} | {_x(common.ratio(r.arithmetic_ms, zeros_ms))} "
            f"| {_num(fused_ms)} | {_x(common.ratio(fused_ms, r.arithmetic_ms))} | {r.binds} |")
    return lines


_ROOFLINE_UNITS = {"int32": "INT32", "fp32": "FP32", "xu": "MUFU/conversions", "shfl": "shuffles",
                   "shared_wavefronts": "shared memory", "issue": "instruction issue"}


def autotuning_markdown(tunings, prov: Dict[str, Any]) -> str:
    """Each autotuning of the run: kernel, key, the tile chosen and the first call's wall time
    (compiling and timing every tile the pruning kept) -- the cost a user's first step pays."""
    lines = [f"# Autotuning — {prov['device']}", "",
             f"{len(tunings)} tunings, {sum(t.seconds for t in tunings):.1f} s in all (first calls only; the "
             "timed repeats run after warm-up and exclude them).", "",
             "| kernel | key | chosen configuration | first call s |", "|---|---|---|---|"]
    for t in tunings:
        lines.append(f"| {t.kernel} | {t.key} | {t.config} | {t.seconds:.2f} |")
    return "\n".join(lines) + "\n"


def plot(suite: Suite, rows: List[Row], cfg: RunConfig, prov: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    variants = [v for v in common.VARIANTS if any(r.variant == v for r in rows)]
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(cases) + 2), 5.5))
    for i, variant in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for j, case in enumerate(cases):
            row = _ok(rows, case, variant)
            if row is None:
                continue
            xs.append(j + (i - (len(variants) - 1) / 2) * width)
            ys.append(row.median_ms)
            lo.append(max(row.median_ms - row.p20_ms, 0.0))
            hi.append(max(row.p80_ms - row.median_ms, 0.0))
        if xs:
            ax.bar(xs, ys, width, label=variant, yerr=[lo, hi], capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("time per step, median (ms, log scale; bars p20–p80)")
    ax.set_title(f"{suite.title}: {prov['device']}, N={cfg.tokens}, {_dtype(cfg.device)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------
def run_suite(suite: Suite, cfg: RunConfig, progress) -> List[Row]:
    rows = []
    for case in suite.case_list(cfg):
        progress.set_postfix_str(case.group, refresh=True)
        if suite.measure_run is not None:
            rows += suite.measure_run(suite.name, case, cfg)
        else:
            rows += suite.measure(suite.name, case, cfg.device, cfg.tokens, cfg.timing)
        progress.update(len(case.variants))
    return rows


def results_folder(root: Path, cfg: RunConfig, tokens_overridden: bool) -> Path:
    """``<root>/<device>``; runs that are not the default one get a suffix so that they never
    overwrite the committed results (``-quick``, ``-full``, ``-N<tokens>``, ``-partial``, ``-<backend>``)."""
    parts = [common.device_label(cfg.device)]
    if cfg.quick:
        parts.append("quick")
    if cfg.full and not cfg.quick:
        parts.append("full")
    if tokens_overridden:
        parts.append(f"N{cfg.tokens}")
    for option, prefix in ((cfg.model, ""), (cfg.batch, "b"), (cfg.img, "img"), (cfg.depth, "depth")):
        if option is not None:
            parts.append(f"{prefix}{option}")
    if cfg.case_patterns or cfg.methods:
        parts.append("partial")
    if cfg.backend != "auto":
        parts.append(cfg.backend)
    return root / "-".join(parts)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Benchmark kron_kernels against the naive reference, the frozen floor and PEFT; "
        "write Markdown, JSON and a PNG under benchmarks/results/<device>/.",
    )
    parser.add_argument("--cases", nargs="+", default=[], metavar="SUBSTRING",
                        help="run only cases whose label contains one of these (e.g. kron_linear d768 adapter "
                        "fwht-n1024-bfloat16 fastfood-d16384-D86000000); fwht and fastfood pick them from "
                        "their full case lists")
    parser.add_argument("--full", action="store_true",
                        help="fwht and fastfood: every row length (2^8..2^15) and every (d, D) on GPU; by "
                        "default only issue 12's target rows (fwht n = 2^10..2^13, fastfood d = 2^14 into "
                        "D = 86e6 and the subspace step), which fit in 3 minutes on an H100/H200")
    parser.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=sorted(SUITES), help="suites to run")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer tokens, the default rank only, few repeats")
    parser.add_argument("--reps", type=int, default=None,
                        help="CPU: timed repeats per variant (default 20, quick 3); models suite, any device: "
                        "timed training steps per row (default CPU 5 / quick 2, GPU 20 / quick 5)")
    parser.add_argument("--rep-ms", type=int, default=None,
                        help="CUDA: do_bench timing budget per variant in ms (default 200, quick 50)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per step N (default 64*197 on GPU, 8*197 on CPU; quick 8*197 / 197)")
    parser.add_argument("--backend", choices=kk.backend.BACKENDS, default="auto", help="kron_kernels backend")
    models_group = parser.add_argument_group("models suite (a timm ViT training step per method)")
    models_group.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                              help=f"methods and anchors to run (default all: kk.METHODS + {' '.join(models.ANCHORS)})")
    models_group.add_argument("--model", default=None,
                              help=f"timm model name (default {models.GPU_MODEL} on GPU, {models.CPU_MODEL} on CPU)")
    models_group.add_argument("--batch", type=int, default=None,
                              help=f"images per step (default GPU {models.GPU_BATCH}, CPU {models.CPU_BATCH}; "
                              f"quick {models.QUICK_GPU_BATCH} / {models.QUICK_CPU_BATCH})")
    models_group.add_argument("--img", type=int, default=None,
                              help=f"image size (default GPU {models.GPU_IMG}, CPU {models.CPU_IMG}; "
                              f"CPU quick {models.QUICK_CPU_IMG})")
    models_group.add_argument("--depth", type=int, default=None,
                              help="override the model's number of blocks (smoke tests; default the model's own)")
    models_group.add_argument("--memory-snapshot", default=None, metavar="METHOD",
                              help="CUDA: dump a torch.cuda.memory snapshot of one training step of METHOD "
                              "(fused and reference) into the results folder")
    profiling = models_group.add_mutually_exclusive_group()
    profiling.add_argument("--profile-steps", type=int, default=None, metavar="N",
                           help="per row, after its timing: N training steps under torch.profiler for the "
                           "breakdown of where a step's time goes (CUDA kernels; CPU ops) (default GPU 3, "
                           "CPU 2, CPU quick 1)")
    profiling.add_argument("--no-profile", action="store_true",
                           help="no torch.profiler breakdown (the same as --profile-steps 0)")
    parser.add_argument("--out", type=Path, default=common.REPO_ROOT / "benchmarks" / "results",
                        help="results root (default benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    device = common.default_device()
    kk.set_backend(args.backend)
    tokens = args.tokens if args.tokens is not None else common.default_tokens(device, args.quick)
    if tokens < 1:
        raise SystemExit(f"--tokens must be >= 1, got {tokens}")
    timing = TimingConfig(
        reps=args.reps if args.reps is not None else (3 if args.quick else 20),
        warmup=1 if args.quick else 3,
        rep_ms=args.rep_ms if args.rep_ms is not None else (50 if args.quick else 200),
        warmup_ms=10 if args.quick else 50,
    )
    cfg = RunConfig(
        device=device,
        tokens=tokens,
        default_tokens=common.default_tokens(device),
        timing=timing,
        quick=args.quick,
        full=args.full,
        case_patterns=list(args.cases),
        backend=args.backend,
        model=args.model,
        batch=args.batch,
        img=args.img,
        depth=args.depth,
        methods=args.methods,
        model_reps=args.reps,
        memory_snapshot=args.memory_snapshot,
        profile_steps=0 if args.no_profile else args.profile_steps,
    )
    for option in ("batch", "img", "depth"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise SystemExit(f"--{option} must be >= 1, got {getattr(args, option)}")
    if args.profile_steps is not None and args.profile_steps < 0:
        raise SystemExit(f"--profile-steps must be >= 0, got {args.profile_steps}")
    suites = [SUITES[name] for name in args.suite]
    try:
        jobs = sum(len(c.variants) for s in suites for c in s.case_list(cfg))
    except ValueError as exc:  # e.g. --methods naming no method of kk.METHODS
        raise SystemExit(str(exc)) from None
    if jobs == 0:
        raise SystemExit(f"no case matches --cases {' '.join(args.cases)}")
    if args.memory_snapshot is not None:
        names = list(kk.METHODS) + list(models.ANCHORS)
        if args.memory_snapshot not in names:
            raise SystemExit(f"--memory-snapshot: unknown method {args.memory_snapshot!r}; choose among {names}")
        if "models" not in args.suite:
            raise SystemExit("--memory-snapshot needs the models suite (--suite models)")
        if device.type != "cuda":
            print(f"--memory-snapshot {args.memory_snapshot}: torch.cuda.memory snapshots need a CUDA device; "
                  "this run is on CPU, so no snapshot is written (the rest of the report runs)", file=sys.stderr)
    prov = common.provenance(device)
    folder = results_folder(args.out, cfg, tokens_overridden=args.tokens is not None)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.folder = folder

    errors = 0
    desc = f"bench {common.device_label(device)}" + (f" N={tokens}" if set(args.suite) - {"models"} else "")
    with tqdm(total=jobs, desc=desc, unit="run", file=sys.stderr) as bar:
        results = [(suite, run_suite(suite, cfg, bar)) for suite in suites]
    if "load_average_1min_at_start" in prov:
        prov["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    for suite, rows in results:
        targets = suite.targets(rows, cfg)
        text = (suite.render or markdown)(suite, rows, targets, cfg, prov)
        (folder / f"{suite.name}.md").write_text(text)
        derive = suite.derive or derived
        payload = {
            "suite": suite.name,
            "title": suite.title,
            "provenance": prov,
            "config": cfg.describe(),
            "rows": [dict(r.to_dict(), **derive(r, rows)) for r in rows],
            "targets": [t.__dict__ for t in targets],
        }
        if suite.name == "fastfood":
            payload["roofline"] = fastfood_roofline_json(rows, prov)
        (folder / f"{suite.name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        if any(r.status == "ok" for r in rows):
            if suite.draw is not None:
                suite.draw(suite, rows, cfg, prov, folder)
            else:
                plot(suite, rows, cfg, prov, folder / f"{suite.name}.png")
        print(text)
        errors += sum(r.status == "error" for r in rows)
    # cases timed with auto's choice beside an alternative, in every suite of this commit here
    measured, _ = choices.load([folder], prov.get("git_commit"))
    if choices.choices(measured):
        text = choices.choices_markdown(measured, prov)
        (folder / "choices.md").write_text(text)
        print(text)
    tunings = kk_triton.tunings()
    if tunings:  # the first calls' autotuning, which the timed repeats (after warm-up) exclude
        text = autotuning_markdown(tunings, prov)
        (folder / "autotuning.md").write_text(text)
        print(text)
    if errors:
        print(f"{errors} benchmark run(s) failed; see the notes above", file=sys.stderr)
    sys.stderr.flush()
    print(folder)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
