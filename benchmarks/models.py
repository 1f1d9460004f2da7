"""The model-level suite ``models``: one full training step of a timm ViT per method.

Every method in :data:`kron_kernels.METHODS` (whatever it holds when the suite runs) is
measured with ``impl="fused"`` and ``impl="reference"``, next to four anchors:

* ``full_finetune``  -- every weight trainable;
* ``linear_probe``   -- the classifier head alone (the backward stops at the head);
* ``peft_lora``      -- PEFT ``LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"])`` with the
                        head trainable (``modules_to_save``), where peft is importable;
* ``floor``          -- the practical floor: the same model, every weight frozen, the images
                        requiring grad, so the backward still runs through the whole backbone
                        (input gradients only, no weight gradient, no optimizer).

A step is forward (bf16 autocast on CUDA, fp32 on CPU), cross-entropy on synthetic labels,
backward, ``torch.optim.AdamW`` on the trainable parameters, ``zero_grad(set_to_none=True)``.
Models are built with ``pretrained=False`` (never a download), fixed seeds, synthetic data.

Memory per row: parameters (+ buffers), optimizer state and gradients are summed from the
tensors themselves (exact, any device); activations are the forward+backward peak beyond the
resident tensors minus the gradients (CUDA: ``max_memory_allocated``; CPU: the profiler's
allocator events, as in :mod:`benchmarks.common`); the step peak is the whole step's peak
including everything resident.

Used by ``python -m benchmarks.report --suite models`` and ``benchmarks/test_bench_models.py``.
Nothing here touches CUDA or imports timm/PEFT/matplotlib at import time.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import kron_kernels as kk

from . import common
from .common import Case, Row, Target, Timing, Unavailable, check_target

SUITE = "models"
MODE = "train step"
NUM_CLASSES = 100
SEED = 0
LORA_R = 8

# the GPU configuration the targets are stated at; the CPU default is a small ViT at a small batch
GPU_MODEL, GPU_BATCH, GPU_IMG = "vit_base_patch16_224", 64, 224
# (CPU: 112 px, 7 x 7 patches, keeps a full `make bench` on a 2-core machine within minutes; at 224 px
# the FacT rows alone took several minutes there)
CPU_MODEL, CPU_BATCH, CPU_IMG = "vit_small_patch16_224", 4, 112
QUICK_GPU_BATCH = 8
QUICK_CPU_BATCH, QUICK_CPU_IMG = 2, 96

ANCHORS = ("full_finetune", "linear_probe", "peft_lora", "floor")
ANCHOR_VARIANT = {"full_finetune": "torch", "linear_probe": "torch", "peft_lora": "peft", "floor": "torch"}
ANCHOR_TITLE = {
    "full_finetune": "full fine-tuning",
    "linear_probe": "linear probing (head only)",
    "peft_lora": f"PEFT LoRA r={LORA_R} on qkv (+ head)",
    "floor": "floor: no adapter, input gradients only",
}
IMPLS = ("fused", "reference")

# targets (issue 5): named methods that are not in kk.METHODS when the suite runs get no row
AS_FAST_AS_LORA = ("kadaptation", "fact_tt", "fact_tk")
NEAR_FLOOR = ("kadaptation", "fact_tt", "fact_tk", "arc")
LOSA = "losa"
FULL_BACKPROP = ("fact_tt", "fact_tk")  # adapters whose backward runs through the whole backbone


# ----------------------------------------------------------------------------------------
# configuration and cases
# ----------------------------------------------------------------------------------------
def defaults(device: torch.device, quick: bool = False) -> Dict[str, Any]:
    """Model, batch and image size of a run on ``device`` when no flag picks them."""
    if device.type == "cuda":
        return dict(model=GPU_MODEL, batch=QUICK_GPU_BATCH if quick else GPU_BATCH, img=GPU_IMG)
    return dict(model=CPU_MODEL, batch=QUICK_CPU_BATCH if quick else CPU_BATCH, img=QUICK_CPU_IMG if quick else CPU_IMG)


def model_cases(
    device: torch.device,
    quick: bool = False,
    model: Optional[str] = None,
    batch: Optional[int] = None,
    img: Optional[int] = None,
    methods: Optional[Sequence[str]] = None,
    depth: Optional[int] = None,
) -> List[Case]:
    """One case per method of ``kk.METHODS`` (variants fused, reference) and per anchor.

    ``methods`` picks among the methods and the anchors by name (all when None); ``depth``
    overrides the model's number of blocks (smoke tests)."""
    cfg = defaults(device, quick)
    model = model or cfg["model"]
    batch = batch or cfg["batch"]
    img = img or cfg["img"]
    names = list(kk.METHODS) + list(ANCHORS)
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose among {names}")
        names = [n for n in names if n in methods]
    shape = f"{model}-b{batch}-img{img}" + (f"-depth{depth}" if depth else "")
    params = (("model", model), ("batch", batch), ("img", img)) + ((("depth", depth),) if depth else ())
    return [
        Case(name, shape, MODE, (ANCHOR_VARIANT[name],) if name in ANCHORS else IMPLS, params)
        for name in names
    ]


