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
    assert set(rows) == {("fastfood", v) for v in ("fused", "triton", "reference", "floor")} | {
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
        assert [t["status"] for t in data["targets"]] == ["n/a: GPU target, this run is on CPU"]


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
