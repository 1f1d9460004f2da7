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

Where a step's time goes, per row: after the timing (so the timed steps never run under the
profiler) a few more steps run under ``torch.profiler`` (one profiler warm-up step, then
``profile_steps`` recorded ones), and ``row.extra["profile"]`` keeps the top entries by time with
their time and call count per step, the remainder and the total. On CUDA the entries are the
device's kernels (and memcpy/memset) by device time, the count their launches; on CPU, where
there are no kernels, the ops by self CPU time ("CPU op time"), the count their calls.

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
# on CUDA, the methods whose auto choice (Triton) is measured beside their dense composition:
# variant "dense" is the fused model stepped under kk.use_backend("dense") (the H200 run of
# 93d8659 put 48% of a FacT step's kernel time in the Triton backward)
DENSE_ALTERNATIVE = ("fact_tt", "fact_tk")

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
    def variants(name):
        if name in ANCHORS:
            return (ANCHOR_VARIANT[name],)
        return IMPLS + (("dense",) if device.type == "cuda" and name in DENSE_ALTERNATIVE else ())

    return [Case(name, shape, MODE, variants(name), params) for name in names]


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
    backend: Optional[str] = None  # a kron_kernels backend the whole step runs under (variant dense)

    def fwd_bwd(self) -> None:
        with kk.use_backend(self.backend) if self.backend else contextlib.nullcontext():
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
        model = kk.adapt(model, name, impl="fused" if variant == "dense" else variant, **config)  # LoSA: a wrapper
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
    return ModelBench(name, variant, model, images, labels, optimizer, trainable, autocast, extra,
                      backend="dense" if variant == "dense" else None)


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
# where a step's time goes (torch.profiler)
# ----------------------------------------------------------------------------------------
PROFILE_TOP = 10  # entries kept per row; the rest are summed into "other"
CUDA_KERNELS, CPU_OPS = "cuda_kernels", "cpu_ops"  # what a breakdown's entries are
PROFILE_LABEL = {
    CUDA_KERNELS: "CUDA kernel time (device time of each kernel, memcpy, memset; count = launches)",
    CPU_OPS: "CPU op time (self CPU time of each op; count = calls; not GPU kernel time)",
}
# FunctionEventAvg's self device time: `self_device_time_total` from torch 2.4, `self_cuda_time_total`
# before (kept as a deprecated alias in some versions)
_SELF_DEVICE_TIME = ("self_device_time_total", "self_cuda_time_total")
_SELF_CPU_TIME = ("self_cpu_time_total",)


def profile_steps_for(device: torch.device, quick: bool, steps: Optional[int]) -> int:
    """Steps recorded per row (0: no breakdown)."""
    if steps is not None:
        return max(0, steps)
    if device.type == "cuda":
        return 3
    return 1 if quick else 2


Entries = List[Tuple[str, float, int]]  # (name, self time in µs, events) per name
# the profiler's own bookkeeping, which key_averages() leaves out too
_PROFILER_UTILITY = frozenset({
    "[memory]", "[OutOfMemory]", "profiler::_record_function_enter", "profiler::_record_function_enter_new",
    "profiler::_record_function_exit", "aten::is_leaf", "aten::output_nr", "aten::_version",
})


_demangle = getattr(torch._C, "_demangle", lambda name: name)


def _is_step(name: str) -> bool:  # the schedule's ProfilerStep#<n> range around each whole step
    return str(name).startswith("ProfilerStep")


def _us(event: Any, names: Sequence[str]) -> float:
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _entries_from_averages(events: Sequence[Any], kind: str) -> Tuple[Entries, Optional[float]]:
    """The entries of ``kind`` and the recorded steps' wall time (µs) from ``prof.key_averages()``."""
    cpu = torch.autograd.DeviceType.CPU
    if kind == CUDA_KERNELS:
        # GPU-side copies of record_function ranges (ProfilerStep#, Optimizer.step) span kernels counted already
        entries = [(e.key, _us(e, _SELF_DEVICE_TIME), e.count) for e in events
                   if getattr(e, "device_type", cpu) != cpu and not getattr(e, "is_user_annotation", False)
                   and not _is_step(e.key)]
    elif kind == CPU_OPS:
        entries = [(e.key, _us(e, _SELF_CPU_TIME), e.count) for e in events
                   if getattr(e, "device_type", cpu) == cpu and not _is_step(e.key)]
    else:
        raise ValueError(f"unknown profile kind {kind!r}")
    walls = [e for e in events if _is_step(e.key) and getattr(e, "device_type", cpu) == cpu]
    return entries, (sum(_us(e, ("cpu_time_total",)) for e in walls) if walls else None)