def cases(quick: bool = False) -> List[Case]:
    """The default cases on the default device (the pytest-benchmark suite's)."""
    return model_cases(common.default_device(), quick)


def method_config(method: str, model) -> Dict[str, Any]:
    """Config for ``kk.adapt``: the method's defaults, except where a small model cannot take
    them -- Compacter's bottleneck k = d/32 must be a multiple of n = 4 (ViT-Ti, d = 192:
    k = 6 -> 8). ViT-S/B/L take every default."""
    if method == "compacter":
        d = model.embed_dim
        k = d // 32
        if k % 4:
            return dict(k=max(4, math.ceil(k / 4) * 4))
    return {}


# ----------------------------------------------------------------------------------------
# building one training step
# ----------------------------------------------------------------------------------------
def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass
class ModelBench:
    """A ready training step and its parts (``step`` = ``fwd_bwd`` + ``update`` + ``clear``)."""

    name: str
    impl: str
    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    optimizer: Optional[torch.optim.Optimizer]
    trainable: List[torch.Tensor]
    autocast: Callable[[], Any]
    extra: Dict[str, Any] = field(default_factory=dict)

    def fwd_bwd(self) -> None:
        with self.autocast():
            loss = F.cross_entropy(self.model(self.images), self.labels)
        loss.backward()

    def update(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def clear(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.images.grad = None

    def step(self) -> None:
        self.fwd_bwd()
        self.update()
        self.clear()

    # sizes of what stays resident between steps (exact, from the tensors)
    def parameter_bytes(self) -> int:
        return _tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()))

    def gradient_bytes(self) -> int:
        return _tensor_bytes(self.trainable)  # a gradient has its parameter's shape and dtype

    def optimizer_state_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return _tensor_bytes(t for state in self.optimizer.state.values() for t in state.values())

    def input_bytes(self) -> int:
        return _tensor_bytes((self.images, self.labels))

    @property
    def trainable_params(self) -> int:
        return sum(t.numel() for t in self.trainable)

    @property
    def batch(self) -> int:
        return self.images.shape[0]


def _create(model_name: str, img: int, device: torch.device, depth: Optional[int] = None):
    try:
        import timm
    except Exception as exc:
        raise Unavailable(f"timm is not importable ({type(exc).__name__}: {exc})") from None
    torch.manual_seed(SEED)
    kwargs = {} if depth is None else {"depth": depth}
    model = timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES, img_size=img, **kwargs)
    return model.to(device)


def _peft_lora(model):
    try:
        import peft
        from peft import LoraConfig, get_peft_model
    except Exception as exc:  # ImportError, or a peft/transformers version clash
        raise Unavailable(f"peft is not importable ({type(exc).__name__}: {exc})") from None
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=["qkv"],
                        modules_to_save=["head"])
    with contextlib.redirect_stdout(sys.stderr):
        wrapped = get_peft_model(model, config)
    note = (f"peft {getattr(peft, '__version__', 'unknown')}: LoraConfig(r={LORA_R}, lora_alpha={LORA_R}, "
            "lora_dropout=0, target_modules=['qkv'], modules_to_save=['head'])")
    return wrapped, note


