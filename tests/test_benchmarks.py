"""The benchmark report and suite still run (a smoke test: tiny sizes, few repeats).

The numbers of this run mean nothing; it guards the code path of `make bench` and of
`pytest benchmarks/ --benchmark-only` against rot, on the CPU that CI has.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_report_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--quick", "--tokens", "20", "--reps", "1",
         "--cases", "d768", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path
    assert {p.name for p in folder.iterdir()} >= {"kron_ops.md", "kron_ops.json", "kron_ops.png"}
    data = json.loads((folder / "kron_ops.json").read_text())
    assert data["provenance"]["torch"] and data["provenance"]["git_commit"]
    variants = {row["variant"] for row in data["rows"]}
    assert {"fused", "reference", "floor"} <= variants
    blocks = [row for row in json.loads((folder / "bottleneck.json").read_text())["rows"] if row["op"] == "vit_block"]
    assert {(row["params"]["method"], row["variant"]) for row in blocks} == {
        (m, v) for m in ("fact_tt", "fact_tk", "arc") for v in ("fused", "reference", "floor")}
    assert all(row["status"] == "ok" and row["median_ms"] > 0 for row in blocks), blocks


@pytest.mark.slow
def test_report_fastfood_suite_quick(tmp_path):
    """The fastfood suite at its quick size: every variant runs or says why not (Triton needs
    CUDA), the bandwidth rows carry GB/s, and the GPU target reads n/a on CPU."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--suite", "fastfood", "--quick", "--tokens", "20", "--reps", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    data = json.loads((folder / "fastfood.json").read_text())
    rows = {(row["op"], row["variant"]): row for row in data["rows"]}
    assert set(rows) == {("fastfood", v) for v in ("fused", "fused_v2", "triton", "reference", "floor")} | {
        ("subspace_attn", v) for v in ("fused", "reference", "floor")}
    cuda = torch_cuda()
    triton_runs = cuda or os.environ.get("TRITON_INTERPRET") == "1"  # the subprocess inherits the interpreter
    for (op, variant), row in rows.items():
        if variant == "triton" and not triton_runs:
            assert row["status"] == "skipped" and "Triton" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0
        if op == "fastfood":
            assert row["gbps"] > 0
    if not cuda:
        assert [(t["case"], t["status"]) for t in data["targets"]] == [
            ("fastfood-d16384-D86000000-fwd", "n/a: GPU target, this run is on CPU"),
            ("subspace_attn-d16384", "n/a: GPU target, this run is on CPU")]
        # the roofline model has no peak rates for a CPU: it says so, and prints no number
        assert data["roofline"] == {"status": f"unknown device: no roofline ({data['provenance']['device']})"}
        text = (folder / "fastfood.md").read_text()
        assert "## Roofline of the CUDA kernel (a model: derived, not measured)\n\nunknown device: no roofline" in text