def _entries_from_kineto(events: Sequence[Any], kind: str) -> Tuple[Entries, Optional[float]]:
    """The same as :func:`_entries_from_averages`, straight from the raw Kineto events
    (``prof.profiler.kineto_results.events()``): key_averages() builds a Python FunctionEvent per
    event, ~45 µs each, and a ViT-B step has thousands (floor) to tens of thousands (FacT
    reference) CPU ops, plus its kernels and their launches; this reads each event's name, times
    and device once (10-20x faster on CPU profiles of the suite's steps, the same numbers).
    CPU self time = the op's span minus its direct children's on the same thread, the tree built as
    torch builds it (an op inside another's span, by start, longest first; an only child of the
    same name folded into its parent)."""
    if kind not in (CUDA_KERNELS, CPU_OPS):
        raise ValueError(f"unknown profile kind {kind!r}")
    cpu = torch.autograd.DeviceType.CPU
    totals: Dict[str, List[float]] = {}
    wall_ns, steps_seen = 0.0, 0

    def add(name: str, ns: float) -> None:
        slot = totals.setdefault(name, [0.0, 0])
        slot[0] += ns
        slot[1] += 1

    threads: Dict[Any, List[Tuple[int, int, str]]] = {}
    for e in events:
        name = e.name()
        if name in _PROFILER_UTILITY or getattr(e, "is_hidden_event", lambda: False)():
            continue
        if e.device_type() != cpu:
            if kind == CUDA_KERNELS and not e.is_user_annotation() and not _is_step(name):
                add(name, e.duration_ns())
            continue
        if e.is_async() or e.start_thread_id() != e.end_thread_id():
            if kind == CPU_OPS and not _is_step(name):
                add(name, 0.0)  # counted, no self time, as in torch's tree
            continue
        if _is_step(name):
            wall_ns += e.duration_ns()
            steps_seen += 1
        if kind == CPU_OPS:
            threads.setdefault(e.start_thread_id(), []).append((e.start_ns(), e.end_ns(), name))
    for spans in threads.values():
        spans.sort(key=lambda span: (span[0], -span[1]))
        ops: List[List[Any]] = []  # [name, self ns, parent's index or -1, children, end]
        stack: List[int] = []  # the enclosing ops, innermost last
        for start, end, name in spans:
            while stack and (start >= ops[stack[-1]][4] or end > ops[stack[-1]][4]):
                stack.pop()
            parent = stack[-1] if stack else -1
            if parent >= 0:
                ops[parent][1] -= end - start
                ops[parent][3] += 1
            stack.append(len(ops))
            ops.append([name, end - start, parent, 0, end])
        # torch's tree folds an op into its parent of the same name when it is the parent's only
        # child (a redispatch): one call, the two self times summed (children after parents: reversed)
        for op in reversed(ops):
            parent = op[2]
            if parent >= 0 and ops[parent][0] == op[0] and ops[parent][3] == 1:
                ops[parent][1] += op[1]
                ops[parent][3] = op[3]
                op[0] = None
        for name, self_ns, *_ in ops:
            if name is not None and not _is_step(name):
                add(name, self_ns)
    demangled: Dict[str, List[float]] = {}  # kernel names as key_averages() shows them
    for name, (ns, count) in totals.items():
        slot = demangled.setdefault(_demangle(name), [0.0, 0])
        slot[0] += ns
        slot[1] += count
    entries = [(name, ns / 1e3, count) for name, (ns, count) in demangled.items()]
    return entries, (wall_ns / 1e3 if steps_seen else None)


def summarise_profile(entries: Entries, wall_us: Optional[float], steps: int, kind: str,
                      top: int = PROFILE_TOP) -> Dict[str, Any]:
    """Top ``top`` entries by time, per step (ms, calls), the rest as "other", and the total.
    ``kind``: :data:`CUDA_KERNELS` (device events by device time) or :data:`CPU_OPS` (CPU ops by
    self CPU time, the ProfilerStep# ranges, which hold the whole step, left out)."""
    picked = sorted(entries, key=lambda entry: (-entry[1], entry[0]))

    def entry(us: float, calls: float, **more) -> Dict[str, Any]:
        return dict(more, ms_per_step=us / steps / 1e3, calls_per_step=calls / steps)

    total_us = sum(us for _, us, _ in picked)
    head = [entry(us, calls, name=name, share=common.ratio(us, total_us)) for name, us, calls in picked[:top]]
    rest = picked[top:]
    return {
        "kind": kind,
        "label": PROFILE_LABEL[kind],
        "steps": steps,
        "top": head,
        "other": entry(sum(us for _, us, _ in rest), sum(calls for _, _, calls in rest), entries=len(rest)),
        "total": entry(total_us, sum(calls for _, _, calls in picked), entries=len(picked)),
        # wall time of a recorded step, profiler overhead included (never a timing)
        "profiled_step_ms": None if wall_us is None else wall_us / steps / 1e3,
    }