def build(case: Case, variant: str, device: torch.device) -> ModelBench:
    """The training step of ``variant`` of ``case``; raises :class:`Unavailable` to skip."""
    if variant not in case.variants:
        raise ValueError(f"case {case.group} has no variant {variant!r} (it has {case.variants})")
    prm = case.p
    name = case.op
    model = _create(prm["model"], prm["img"], device, prm.get("depth"))
    extra: Dict[str, Any] = {}
    if name in kk.METHODS:
        config = method_config(name, model)
        torch.manual_seed(SEED + 1)
        model = kk.adapt(model, name, impl=variant, **config)  # may return a wrapper (LoSA)
        extra["config"] = {k: v for k, v in config.items()}
    elif name == "full_finetune":
        model.requires_grad_(True)
    elif name == "linear_probe":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    elif name == "peft_lora":
        model, extra["peft"] = _peft_lora(model)
    elif name == "floor":
        model.requires_grad_(False)
    else:
        raise ValueError(f"unknown method {name!r}")
    model.train()
    gen = torch.Generator().manual_seed(SEED + 2)
    images = torch.randn(prm["batch"], 3, prm["img"], prm["img"], generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (prm["batch"],), generator=gen).to(device)
    if name == "floor":
        images.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    autocast = functools.partial(common.training_autocast, device)
    return ModelBench(name, variant, model, images, labels, optimizer, trainable, autocast, extra)


def warm(bench: ModelBench, device: torch.device, steps: int = 1) -> None:
    """Steps before any measurement: Triton compilation, cuBLAS handles, AdamW's state."""
    for _ in range(steps):
        bench.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------
MIB = 2**20


def memory_split(bench: ModelBench, device: torch.device, base: Optional[int] = None) -> Dict[str, Any]:
    """Peak memory of one step split into parameters, optimizer state, gradients and activations
    (bytes; None where not measurable). ``base``: CUDA bytes allocated before the model was built."""
    split: Dict[str, Any] = {
        "parameters": bench.parameter_bytes(),
        "optimizer_state": bench.optimizer_state_bytes(),
        "gradients": bench.gradient_bytes(),
        "inputs": bench.input_bytes(),
    }
    resident = split["parameters"] + split["optimizer_state"] + split["inputs"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        bench.fwd_bwd()
        torch.cuda.synchronize()
        fwd_bwd_peak = torch.cuda.max_memory_allocated() - before
        bench.update()
        bench.clear()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        bench.step()
        torch.cuda.synchronize()
        step_extra = torch.cuda.max_memory_allocated() - before
        if base is not None:
            resident = before - base  # what the allocator holds for this model between steps
        split["method"] = common.CUDA_MEMORY_METHOD
    else:
        def fwd_bwd_then_clear():
            bench.fwd_bwd()
            bench.clear()

        fwd_bwd_peak = common.peak_memory_cpu(fwd_bwd_then_clear, warm=False)
        step_extra = common.peak_memory_cpu(bench.step, warm=False)
        split["method"] = common.CPU_MEMORY_METHOD
    split["resident"] = resident
    split["fwd_bwd_peak_extra"] = fwd_bwd_peak
    split["activations"] = None if fwd_bwd_peak is None else max(fwd_bwd_peak - split["gradients"], 0)
    split["step_peak"] = None if step_extra is None else resident + step_extra
    return split


def dump_memory_snapshot(bench: ModelBench, path: Path) -> str:
    """One step under ``torch.cuda.memory._record_memory_history``; the pickle opens in
    https://pytorch.org/memory_viz."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        bench.step()
        torch.cuda.synchronize()
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return str(path)


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def time_cuda_events(fn: Callable[[], None], reps: int, warmup: int) -> Timing:
    """Median and p20/p80 (ms) of ``reps`` steps, each between two CUDA events (one step is
    tens to hundreds of ms, so the event overhead and launch gaps between steps do not count)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) for start, end in events]
    return common.summarise(samples, f"CUDA events around each step: {warmup} warm-up + {reps} timed steps")


def reps_for(device: torch.device, quick: bool, reps: Optional[int]) -> int:
    if reps is not None:
        return max(1, reps)
    if device.type == "cuda":
        return 5 if quick else 20
    return 2 if quick else 5