@pytest.mark.slow
def test_pytest_benchmark_suite_collects_and_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-q", "--benchmark-disable", "--bench-tokens", "8",
         "-k", "d768-n32-r1", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_report_models_suite_tiny(tmp_path):
    """The models suite end to end at a tiny size: every method of kk.METHODS fused and reference,
    the anchors, the memory split, the per-row torch.profiler breakdown, the targets (n/a on CPU),
    the plots, and --memory-snapshot's message on CPU."""
    import kron_kernels as kk
    from benchmarks import models

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--suite", "models", "--model", "vit_tiny_patch16_224",
         "--img", "32", "--depth", "2", "--batch", "2", "--reps", "1", "--profile-steps", "1",
         "--memory-snapshot", "floor", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path
    assert {p.name for p in folder.iterdir()} == {"models.md", "models.json", "models.png", "models_params.png"}
    if not torch_cuda():
        assert "snapshots need a CUDA device" in proc.stderr
    data = json.loads((folder / "models.json").read_text())
    assert data["provenance"]["torch"] and data["provenance"]["git_commit"]
    rows = {(r["op"], r["variant"]): r for r in data["rows"]}
    expected = {(m, impl) for m in kk.METHODS for impl in ("fused", "reference")}
    expected |= {("full_finetune", "torch"), ("linear_probe", "torch"), ("peft_lora", "peft"), ("floor", "torch")}
    assert set(rows) == expected
    ok = {key: r for key, r in rows.items() if r["status"] == "ok"}
    assert set(rows) - set(ok) <= {("peft_lora", "peft")}  # skipped only where peft is missing
    for (op, variant), r in ok.items():
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], (op, variant)
        assert r["extra"]["images_per_s"] > 0
        mem = r["extra"]["memory"]
        assert mem["parameters"] > 0 and mem["step_peak"] >= mem["parameters"] + mem["optimizer_state"]
    total = ok[("full_finetune", "torch")]["extra"]["trainable_params"]
    assert ok[("floor", "torch")]["extra"]["trainable_params"] == 0
    assert ok[("floor", "torch")]["extra"]["memory"]["optimizer_state"] == 0
    for m in kk.METHODS:
        fused, ref = ok[(m, "fused")], ok[(m, "reference")]
        assert 0 < fused["extra"]["trainable_params"] == ref["extra"]["trainable_params"] < total
        assert fused["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / fused["median_ms"])
        # AdamW: two fp32 moments per trainable element (+ a 4-byte step count per tensor)
        state, n = fused["extra"]["memory"]["optimizer_state"], fused["extra"]["trainable_params"]
        assert 8 * n <= state <= 8 * n + 4 * 1024
    targets = data["targets"]
    assert sum(t["goal"].startswith("fused step >= 1.3x") for t in targets) == len(kk.METHODS)
    gpu_targets = [t for t in targets if not t["goal"].startswith("any device")]
    assert all(t["status"].startswith("n/a: GPU target") for t in gpu_targets if not torch_cuda())
    # issue 3's LoSA claim is checked on every device: met or not met, never n/a
    anywhere = [t for t in targets if t["goal"].startswith("any device")]
    assert len(anywhere) == 4 and all(t["status"] in ("met", "not met") for t in anywhere), anywhere
    text = (folder / "models.md").read_text()
    assert "## Memory of one step" in text and "## Targets" in text
    assert text in proc.stdout
    # where each row's step time goes: kernels on CUDA, CPU ops (so labelled) on CPU
    kind = models.CUDA_KERNELS if torch_cuda() else models.CPU_OPS
    assert "## Where a step's time goes (torch.profiler)" in text
    assert models.PROFILE_LABEL[kind] in text
    for (op, variant), r in ok.items():
        prof = r["extra"]["profile"]
        assert prof["kind"] == kind and prof["steps"] == 1, (op, variant, prof)
        top, total = prof["top"], prof["total"]
        assert 0 < len(top) <= models.PROFILE_TOP
        assert all(e["ms_per_step"] > 0 and e["calls_per_step"] > 0 and e["name"] for e in top), top
        assert [e["ms_per_step"] for e in top] == sorted((e["ms_per_step"] for e in top), reverse=True)
        assert total["ms_per_step"] == pytest.approx(sum(e["ms_per_step"] for e in top) + prof["other"]["ms_per_step"])
        assert total["calls_per_step"] == sum(e["calls_per_step"] for e in top) + prof["other"]["calls_per_step"]
        assert total["entries"] == len(top) + prof["other"]["entries"]
        assert prof["profiled_step_ms"] > 0
    for m in kk.METHODS:  # each fused row's section in the Markdown starts with its top entry
        first = ok[(m, "fused")]["extra"]["profile"]["top"][0]
        cells = f"| `{m}` | fused | `{models._kernel_name(first['name'])}` | {models._num(first['ms_per_step'])} |"
        assert cells in text, cells
    assert text.count("| **total** (") == len(ok)


def torch_cuda():
    import torch

    return torch.cuda.is_available()


def _rows(ms, peak, methods):
    from benchmarks.common import Row

    rows = []
    for (op, variant), (t, m) in zip(methods, zip(ms, peak)):
        rows.append(Row(suite="models", case=op, op=op, shape="s", mode="train step", variant=variant,
                        params={"model": "vit_base_patch16_224", "batch": 64, "img": 224}, device="cuda",
                        dtype="bf16", tokens=1, median_ms=t, p20_ms=t, p80_ms=t, peak_extra_bytes=m))
    return rows


def test_model_targets_checked_against_the_rows(monkeypatch):
    """On the GPU configuration the targets say met / not met from the measured ratios."""
    import types

    import torch

    import kron_kernels as kk
    from benchmarks import models

    monkeypatch.setattr(kk, "METHODS", ("kadaptation", "losa"))
    keys = [("kadaptation", "fused"), ("kadaptation", "reference"), ("losa", "fused"), ("losa", "reference"),
            ("peft_lora", "peft"), ("floor", "torch")]
    # kadaptation: 1.5x faster than its reference, more memory; 100 vs LoRA 110; +25% over the floor 80
    # losa: 1.2x faster than reference; 2.2x LoRA's speed, less memory than LoRA
    rows = _rows([100, 150, 50, 60, 110, 80], [10, 9, 5, 6, 8, 4], keys)
    cfg = types.SimpleNamespace(device=torch.device("cuda"))
    status = {(t.goal, t.case): t.status for t in models.targets(rows, cfg)}
    assert status == {
        ("fused step >= 1.3x faster than its reference", "kadaptation"): "met",
        ("fused step peak memory <= its reference's", "kadaptation"): "not met",
        ("fused step >= 1.3x faster than its reference", "losa"): "not met",
        ("fused step peak memory <= its reference's", "losa"): "met",
        ("fused step no slower than PEFT LoRA r=8", "kadaptation"): "met",
        ("fused step >= 2x faster than PEFT LoRA r=8", "losa"): "met",
        ("fused step peak memory < PEFT LoRA r=8's", "losa"): "met",
        ("fused step overhead <= 20% over the floor", "kadaptation"): "not met",
    }
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    assert all(t.status == "n/a: GPU target, this run is on CPU" for t in models.targets(rows, cpu))
    derived = models.derived(rows[0], rows)
    assert derived["speedup_vs_reference"] == pytest.approx(1.5)
    assert derived["memory_ratio_vs_reference"] == pytest.approx(10 / 9)
    assert derived["overhead_vs_floor"] == pytest.approx(0.25)


ELEMENTWISE = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >(int, float*)"


class _Kineto:
    """A raw Kineto event (``prof.profiler.kineto_results.events()``), times in µs."""

    def __init__(self, name, kind, start, end, annotation=False):
        import torch

        self._name, self._kind, self._ns = name, getattr(torch.autograd.DeviceType, kind), (start * 1000, end * 1000)
        self._annotation = annotation

    def name(self):
        return self._name

    def device_type(self):
        return self._kind

    def start_ns(self):
        return self._ns[0]

    def end_ns(self):
        return self._ns[1]

    def duration_ns(self):
        return self._ns[1] - self._ns[0]

    def is_user_annotation(self):
        return self._annotation

    def is_async(self):
        return False

    def start_thread_id(self):
        return 1

    end_thread_id = start_thread_id


def _kineto_trace():
    """Two steps: CPU ops nested as torch records them (an aten::mul_ redispatching to itself), the
    optimizer's record_function range, kernels, a memset, and the GPU-side copies of the ranges."""
    events = []
    for t in (0, 2500):
        events += [
            _Kineto(f"ProfilerStep#{t // 2500 + 1}", "CPU", t, t + 2500, annotation=True),
            _Kineto("aten::linear", "CPU", t + 100, t + 900),
            _Kineto("aten::addmm", "CPU", t + 200, t + 800),
            _Kineto("cudaLaunchKernel", "CPU", t + 300, t + 350),
            _Kineto("Optimizer.step#AdamW.step", "CPU", t + 1000, t + 2000, annotation=True),
            _Kineto("aten::mul_", "CPU", t + 1100, t + 1300),
            _Kineto("aten::mul_", "CPU", t + 1150, t + 1250),
            _Kineto("Memset (Device)", "CUDA", t + 50, t + 60),
            _Kineto("gemm", "CUDA", t + 400, t + 700),
            _Kineto(ELEMENTWISE, "CUDA", t + 1200, t + 1240),
            _Kineto(ELEMENTWISE, "CUDA", t + 1250, t + 1290),
            _Kineto(f"ProfilerStep#{t // 2500 + 1}", "CUDA", t, t + 2500, annotation=True),
            _Kineto("Optimizer.step#AdamW.step", "CUDA", t + 1000, t + 2000, annotation=True),
        ]
    return events


def _averages():
    """What ``key_averages()`` makes of the same trace (µs; torch < 2.4's ``self_cuda_time_total`` once)."""
    import types

    import torch

    def avg(key, kind, us, count, attr="self_device_time_total", annotation=False, total=0.0):
        return types.SimpleNamespace(**{
            "key": key, "device_type": getattr(torch.autograd.DeviceType, kind), "count": count,
            "is_user_annotation": annotation, "cpu_time_total": total,
            "self_cpu_time_total": us if kind == "CPU" else 0.0, attr: us if kind == "CUDA" else 0.0})

    return [
        avg("ProfilerStep*", "CPU", 0.0, 2, annotation=True, total=5000.0),
        avg("aten::linear", "CPU", 400.0, 2), avg("aten::addmm", "CPU", 1100.0, 2),
        avg("cudaLaunchKernel", "CPU", 100.0, 2), avg("Optimizer.step#AdamW.step", "CPU", 1600.0, 2, annotation=True),
        avg("aten::mul_", "CPU", 400.0, 2),
        avg("Memset (Device)", "CUDA", 20.0, 2), avg("gemm", "CUDA", 600.0, 2),
        avg(ELEMENTWISE, "CUDA", 160.0, 4, attr="self_cuda_time_total"),
        avg("ProfilerStep*", "CUDA", 5000.0, 2, annotation=True),
        avg("Optimizer.step#AdamW.step", "CUDA", 2000.0, 2, annotation=True),
    ]


def _rounded(value):
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def test_profile_summary_of_cuda_kernels_and_cpu_ops():
    """The breakdown per step, read from the raw Kineto events and from key_averages() alike: CUDA
    kernels by device time (the GPU-side copies of record_function ranges left out); CPU ops by self
    CPU time (ProfilerStep# left out: its span is the recorded step's wall time)."""
    from benchmarks import models

    for kind in (models.CUDA_KERNELS, models.CPU_OPS):
        fast = models.summarise_profile(*models._entries_from_kineto(_kineto_trace(), kind), steps=2, kind=kind, top=2)
        slow = models.summarise_profile(*models._entries_from_averages(_averages(), kind), steps=2, kind=kind, top=2)
        assert _rounded(fast) == _rounded(slow), kind
    cuda = models.summarise_profile(
        *models._entries_from_kineto(_kineto_trace(), models.CUDA_KERNELS), steps=2, kind=models.CUDA_KERNELS, top=2)
    assert [(e["name"], e["ms_per_step"], e["calls_per_step"]) for e in cuda["top"]] == [
        ("gemm", pytest.approx(0.3), 1), (ELEMENTWISE, pytest.approx(0.08), 2)]
    assert cuda["top"][0]["share"] == pytest.approx(0.3 / 0.39)
    assert cuda["other"] == {"entries": 1, "ms_per_step": pytest.approx(0.01), "calls_per_step": 1}
    assert cuda["total"] == {"entries": 3, "ms_per_step": pytest.approx(0.39), "calls_per_step": 4}
    assert cuda["profiled_step_ms"] == pytest.approx(2.5)
    cpu = models.summarise_profile(*models._entries_from_kineto(_kineto_trace(), models.CPU_OPS), steps=2,
                                   kind=models.CPU_OPS)
    assert [(e["name"], e["ms_per_step"], e["calls_per_step"]) for e in cpu["top"]] == [
        ("Optimizer.step#AdamW.step", pytest.approx(0.8), 1), ("aten::addmm", pytest.approx(0.55), 1),
        ("aten::linear", pytest.approx(0.2), 1), ("aten::mul_", pytest.approx(0.2), 1),  # the redispatch folded
        ("cudaLaunchKernel", pytest.approx(0.05), 1)]
    assert cpu["other"]["entries"] == 0 and cpu["total"]["ms_per_step"] == pytest.approx(1.8)


def test_profile_kineto_reading_matches_key_averages():
    """On this torch, the fast reading of a real CPU profile gives key_averages()' names, counts and
    self times (a guard against the profiler changing how it builds its tree)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import models

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 16)

    def step():
        F = torch.nn.functional
        F.cross_entropy(model(x).mul_(0.5), torch.arange(8) % 4).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU],
                 schedule=torch.profiler.schedule(wait=0, warmup=1, active=2, repeat=1)) as prof:
        for _ in range(3):
            step()
            prof.step()
    fast, fast_wall = models._entries_from_kineto(prof.profiler.kineto_results.events(), models.CPU_OPS)
    slow, slow_wall = models._entries_from_averages(prof.key_averages(), models.CPU_OPS)
    assert {name: count for name, _, count in fast} == {name: count for name, _, count in slow}
    assert {name: us for name, us, _ in fast} == pytest.approx({name: us for name, us, _ in slow}, abs=1e-3)
    assert fast_wall == pytest.approx(slow_wall) and fast_wall > 0


def test_kernel_names_fit_a_table_cell():
    from benchmarks import models

    name = ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>"
            "(int, float, c10::BFloat16 const*, float*, float*)")
    assert models._kernel_name(name) == "vectorized_layer_norm_kernel<BFloat16, float>"
    assert models._kernel_name("_kron_linear_fwd_kernel") == "_kron_linear_fwd_kernel"
    assert models._kernel_name("aten::mm") == "aten::mm"
    long = models._kernel_name("void " + "a" * 200 + "<x|y>(int)")
    assert len(long) == 80 and long.endswith("…") and "|" not in long.replace("\\|", "")


def test_models_no_profile_leaves_the_rows_unprofiled():
    """``--no-profile`` (profile_steps 0): the rows are measured as before, without a breakdown."""
    import types

    import torch

    from benchmarks import models, report

    args = report.parse_args(["--suite", "models", "--no-profile"])
    assert args.no_profile and args.profile_steps is None
    with pytest.raises(SystemExit):
        report.parse_args(["--no-profile", "--profile-steps", "2"])
    cpu = torch.device("cpu")
    (case,) = models.model_cases(cpu, model="vit_tiny_patch16_224", batch=1, img=32, depth=1, methods=["floor"])
    cfg = types.SimpleNamespace(device=cpu, quick=True, model_reps=1, profile_steps=0, memory_snapshot=None,
                                folder=None)
    (row,) = models.measure_case("models", case, cfg)
    assert row.status == "ok" and row.median_ms > 0, row
    assert "profile" not in row.extra
    assert models.profile_lines([row], cfg) == []


# ------------------------------------------------------------------ Fastfood roofline (a model)
def _roofline_ops(Lb, rounds=6, generator=1):
    """The per-element counts of docs/fastfood_roofline.md, written from its formulas (generator 2:
    B 3 + 11/8 int32 instead of 10; the Box-Muller parts but the product halved, the sincos 2 fp32
    more per element than the cosf: int32 -21 (G) - 5.625 (B), fp32 -15.5, xu -3)."""
    n = Lb.bit_length() - 1
    h = n // 2
    v2 = generator == 2
    return {
        "int32": 52 + 1 + 7 * rounds + 18 * rounds * 2 ** (n - h) / Lb - (21 + 10 - 3 - 11 / 8 if v2 else 0),
        "fp32": 40 + 2 * n - (15.5 if v2 else 0),
        "xu": 3 if v2 else 6,
        "shfl": 2 * min(5, n - 3),
        # the exchange (Lb >= 2^9): 4 conflict-free scalar accesses per element in each transform
        "shared_wavefronts": (2 * rounds + 3.53) / 32 + 1 / 16 + 2 * (4 / 32) + rounds * 2 ** (n - h) / Lb / 32,
    }


@pytest.mark.parametrize("generator", [1, 2])
@pytest.mark.parametrize("Lb, rounds", [(2**14, 6), (2**10, 6), (2**15, 6), (2**12, 4)])
def test_fastfood_op_counts_follow_the_formula(Lb, rounds, generator):
    from benchmarks import common

    ops = common.fastfood_ops_per_element(Lb, rounds, generator)
    want = _roofline_ops(Lb, rounds, generator)
    for unit, count in want.items():
        assert ops.total(unit) == pytest.approx(count), unit
    assert ops.transform_adds == 2 * (Lb.bit_length() - 1)
    per = 1 if generator == 1 else 0.5  # one Box-Muller evaluation per element, or per pair
    assert ops.TRANSCENDENTALS == {"log": per, "cos": per, "sqrt": per}
    assert ops.issued == pytest.approx(sum(ops.total(u) for u in ("int32", "fp32", "xu", "shfl", "shared", "global")))
    if Lb == 2**14 and generator == 1:  # the numbers docs/fastfood_roofline.md quotes
        assert (round(ops.total("int32"), 1), ops.total("fp32"), round(ops.issued)) == (95.8, 68, 196)
    if Lb == 2**14 and generator == 2:
        assert (round(ops.total("int32"), 1), ops.total("fp32"), round(ops.issued)) == (69.2, 52.5, 151)
    assert common.fastfood_ops_per_element(Lb).pi_rounds == 6  # the generator's PI_ROUNDS by default
    assert common.fastfood_ops_per_element(Lb).generator == 1  # the default generator
    with pytest.raises(ValueError, match="power of two"):
        common.fastfood_ops_per_element(Lb + 1)
    with pytest.raises(ValueError, match="generator must be one of"):
        common.fastfood_ops_per_element(Lb, rounds, 3)


def test_fastfood_roofline_of_the_target_case():
    """d = 2^14 into D = 86e6 on the H200 and the H100 SXM: each floor is elements x ops / (rate x
    SMs x clock), the write 4 D bytes at the peak HBM bandwidth; the arithmetic binds."""
    from benchmarks import common

    d, D = common.FASTFOOD_TARGET
    elements = 5250 * 2**14
    ops = _roofline_ops(2**14)
    clocks = 132 * 1.98e9  # SM-clocks per second
    for name, hbm in (("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12)):
        r = common.fastfood_roofline(name, d, D)
        assert r.elements == elements
        assert r.floors_ms["int32"] == pytest.approx(elements * ops["int32"] / (64 * clocks) * 1e3)
        assert r.floors_ms["fp32"] == pytest.approx(elements * ops["fp32"] / (128 * clocks) * 1e3)
        assert r.floors_ms["xu"] == pytest.approx(elements * 6 / (16 * clocks) * 1e3)
        assert r.floors_ms["shared_wavefronts"] == pytest.approx(elements * ops["shared_wavefronts"] / clocks * 1e3)
        assert r.floors_ms["issue"] == pytest.approx(elements * r.ops.issued / (128 * clocks) * 1e3)
        assert r.write_ms == pytest.approx(4 * D / hbm * 1e3)
        assert r.arithmetic_ms == max(r.floors_ms.values()) and r.binds == "arithmetic"
        assert r.to_dict()["model"].startswith("derived")
    h200 = common.fastfood_roofline("NVIDIA H200", d, D)
    assert (round(h200.arithmetic_ms, 3), h200.binding_unit) == (0.505, "issue")
    v2 = common.fastfood_roofline("NVIDIA H200", d, D, generator=2)  # docs/fastfood_roofline.md's v2 rows
    assert (round(v2.arithmetic_ms, 3), v2.binding_unit, v2.to_dict()["generator"]) == (0.389, "issue", 2)
    assert round(common.fastfood_roofline("NVIDIA H200", d, D, pi_rounds=4, generator=2).arithmetic_ms, 3) == 0.347
    assert v2.floors_ms["issue"] == pytest.approx(elements * v2.ops.issued / (128 * clocks) * 1e3)
    assert round(h200.write_ms, 4) == 0.0717
    pcie = common.fastfood_roofline("NVIDIA H100 PCIe", d, D)
    assert pcie.device.sms == 114 and pcie.write_ms == pytest.approx(4 * D / 2.0e12 * 1e3)


@pytest.mark.parametrize("name", [None, "", "Intel(R) Xeon(R) CPU @ 2.20GHz (2 cores)", "NVIDIA A100-SXM4-80GB",
                                  "NVIDIA GH200 480GB", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "Tesla T4"])
def test_fastfood_roofline_unknown_device(name):
    from benchmarks import common

    assert common.peak_rates(name) is None
    assert common.fastfood_roofline(name, 2**14, 86_000_000) is None


def _fastfood_rows(device):
    from benchmarks.common import Row

    case = "fastfood-d16384-D86000000-fwd"
    return [Row(suite="fastfood", case=case, op="fastfood", shape="d16384-D86000000", mode="fwd", variant=v,
                params={"d": 2**14, "D": 86_000_000}, device=device, dtype="float32", tokens=1, median_ms=t,
                p20_ms=t, p80_ms=t, peak_extra_bytes=4 * 86_000_000, bytes_moved=4 * 86_000_000,
                gbps=4 * 86_000_000 / (t * 1e-3) / 1e9)
            for v, t in (("fused", 1.49), ("floor", 0.0772))]


def test_fastfood_report_prints_the_roofline_beside_the_write_floor():
    """The fastfood report's roofline section: labelled a model, the measured torch.zeros(D) and
    fused times beside it; on any other device (the CPU) 'unknown device: no roofline'."""
    import types

    import torch

    from benchmarks import common, report

    suite = report.SUITES["fastfood"]
    cfg = types.SimpleNamespace(device=torch.device("cuda"), tokens=1, quick=False, backend="auto")
    prov = {"device": "NVIDIA H200", "date_utc": "-", "git_commit": "0" * 12, "torch": "-", "triton": "-",
            "torch_cuda": "-", "timm": "-", "peft": "-", "cpu": "-", "torch_threads": 2}
    rows = _fastfood_rows("cuda")
    text = report.markdown(suite, rows, report.fastfood_targets(rows, cfg), cfg, prov)
    start = text.index("## Roofline of the CUDA kernel (a model: derived, not measured)")
    section = text[start:text.index("## Targets")]
    assert "**Model figures, not measurements.**" in section and "NVIDIA H200 SXM" in section
    line = next(l for l in section.splitlines() if l.startswith("| fastfood-d16384-D86000000-fwd"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "0.505 (instruction issue)"  # the model's arithmetic floor
    assert cells[4] == "0.0717"  # the model's write floor
    assert cells[5] == "0.0772" and cells[7] == "1.49"  # the measured torch.zeros(D) and fused times
    assert cells[6] == "6.54×" and cells[8] == "2.95×" and cells[9] == "arithmetic"
    data = report.fastfood_roofline_json(rows, prov)
    assert data["status"].startswith("model") and data["cases"][0]["arithmetic_ms"] == pytest.approx(0.505, abs=1e-3)

    cpu = dict(prov, device="Intel(R) Xeon(R) CPU (2 cores)")
    cpu_cfg = types.SimpleNamespace(device=torch.device("cpu"), tokens=1, quick=False, backend="auto")
    text = report.markdown(suite, _fastfood_rows("cpu"), [], cpu_cfg, cpu)
    assert f"{common.NO_ROOFLINE}: peak rates are tabulated for H100 PCIe, H100 SXM, H200" in text
    assert report.fastfood_roofline_json(rows, cpu)["status"].startswith(common.NO_ROOFLINE)


def _timed_rows(suite, times):
    from benchmarks.common import Row

    return [Row(suite=suite, case=case, op=case.split("-")[0], shape="s", mode="fwd", variant=variant, params={},
                device="cuda", dtype="-", tokens=1, median_ms=t, p20_ms=t, p80_ms=t, peak_extra_bytes=0, gbps=1 / t)
            for (case, variant), t in times.items()]


def test_issue12_targets_checked_against_the_rows():
    """fwht: fp16/bf16 <= 1.15x clone from n = 2^10, <= 1.3x below, fp32 <= 1.3x; fastfood: the
    forward <= 6x torch.zeros(D) and the subspace step <= 1.25x the frozen attention (GPU rows;
    n/a on the CPU)."""
    import types

    import torch

    from benchmarks import report

    cuda = types.SimpleNamespace(device=torch.device("cuda"), tokens=5, default_tokens=5)
    rows = _timed_rows("fwht", {
        ("fwht-n1024-bfloat16-fwd", "fused"): 1.2, ("fwht-n1024-bfloat16-fwd", "floor"): 1.0,  # 1.2x: not met
        ("fwht-n512-float16-fwd", "fused"): 1.2, ("fwht-n512-float16-fwd", "floor"): 1.0,  # 1.2x <= 1.3x: met
        ("fwht-n8192-float32-fwd", "fused"): 1.25, ("fwht-n8192-float32-fwd", "floor"): 1.0,  # met
        ("fwht-n4096-float16-fwd", "fused"): 1.1, ("fwht-n4096-float16-fwd", "floor"): 1.0,  # met
    })
    status = {t.case: (t.goal, t.status) for t in report.fwht_targets(rows, cuda)}
    assert status == {
        "fwht-n512-float16-fwd": ("GPU fp16/bf16: fwht time <= 1.3x torch.clone (n < 2^10, 16*2048 rows)", "met"),
        "fwht-n1024-bfloat16-fwd": (
            "GPU fp16/bf16: fwht time <= 1.15x torch.clone (2^10 <= n <= 2^13, 16*2048 rows)", "not met"),
        "fwht-n4096-float16-fwd": (
            "GPU fp16/bf16: fwht time <= 1.15x torch.clone (2^10 <= n <= 2^13, 16*2048 rows)", "met"),
        "fwht-n8192-float32-fwd": ("GPU fp32: fwht time <= 1.3x torch.clone (n <= 2^13, 16*2048 rows)", "met"),
    }
    case = "fastfood-d16384-D86000000-fwd"
    for fused_ms, want in ((1.49, "not met"), (0.45, "met")):
        rows = _timed_rows("fastfood", {
            (case, "fused"): fused_ms, (case, "floor"): 0.0772, (case, "reference"): 49.3,
            ("subspace_attn-d16384", "fused"): 1.64, ("subspace_attn-d16384", "floor"): 0.961})
        targets = {t.goal: t.status for t in report.fastfood_targets(rows, cuda)}
        assert targets["GPU: forward <= 6x the torch.zeros(D) write time"] == want
        assert targets["GPU: subspace step of a ViT-B attention <= 1.25x the frozen attention's"] == "not met"
    cpu = types.SimpleNamespace(device=torch.device("cpu"), tokens=5, default_tokens=5)
    assert {t.status for t in report.fastfood_targets(rows, cpu)} == {"n/a: GPU target, this run is on CPU"}


# ------------------------------------------------------------- case selection of the suites
FWHT_TARGET_ROWS = {f"fwht-n{2**k}-{dtype}-fwd" for k in range(10, 14) for dtype in ("float16", "bfloat16", "float32")}
FASTFOOD_GPU_DEFAULT = {"fastfood-d16384-D86000000-fwd", "subspace_attn-d16384"}


def test_default_transform_suites_are_the_target_rows_and_fit_three_minutes():
    """Issue 12: the default fwht and fastfood suites hold the target rows and, at the rate the
    H200 run measured, finish within 3 minutes; --full is the suite as it was (187 runs) plus
    the ``cuda`` variant of each fwht row (24: the extension's kernel beside auto's choice) and the
    ``fused_v2`` variant of each fastfood row (16: generator 2 beside the default)."""
    import torch

    from benchmarks import common

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing touches CUDA
    fwht, fastfood = common.fwht_cases(), common.fastfood_cases(device=cuda)
    assert {c.group for c in fwht} == FWHT_TARGET_ROWS
    assert {c.group for c in fastfood} == FASTFOOD_GPU_DEFAULT
    full = common.fwht_cases(full=True) + common.fastfood_cases(device=cuda, full=True)
    assert {c.group for c in fwht + fastfood} < {c.group for c in full}
    # + 16: the fused_v2 variant (generator 2) of each fastfood row, beside fused
    assert sum(len(c.variants) for c in full) == 187 + 24 + 16 and len(common.fwht_cases(full=True)) == 24
    assert all("fused_v2" in c.variants for c in full if c.op == "fastfood")
    assert common.estimated_gpu_seconds(fwht + fastfood) <= common.GPU_SUITE_BUDGET_S
    assert common.estimated_gpu_seconds(fwht + fastfood) == pytest.approx((67 + 13) * 70 / 43)
    # the CPU and quick lists are what they were
    assert common.fastfood_cases(device=cpu) == common.fastfood_cases(device=cpu, full=True)
    assert len(common.fastfood_cases(device=cpu)) == 3
    quick = common.fwht_cases(quick=True)
    assert [c.group for c in quick] == [c.group for c in common.fwht_cases(quick=True, full=True)]
    assert {c.group for c in common.fastfood_cases(quick=True, device=cuda)} == {
        "fastfood-d16384-D100000-fwd", "subspace_attn-d16384"}


def test_report_full_and_cases_options():
    """``--full`` runs the full fwht/fastfood lists into a ``-full`` folder; ``--cases`` picks from
    the full lists (a row outside the default is found); ``--quick`` keeps its own list."""
    from pathlib import Path

    import torch

    from benchmarks import common, report

    def run_config(argv, device="cuda"):
        args = report.parse_args(argv)
        dev = torch.device(device)
        cfg = report.RunConfig(device=dev, tokens=1, default_tokens=1, timing=common.TimingConfig(), quick=args.quick,
                               full=args.full, case_patterns=list(args.cases))
        return {name: [c.group for c in report.SUITES[name].case_list(cfg)] for name in ("fwht", "fastfood")}, cfg

    cases, _ = run_config(["--suite", "fwht", "fastfood"])
    assert set(cases["fwht"]) == FWHT_TARGET_ROWS and set(cases["fastfood"]) == FASTFOOD_GPU_DEFAULT
    cases, cfg = run_config(["--full"])
    assert len(cases["fwht"]) == 24 and len(cases["fastfood"]) == 17 and cfg.describe()["full"] is True
    cases, _ = run_config(["--cases", "fwht-n256-float16", "fastfood-d1024-D1000000-", "fwht-n1024-bfloat16"])
    assert cases == {"fwht": ["fwht-n256-float16-fwd", "fwht-n1024-bfloat16-fwd"],
                     "fastfood": ["fastfood-d1024-D1000000-fwd"]}
    cases, _ = run_config(["--quick", "--full"])
    assert cases["fwht"] == [c.group for c in common.fwht_cases(quick=True)]
    # results folders (labelled on the CPU: device_label would ask CUDA for the GPU's name)
    folders = {tuple(argv): report.results_folder(Path("r"), run_config(argv, "cpu")[1], False).name
               for argv in ([], ["--full"], ["--quick", "--full"], ["--cases", "fwht"])}
    assert folders == {(): "CPU", ("--full",): "CPU-full", ("--quick", "--full"): "CPU-quick",
                       ("--cases", "fwht"): "CPU-partial"}


def test_pytest_bench_case_selection():
    """--bench-cases patterns (comma-separated, repeatable) select from every case; without them
    the default cases run, and --bench-full adds the rest."""
    from benchmarks import common

    assert common.parse_case_patterns(["fwht-n1024,fastfood-d16384", " kron ", ",,"]) == [
        "fwht-n1024", "fastfood-d16384", "kron"]
    assert common.parse_case_patterns(None) == []
    select = common.bench_selected
    assert select("fwht-n1024-bfloat16-fwd", True, [], False)
    assert not select("fwht-n256-float16-fwd", False, [], False)
    assert select("fwht-n256-float16-fwd", False, [], True)
    assert select("fwht-n256-float16-fwd", False, ["n256"], False)  # patterns reach outside the default
    assert not select("fwht-n1024-bfloat16-fwd", True, ["n256"], False)


@pytest.mark.slow
def test_pytest_bench_options_collect():
    """``pytest benchmarks/ --co`` with the default suites, --bench-full and --bench-cases."""
    def collected(*options):
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "benchmarks/test_bench_fwht.py", "benchmarks/test_bench_fastfood.py",
             "benchmarks/test_bench_kron.py", "--co", "-q", "-p", "no:cacheprovider", *options],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        return {line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "::" in line}

    default = collected()
    fwht = {i for i in default if i.startswith("fwht-")}
    assert {i.rsplit("-", 1)[0] for i in fwht} == FWHT_TARGET_ROWS and len(fwht) == 72
    assert len(collected("--bench-full")) > len(default)
    chosen = collected("--bench-cases", "fwht-n256-float16,fastfood-d16384", "--bench-cases", "kron_linear-d768-n32-r1")
    from benchmarks import common

    fastfood = {c.group for c in common.fastfood_cases(full=True) if "fastfood-d16384" in c.group}
    assert {i.rsplit("-", 1)[0] for i in chosen} == {"fwht-n256-float16-fwd", "kron_linear-d768-n32-r1", *fastfood}


def test_step_launch_counter():
    """``python -m benchmarks.launches``: a step's launches, the floor's fewest; the KAdaptation
    step under its dense composition launches fewer than PEFT LoRA's (the README's table)."""
    from benchmarks import launches

    counts = {row: launches.count(row) for row in ("floor", "lora", "kadaptation:fused")}
    assert 0 < counts["floor"] < counts["kadaptation:fused"] < counts["lora"], counts
    assert launches.table(["floor", "losa:fused"]).splitlines()[3].startswith("| `losa:fused` |")


# ----------------------------------------------------------------------------------------
# choices: which implementation won each case (the evidence behind auto's CUDA tables)
# ----------------------------------------------------------------------------------------
def _timed(case, variant, ms, spread=0.02, backend="", suite="bottleneck", status="ok"):
    return {"suite": suite, "case": case, "variant": variant, "status": status, "backend": backend,
            "median_ms": ms, "p20_ms": ms * (1 - spread), "p80_ms": ms * (1 + spread)}


def test_choices_name_the_winner_and_whether_auto_took_it():
    from benchmarks import choices

    rows = [
        # auto (Triton) slower than the dense composition, clearly: switch
        _timed("fact_linear-a", "fused", 0.45, backend="fact_linear:triton"), _timed("fact_linear-a", "cublas", 0.20),
        _timed("fact_linear-a", "reference", 0.10),  # the reference is no implementation to choose
        # auto fastest
        _timed("arc-b", "fused", 1.0, backend="arc:dense"), _timed("arc-b", "triton", 3.0),
        # faster by 3%: within the margin
        _timed("losa-c", "fused", 1.03, backend="losa_mixer:dense"), _timed("losa-c", "triton", 1.0),
        # faster by 10% but the p20-p80 ranges overlap
        _timed("adapter-d", "fused", 1.10, spread=0.1), _timed("adapter-d", "triton", 1.0, spread=0.1),
        # the alternative is what auto took (timed twice)
        _timed("fwht-g", "fused", 0.281, backend="fwht:triton", suite="fwht"), _timed("fwht-g", "triton", 0.279, suite="fwht"),
        # an alternative that failed, and a case without auto's row: nothing to say
        _timed("fwht-e", "fused", 1.0), _timed("fwht-e", "cuda", 0.5, status="error"),
        _timed("fwht-f", "triton", 1.0), _timed("fwht-f", "cuda", 0.5),
    ]
    found = {c.case: c for c in choices.choices(rows)}
    assert set(found) == {"fact_linear-a", "arc-b", "losa-c", "adapter-d", "fwht-g"}
    assert found["fwht-g"].verdict == "auto took it (triton)"
    assert found["fact_linear-a"].verdict == "auto should take dense: 2.25x faster"
    assert found["fact_linear-a"].auto_backend == "fact_linear:triton"
    assert found["arc-b"].verdict == "auto fastest" and found["arc-b"].ratio == 1.0
    assert found["losa-c"].verdict.startswith("keep") and found["adapter-d"].overlap
    assert found["adapter-d"].verdict.startswith("keep")
    text = choices.choices_markdown(rows, {"device": "NVIDIA H100", "git_commit": "abc", "date_utc": "today"})
    assert "NVIDIA H100" in text and "5 cases with an alternative; 1 where auto should switch." in text
    assert "| bottleneck | fact_linear-a | fact_linear:triton | 0.45 | dense | 0.2 | 2.25x |" in text


def test_choices_command_reads_a_results_folder(tmp_path, capsys):
    from benchmarks import choices

    payload = {"provenance": {"device": "NVIDIA H200"},
               "rows": [_timed("fwht-n1024", "fused", 0.05, backend="fwht:triton", suite="fwht"),
                        _timed("fwht-n1024", "cuda", 0.16, suite="fwht")]}
    (tmp_path / "fwht.json").write_text(json.dumps(payload))
    assert choices.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fwht | fwht-n1024 | fwht:triton |" in out and "auto fastest" in out
    # a folder may hold an older commit's suite: the report reads only its own commit's
    stale = {"provenance": {"git_commit": "old"}, "rows": [_timed("arc-x", "fused", 1.0), _timed("arc-x", "triton", 0.1)]}
    (tmp_path / "bottleneck.json").write_text(json.dumps(stale))
    payload["provenance"]["git_commit"] = "new"
    (tmp_path / "fwht.json").write_text(json.dumps(payload))
    rows, prov = choices.load([tmp_path], "new")
    assert {r["case"] for r in rows} == {"fwht-n1024"} and prov["git_commit"] == "new"
    assert {r["case"] for r in choices.load([tmp_path])[0]} == {"fwht-n1024", "arc-x"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no JSON results"):
        choices.main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="no such file or folder"):
        choices.main([str(tmp_path / "absent")])