def _read_profile(prof: Any, kind: str) -> Tuple[Entries, Optional[float], str]:
    try:
        return (*_entries_from_kineto(prof.profiler.kineto_results.events(), kind), "Kineto events")
    except (AttributeError, TypeError):  # a torch without these bindings: the documented, slower path
        return (*_entries_from_averages(prof.key_averages(), kind), "key_averages()")


def profile_step(bench: ModelBench, device: torch.device, steps: int, top: int = PROFILE_TOP) -> Dict[str, Any]:
    """Where ``steps`` training steps' time goes (see the module's docstring); one more step runs
    first under the profiler (its warm-up, discarded). Call it after the timing, never around it."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with common.quiet_native_stderr():
        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
            for _ in range(1 + steps):
                bench.step()
                if cuda:  # each recorded step ends with its kernels
                    torch.cuda.synchronize()
                prof.step()
    kind = CUDA_KERNELS if cuda else CPU_OPS
    entries, wall_us, source = _read_profile(prof, kind)
    note = None
    if cuda and not entries:
        kind = CPU_OPS
        entries, wall_us, source = _read_profile(prof, kind)
        note = "the profiler recorded no CUDA kernel (CUPTI unavailable?): CPU op time instead"
    summary = summarise_profile(entries, wall_us, steps, kind, top)
    if note:
        summary["note"] = note
    summary["method"] = (f"torch.profiler {torch.__version__}, activities {'CPU+CUDA' if cuda else 'CPU'}: "
                         f"1 warm-up + {steps} recorded step{'' if steps == 1 else 's'} after the timing, "
                         f"read from its {source}")
    return summary


def _profiled(row: Row, bench: ModelBench, device: torch.device, steps: int) -> None:
    """``row.extra["profile"]``: the breakdown, or why there is none; never fails the row."""
    if not steps or row.status != "ok":
        return
    try:
        row.extra["profile"] = profile_step(bench, device, steps)
    except Exception as exc:  # the timing stands without its breakdown
        row.extra["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}


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
    """Build, warm, memory-profile and time the variants of one case, then profile where their
    step's time goes (``cfg.profile_steps``; 0: not); never raises.

    CUDA: one variant at a time (built, measured, freed), timed with CUDA events.
    CPU: every variant of the case alive at once and timed in turns (as the op suites do)."""
    device = cfg.device
    reps = reps_for(device, cfg.quick, getattr(cfg, "model_reps", None))
    profile_steps = profile_steps_for(device, cfg.quick, getattr(cfg, "profile_steps", None))
    rows = {variant: _row(case, variant, device) for variant in case.variants}
    benches: Dict[str, ModelBench] = {}
    try:
        for variant, row in rows.items():
            bench = None  # on CUDA the previous variant's model is gone before this one is built
            common.free_memory(device)
            base = torch.cuda.memory_allocated() if device.type == "cuda" else None
            try:
                bench = build(case, variant, device)
                row.backend = common.variant_backend(variant, bench.step) if variant in IMPLS + ("dense",) else (
                    "peft" if variant == "peft" else "torch")
                warm(bench, device, steps=1)  # after variant_backend's step: AdamW's state exists
                _fill(row, bench, memory_split(bench, device, base))
                if device.type == "cuda":
                    _timed(row, time_cuda_events(bench.step, reps, warmup=3), bench.batch)
                    if getattr(cfg, "memory_snapshot", None) == case.op and getattr(cfg, "folder", None):
                        path = Path(cfg.folder) / f"memory_snapshot-{case.op}-{variant}.pickle"
                        row.extra["memory_snapshot"] = dump_memory_snapshot(bench, path)
                    _profiled(row, bench, device, profile_steps)
                else:
                    benches[variant] = bench
            except Exception as exc:  # reported in the row, never allowed to end the run
                common.record_failure(row, exc)
        if benches:
            timings = common.time_cpu_interleaved(
                {v: b.step for v, b in benches.items()}, reps=reps, warmup=1, min_repeat_s=0.0)
            for variant, timing in timings.items():
                _timed(rows[variant], timing, benches[variant].batch)
            for variant, bench in benches.items():  # after every variant's timing
                _profiled(rows[variant], bench, device, profile_steps)
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
    ref = _ok(rows, row.op, "reference") if row.variant in ("fused", "dense") else None
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


def _busy(row: Row) -> str:
    """The profiled step's device (kernel) time over the timed step median: well under 100%
    means the device waits on the host (the H200 run of 93d8659: 35-48% for most fused steps)."""
    profile = row.extra.get("profile") or {}
    total = profile.get("total") or {}
    if row.status != "ok" or profile.get("kind") != CUDA_KERNELS or not total.get("ms_per_step") or not row.median_ms:
        return "-"  # on CPU the ops' times nest: no busy share
    return f"{total['ms_per_step'] / row.median_ms:.0%}"


def _launches(row: Row) -> str:
    total = (row.extra.get("profile") or {}).get("total") or {}
    return "-" if row.status != "ok" or total.get("calls_per_step") is None else f"{total['calls_per_step']:,.0f}"


def _label(row: Row) -> str:
    return ANCHOR_TITLE.get(row.op, f"`{row.op}`")


PROFILE_TOP_MD = 5  # entries per row in the Markdown (the JSON keeps PROFILE_TOP)
_NAMESPACES = ("(anonymous namespace)::", "at::native::", "at::cuda::", "c10::")


def _kernel_name(name: str, width: int = 80) -> str:
    """A kernel's name for a table cell: no ``void``, no argument list, no common namespaces, at most
    ``width`` characters (the JSON keeps the full name)."""
    short = name.strip()
    if short.startswith("void "):
        short = short[5:]
    if short.endswith(")"):  # a CUDA kernel's signature: cut the last top-level (...)
        depth = 0
        for i in range(len(short) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(short[i], 0)
            if depth == 0:
                short = short[:i] if i > 0 else short
                break
    for prefix in _NAMESPACES:
        short = short.replace(prefix, "")
    if len(short) > width:
        short = short[: width - 1] + "…"
    return short.replace("|", "\\|").replace("`", "'")


def _calls(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 else f"{value:,.1f}"


def _share(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def profile_lines(rows: List[Row], cfg) -> List[str]:
    """The Markdown section of the per-row breakdowns (empty when no row has one)."""
    profiled = [r for r in rows if "profile" in r.extra]
    if not profiled:
        return []
    cuda = cfg.device.type == "cuda"
    kinds = {r.extra["profile"].get("kind") for r in profiled} - {None}
    steps = sorted({r.extra["profile"]["steps"] for r in profiled if "steps" in r.extra["profile"]})
    label = PROFILE_LABEL[CUDA_KERNELS if cuda else CPU_OPS]
    lines = [
        "",
        "## Where a step's time goes (torch.profiler)",
        "",
        f"{label}, per training step: the top {PROFILE_TOP_MD} of each row, the rest as *other*, and the "
        f"total, with its share of the row's timed step median. Recorded over {'/'.join(map(str, steps))} "
        f"step{'' if steps == [1] else 's'} after one profiler warm-up step, in a separate pass after the "
        "row's timing (the profiler's overhead is in no timed number). The JSON rows keep the top "
        f"{PROFILE_TOP} with full names (`extra.profile`)."
        + (" On CPU there are no kernels: these are the aten ops (and `record_function` ranges such as "
           "the optimizer's Python) by self CPU time." if not cuda else
           " A total well under the step median means the GPU idles between kernels (launch-bound)."),
        "",
        f"| method | impl | {'kernel' if cuda else 'CPU op'} | ms / step | share | "
        f"{'launches' if cuda else 'calls'} / step |",
        "|---|---|---|---|---|---|",
    ]
    for row in profiled:
        prof = row.extra["profile"]
        first = f"| {_label(row)} | {row.variant} "
        if "error" in prof:
            lines.append(first + f"| profile failed: {prof['error'].replace('|', '/')} | - | - | - |")
            continue
        for i, entry in enumerate(prof["top"][:PROFILE_TOP_MD]):
            lead = first if i == 0 else "| | "
            lines.append(f"{lead}| `{_kernel_name(entry['name'])}` | {_num(entry['ms_per_step'])} "
                         f"| {_share(entry['share'])} | {_calls(entry['calls_per_step'])} |")
        shown = prof["top"][:PROFILE_TOP_MD]
        total = prof["total"]
        rest_ms = max(total["ms_per_step"] - sum(e["ms_per_step"] for e in shown), 0.0)
        rest_calls = max(total["calls_per_step"] - sum(e["calls_per_step"] for e in shown), 0.0)
        rest_n = total["entries"] - len(shown)
        if rest_n > 0:
            lines.append(f"| | | other ({rest_n} more) | {_num(rest_ms)} "
                         f"| {_share(common.ratio(rest_ms, total['ms_per_step']))} | {_calls(rest_calls)} |")
        of_median = common.ratio(total["ms_per_step"], row.median_ms)
        note = f"; {prof['note']}" if prof.get("note") else ""
        lines.append(f"{first if not shown else '| | '}| **total** ({total['entries']} distinct; "
                     f"{'-' if of_median is None else f'{of_median:.0%}'} of the step median{note}) "
                     f"| {_num(total['ms_per_step'])} | 100% | {_calls(total['calls_per_step'])} |")
    if len(kinds) > 1:
        lines += ["", "Rows whose total names a note recorded CPU op time instead of kernel time."]
    return lines


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
        "| fused vs reference: speed-up | memory ratio | overhead over floor | device busy | launches | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = derived(row, rows)
        ok = row.status == "ok"
        times = f"{_num(row.median_ms)} ({_num(row.p20_ms)}–{_num(row.p80_ms)})" if ok else row.status
        overhead = d["overhead_vs_floor"]
        params = row.extra.get("trainable_params")
        note = row.reason.replace("|", "\\|").replace("\n", " ") if not ok else (
            row.backend if row.variant in ("fused", "dense") else "")
        lines.append(
            f"| {_label(row)} | {row.variant} | {'-' if params is None else f'{params:,}'} | {times} "
            f"| {_num(row.extra.get('images_per_s')) if ok else '-'} | {_mib(row.peak_extra_bytes) if ok else '-'} "
            f"| {'-' if d['speedup_vs_reference'] is None else _num(d['speedup_vs_reference']) + '×'} "
            f"| {'-' if d['memory_ratio_vs_reference'] is None else _num(d['memory_ratio_vs_reference']) + '×'} "
            f"| {'-' if overhead is None else f'{overhead * 100:+.0f}%'} | {_busy(row)} | {_launches(row)} | {note} |"
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
    lines += profile_lines(rows, cfg)
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
        "- **device busy** (GPU): the profiled step's CUDA kernel time over the step median; **launches**: "
        "kernels per step (on CPU: profiled ops) -- a busy share well under 100% means the step waits on the "
        "host, and fewer launches is then what speeds it up.",
        "- **fused** / **reference**: `kk.adapt(model, method, impl=...)` with the method's default config"
        " (the `config` in the JSON rows says where a small model needed another); the backbone frozen, "
        "the head trainable. The notes column names the kron_kernels dispatches a fused step made. "
        "**dense** (GPU, FacT): the fused model stepped under `kk.use_backend(\"dense\")`, its cuBLAS "
        "composition measured beside auto's Triton kernels (its speed-up column is against the reference).",
        "- **full fine-tuning**: every weight trainable. **linear probing**: the head alone (the backward "
        "stops at the head). **PEFT LoRA**: peft's LoRA on every block's fused `qkv`, r = lora_alpha = 8, "
        "no dropout, the head trainable (`modules_to_save`).",
        "- **floor**: the same model with no adapter and every weight frozen; the images require grad, so "
        "the backward runs through the whole backbone (input gradients only, no weight gradient, no "
        "optimizer step): the least a step that trains anything inside the backbone costs.",
        "- Overhead over floor = step time / floor step time − 1.",
        f"- Timing: {'; '.join(timing_methods) or '-'}. Memory: {'; '.join(memory_methods) or '-'}.",
    ]
    profile_methods = sorted({r.extra["profile"]["method"] for r in rows if "method" in r.extra.get("profile", {})})
    if profile_methods:
        lines.append(f"- Step breakdown: {'; '.join(profile_methods)}.")
    elif getattr(cfg, "profile_steps", None) == 0:
        lines.append("- Step breakdown: not profiled (`--no-profile`).")
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
    markers = {"fused": "o", "dense": "v", "reference": "s", "torch": "^", "peft": "D"}
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