# ----------------------------------------------------------------------------------------
# measuring one case into rows
# ----------------------------------------------------------------------------------------
def _row(case: Case, variant: str, device: torch.device) -> Row:
    prm = case.p
    return Row(
        suite=SUITE, case=case.group, op=case.op, shape=case.shape, mode=case.mode, variant=variant,
        params=prm, device=device.type,
        dtype="bfloat16 autocast" if device.type == "cuda" else "float32",
        tokens=prm["batch"] * ((prm["img"] // 16) ** 2 + 1),
    )


def _fill(row: Row, bench: ModelBench, split: Dict[str, Any]) -> None:
    row.extra.update(bench.extra)
    row.extra["trainable_params"] = bench.trainable_params
    row.extra["batch"] = bench.batch
    patch_embed = getattr(getattr(bench.model, "get_base_model", lambda: bench.model)(), "patch_embed", None)
    if getattr(patch_embed, "num_patches", None):
        row.tokens = bench.batch * (patch_embed.num_patches + 1)
    row.extra["memory"] = split
    row.peak_extra_bytes = split["step_peak"]
    row.memory_method = split["method"]


def _timed(row: Row, timing: Any, batch: int) -> None:
    if isinstance(timing, Exception):
        common.record_failure(row, timing)
        return
    row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
    row.timing_method = timing.method
    row.extra["images_per_s"] = batch / (timing.median_ms * 1e-3)


def measure_case(suite: str, case: Case, cfg) -> List[Row]:
    """Build, warm, memory-profile and time the variants of one case; never raises.

    CUDA: one variant at a time (built, measured, freed), timed with CUDA events.
    CPU: every variant of the case alive at once and timed in turns (as the op suites do)."""
    device = cfg.device
    reps = reps_for(device, cfg.quick, getattr(cfg, "model_reps", None))
    rows = {variant: _row(case, variant, device) for variant in case.variants}
    benches: Dict[str, ModelBench] = {}
    try:
        for variant, row in rows.items():
            bench = None  # on CUDA the previous variant's model is gone before this one is built
            common.free_memory(device)
            base = torch.cuda.memory_allocated() if device.type == "cuda" else None
            try:
                bench = build(case, variant, device)
                row.backend = common.variant_backend(variant, bench.step) if variant in IMPLS else (
                    "peft" if variant == "peft" else "torch")
                warm(bench, device, steps=1)  # after variant_backend's step: AdamW's state exists
                _fill(row, bench, memory_split(bench, device, base))
                if device.type == "cuda":
                    _timed(row, time_cuda_events(bench.step, reps, warmup=3), bench.batch)
                    if getattr(cfg, "memory_snapshot", None) == case.op and getattr(cfg, "folder", None):
                        path = Path(cfg.folder) / f"memory_snapshot-{case.op}-{variant}.pickle"
                        row.extra["memory_snapshot"] = dump_memory_snapshot(bench, path)
                else:
                    benches[variant] = bench
            except Exception as exc:  # reported in the row, never allowed to end the run
                common.record_failure(row, exc)
        if benches:
            timings = common.time_cpu_interleaved(
                {v: b.step for v, b in benches.items()}, reps=reps, warmup=1, min_repeat_s=0.0)
            for variant, timing in timings.items():
                _timed(rows[variant], timing, benches[variant].batch)
    finally:
        benches.clear()
        common.free_memory(device)
    return list(rows.values())


# ----------------------------------------------------------------------------------------
# derived columns and targets
# ----------------------------------------------------------------------------------------
def _ok(rows: Sequence[Row], op: str, variant: Optional[str] = None) -> Optional[Row]:
    for row in rows:
        if row.op == op and (variant is None or row.variant == variant) and row.status == "ok":
            return row
    return None


def derived(row: Row, rows: Sequence[Row]) -> Dict[str, Optional[float]]:
    """Fused over reference (speed-up, memory ratio) and the step's overhead over the floor row."""
    ok = row.status == "ok"
    ref = _ok(rows, row.op, "reference") if row.variant == "fused" else None
    floor = _ok(rows, "floor")
    overhead = common.ratio(row.median_ms, floor and floor.median_ms) if ok and row.op != "floor" else None
    return {
        "speedup_vs_reference": common.ratio(ref and ref.median_ms, row.median_ms) if ok and ref else None,
        "memory_ratio_vs_reference": (common.ratio(row.peak_extra_bytes, ref and ref.peak_extra_bytes)
                                      if ok and ref else None),
        "overhead_vs_floor": None if overhead is None else overhead - 1.0,
    }


def _target_na(cfg, rows: Sequence[Row]) -> Optional[str]:
    if cfg.device.type != "cuda":
        return "GPU target, this run is on CPU"
    shapes = {r.params.get("model"): (r.params.get("batch"), r.params.get("img")) for r in rows}
    want = {GPU_MODEL: (GPU_BATCH, GPU_IMG)}
    if shapes != want:
        return (f"stated at {GPU_MODEL} batch {GPU_BATCH} img {GPU_IMG}, this run used "
                + ", ".join(f"{m} batch {b} img {i}" for m, (b, i) in shapes.items()))
    return None


def _missing(rows: Sequence[Row], pairs) -> str:
    reasons = []
    for op, variant in pairs:
        found = [r for r in rows if r.op == op and r.variant == variant]
        if not found:
            reasons.append(f"{op}/{variant} not run")
        elif found[0].status != "ok":
            reasons.append(f"{op}/{variant} {found[0].status}")
    return "; ".join(reasons) or "no data"


def targets(rows: List[Row], cfg) -> List[Target]:
    """Issue 5's targets (GPU, ViT-B/16, bf16, batch 64) and issue 3's LoSA claim (any device), for the
    methods in kk.METHODS that ran."""
    na = _target_na(cfg, rows)
    methods = [m for m in kk.METHODS if any(r.op == m for r in rows)]
    out: List[Target] = []
    for m in methods:
        fused, ref = _ok(rows, m, "fused"), _ok(rows, m, "reference")
        speedup = common.ratio(ref and ref.median_ms, fused and fused.median_ms)
        memory = common.ratio(fused and fused.peak_extra_bytes, ref and ref.peak_extra_bytes)
        need = _missing(rows, ((m, "fused"), (m, "reference")))
        out.append(Target("fused step >= 1.3x faster than its reference", m,
                          "-" if speedup is None else f"{speedup:.2f}x faster",
                          check_target(speedup, lambda v: v >= 1.3, na, need)))
        out.append(Target("fused step peak memory <= its reference's", m,
                          "-" if memory is None else f"{memory:.3f}x reference",
                          check_target(memory, lambda v: v <= 1.0, na, need)))
    lora = _ok(rows, "peft_lora")
    for m in [m for m in methods if m in AS_FAST_AS_LORA]:
        fused = _ok(rows, m, "fused")
        speed = common.ratio(lora and lora.median_ms, fused and fused.median_ms)
        out.append(Target(f"fused step no slower than PEFT LoRA r={LORA_R}", m,
                          "-" if speed is None else f"{speed:.2f}x LoRA's speed",
                          check_target(speed, lambda v: v >= 1.0, na,
                                       _missing(rows, ((m, "fused"), ("peft_lora", "peft"))))))
    if LOSA in methods:
        fused = _ok(rows, LOSA, "fused")
        speed = common.ratio(lora and lora.median_ms, fused and fused.median_ms)
        memory = common.ratio(fused and fused.peak_extra_bytes, lora and lora.peak_extra_bytes)
        need = _missing(rows, ((LOSA, "fused"), ("peft_lora", "peft")))
        out.append(Target(f"fused step >= 2x faster than PEFT LoRA r={LORA_R}", LOSA,
                          "-" if speed is None else f"{speed:.2f}x LoRA's speed",
                          check_target(speed, lambda v: v >= 2.0, na, need)))
        out.append(Target(f"fused step peak memory < PEFT LoRA r={LORA_R}'s", LOSA,
                          "-" if memory is None else f"{memory:.3f}x LoRA",
                          check_target(memory, lambda v: v < 1.0, na, need)))
    if LOSA in methods:
        # issue 3: the LoSA paper's central claim, on any device (same backbone, same run):
        # its step >= 2x faster than a full-backprop adapter's (FacT), with lower peak memory
        losa = _ok(rows, LOSA, "fused")
        for m in [m for m in methods if m in FULL_BACKPROP]:
            other = _ok(rows, m, "fused")
            speed = common.ratio(other and other.median_ms, losa and losa.median_ms)
            memory = common.ratio(losa and losa.peak_extra_bytes, other and other.peak_extra_bytes)
            need = _missing(rows, ((LOSA, "fused"), (m, "fused")))
            out.append(Target(f"any device: fused step >= 2x faster than fused {m}'s (full backprop)", LOSA,
                              "-" if speed is None else f"{speed:.2f}x {m}'s speed",
                              check_target(speed, lambda v: v >= 2.0, None, need)))
            out.append(Target(f"any device: fused step peak memory < fused {m}'s", LOSA,
                              "-" if memory is None else f"{memory:.3f}x {m}",
                              check_target(memory, lambda v: v < 1.0, None, need)))
    floor = _ok(rows, "floor")
    for m in [m for m in methods if m in NEAR_FLOOR]:
        fused = _ok(rows, m, "fused")
        ratio = common.ratio(fused and fused.median_ms, floor and floor.median_ms)
        out.append(Target("fused step overhead <= 20% over the floor", m,
                          "-" if ratio is None else f"{(ratio - 1) * 100:+.0f}% over the floor",
                          check_target(ratio, lambda v: v <= 1.2, na,
                                       _missing(rows, ((m, "fused"), ("floor", "torch"))))))
    return out


# ----------------------------------------------------------------------------------------
# Markdown and plots
# ----------------------------------------------------------------------------------------
def _num(value: Optional[float]) -> str:
    return common.format_number(value)


def _mib(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else _num(nbytes / MIB)


def _label(row: Row) -> str:
    return ANCHOR_TITLE.get(row.op, f"`{row.op}`")


def markdown(suite, rows: List[Row], target_rows: List[Target], cfg, prov: Dict[str, Any]) -> str:
    device_kind = "GPU" if cfg.device.type == "cuda" else "CPU"
    shapes = sorted({r.shape for r in rows})
    lines = [f"# {suite.title} — {prov['device']}", ""]
    lines += [
        f"Measured {prov['date_utc']} on **{prov['device']}** ({device_kind}); commit "
        f"`{prov['git_commit'][:12]}`" + (" (uncommitted changes)" if prov.get("git_dirty") else "")
        + f"; torch {prov['torch']}, triton {prov['triton']}, CUDA {prov['torch_cuda']}, timm {prov['timm']}, "
        f"peft {prov['peft']}; kron_kernels backend `{cfg.backend}`; kk.METHODS = {', '.join(kk.METHODS)}.",
        "",
        f"One training step of `{'`, `'.join(shapes)}` (model-batch-image size), {NUM_CLASSES} classes, "
        + ("bf16 autocast, fp32 weights and factors" if cfg.device.type == "cuda" else "float32")
        + ", AdamW on the trainable parameters, synthetic data, `pretrained=False`."
        + (" **Quick run** (small sizes, few repeats): indicative only." if cfg.quick else ""),
        "",
        "| method | impl | trainable params | step ms median (p20–p80) | images/s | peak MiB "
        "| fused vs reference: speed-up | memory ratio | overhead over floor | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = derived(row, rows)
        ok = row.status == "ok"
        times = f"{_num(row.median_ms)} ({_num(row.p20_ms)}–{_num(row.p80_ms)})" if ok else row.status
        overhead = d["overhead_vs_floor"]
        params = row.extra.get("trainable_params")
        note = row.reason.replace("|", "\\|").replace("\n", " ") if not ok else (
            row.backend if row.variant == "fused" else "")
        lines.append(
            f"| {_label(row)} | {row.variant} | {'-' if params is None else f'{params:,}'} | {times} "
            f"| {_num(row.extra.get('images_per_s')) if ok else '-'} | {_mib(row.peak_extra_bytes) if ok else '-'} "
            f"| {'-' if d['speedup_vs_reference'] is None else _num(d['speedup_vs_reference']) + '×'} "
            f"| {'-' if d['memory_ratio_vs_reference'] is None else _num(d['memory_ratio_vs_reference']) + '×'} "
            f"| {'-' if overhead is None else f'{overhead * 100:+.0f}%'} | {note} |"
        )
    lines += [
        "",
        "## Memory of one step",
        "",
        "Parameters (+ buffers), optimizer state and gradients are the sizes of those tensors; "
        "activations = the forward+backward peak beyond what stays resident between steps, minus the "
        "gradients (so activations, autograd temporaries and workspace); step peak = resident + the "
        "whole step's peak (forward, backward, AdamW).",
        "",
        "| method | impl | parameters MiB | optimizer state MiB | gradients MiB | activations MiB | step peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mem = row.extra.get("memory")
        if not mem:
            continue
        lines.append(
            f"| {_label(row)} | {row.variant} | {_mib(mem['parameters'])} | {_mib(mem['optimizer_state'])} "
            f"| {_mib(mem['gradients'])} | {_mib(mem['activations'])} | {_mib(mem['step_peak'])} |"
        )
    lines += ["", "## Targets (GPU, ViT-B/16, bf16, batch 64, unless a row says any device; reported, not asserted)",
              "",
              "| target | method | measured | status |", "|---|---|---|---|"]
    for t in target_rows:
        lines.append(f"| {t.goal} | {t.case} | {t.measured} | {t.status} |")
    timing_methods = sorted({r.timing_method for r in rows if r.timing_method})
    memory_methods = sorted({r.memory_method for r in rows if r.memory_method})
    lines += [
        "",
        "## Notes",
        "",
        "- **fused** / **reference**: `kk.adapt(model, method, impl=...)` with the method's default config"
        " (the `config` in the JSON rows says where a small model needed another); the backbone frozen, "
        "the head trainable. The notes column names the kron_kernels dispatches a fused step made.",
        "- **full fine-tuning**: every weight trainable. **linear probing**: the head alone (the backward "
        "stops at the head). **PEFT LoRA**: peft's LoRA on every block's fused `qkv`, r = lora_alpha = 8, "
        "no dropout, the head trainable (`modules_to_save`).",
        "- **floor**: the same model with no adapter and every weight frozen; the images require grad, so "
        "the backward runs through the whole backbone (input gradients only, no weight gradient, no "
        "optimizer step): the least a step that trains anything inside the backbone costs.",
        "- Overhead over floor = step time / floor step time − 1.",
        f"- Timing: {'; '.join(timing_methods) or '-'}. Memory: {'; '.join(memory_methods) or '-'}.",
    ]
    if cfg.device.type == "cpu":
        lines.append(
            f"- CPU: {prov['cpu']}, {prov['torch_threads']} torch threads; 1-min load average "
            f"{prov.get('load_average_1min_at_start', 'n/a')} at the start, "
            f"{prov.get('load_average_1min_at_end', 'n/a')} at the end; fused and reference of a method "
            "are timed in turns, so their ratio holds better than the absolute times."
        )
    if getattr(cfg, "memory_snapshot", None):
        snaps = [r.extra["memory_snapshot"] for r in rows if "memory_snapshot" in r.extra]
        if snaps:
            lines.append("- Memory snapshots (open in https://pytorch.org/memory_viz): "
                         + ", ".join(f"`{Path(s).name}`" for s in snaps))
        else:
            lines.append(f"- No memory snapshot of `{cfg.memory_snapshot}`: "
                         + ("it needs CUDA (torch.cuda.memory), this run is on CPU"
                            if cfg.device.type != "cuda" else "that method did not run"))
    for note in sorted({r.extra["peft"] for r in rows if "peft" in r.extra}):
        lines.append(f"- PEFT: {note}.")
    for row in rows:
        if row.status != "ok":
            lines.append(f"- {row.status}: {row.op} / {row.variant}: {row.reason}")
    return "\n".join(lines) + "\n"


def plot(suite, rows: List[Row], cfg, prov: Dict[str, Any], folder: Path) -> List[Path]:
    """``models.png``: step time vs step peak memory per row; ``models_params.png``: trainable
    parameters vs images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return []
    markers = {"fused": "o", "reference": "s", "torch": "^", "peft": "D"}
    shape = ", ".join(sorted({r.shape for r in ok}))
    dtype = "bf16 autocast" if cfg.device.type == "cuda" else "fp32"
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in ok:
        if row.peak_extra_bytes is None:
            continue
        ax.errorbar(row.median_ms, row.peak_extra_bytes / MIB,
                    xerr=[[row.median_ms - row.p20_ms], [row.p80_ms - row.median_ms]],
                    marker=markers.get(row.variant, "x"), capsize=2, linestyle="none")
        ax.annotate(f"{row.op} ({row.variant})", (row.median_ms, row.peak_extra_bytes / MIB),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("training step, median ms (bars p20–p80)")
    ax.set_ylabel("step peak memory (MiB)")
    ax.set_title(f"{prov['device']}: {shape}, {dtype}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / f"{suite.name}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in ok:
        params = max(row.extra.get("trainable_params", 0), 1)  # the floor trains nothing: drawn at 1
        ax.scatter(params, row.extra["images_per_s"], marker=markers.get(row.variant, "x"))
        ax.annotate(f"{row.op} ({row.variant})", (params, row.extra["images_per_s"]),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log; the floor, which trains none, at 1)")
    ax.set_ylabel("images / s (training)")
    ax.set_title(f"{prov['device']}: {shape}, {dtype}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    paths.append(folder / f"{suite.name}_params.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
