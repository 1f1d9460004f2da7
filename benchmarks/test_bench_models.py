"""Model-level training steps: every method of kk.METHODS (fused and reference) and the anchors
(full fine-tuning, linear probing, PEFT LoRA r=8, the floor) on a timm ViT.

One pytest-benchmark group per method and model (``kadaptation-vit_base_patch16_224-b64-img224-train step``),
built by :mod:`benchmarks.models` exactly as the report builds them. Each round is one full
step (forward, backward, AdamW). On CUDA each timed round synchronises, and the CUDA-event
median / p20 / p80 (ms) are in ``extra_info`` too; the memory split of one step is in
``extra_info["memory"]``. Options: ``--bench-model``, ``--bench-batch``, ``--bench-img``.
"""
import pytest
import torch

import kron_kernels as kk
from benchmarks import common, models

CASES = [
    pytest.param(name, variant, id=f"{name}-{variant}")
    for name in list(kk.METHODS) + list(models.ANCHORS)
    for variant in (models.IMPLS if name in kk.METHODS else (models.ANCHOR_VARIANT[name],))
]


@pytest.mark.parametrize("name, variant", CASES)
def test_model_step(benchmark, name, variant, bench_device, bench_model_options, bench_rounds, bench_provenance):
    (case,) = models.model_cases(bench_device, methods=[name], **bench_model_options)
    benchmark.group = case.group
    try:
        bench = models.build(case, variant, bench_device)
    except common.Unavailable as exc:
        pytest.skip(str(exc))
    info = benchmark.extra_info
    info.update(case=case.group, method=name, variant=variant, params=case.p, **bench.extra)
    info["trainable_params"] = bench.trainable_params
    info["backend"] = common.variant_backend(variant, bench.step)  # one step: compiles, creates AdamW state
    if benchmark.disabled:  # --benchmark-disable: a smoke test, one more step
        benchmark.pedantic(bench.step, rounds=1, iterations=1)
        return
    models.warm(bench, bench_device)
    info["memory"] = models.memory_split(bench, bench_device)
    if bench_device.type == "cuda":
        timing = models.time_cuda_events(bench.step, reps=20, warmup=3)
        info.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                    timing_method=timing.method)
        info["images_per_s"] = bench.batch / (timing.median_ms * 1e-3)

        def synchronised():
            bench.step()
            torch.cuda.synchronize()

        benchmark.pedantic(synchronised, rounds=bench_rounds, warmup_rounds=1, iterations=1)
    else:
        benchmark.pedantic(bench.step, rounds=bench_rounds, warmup_rounds=0, iterations=1)
        info["images_per_s"] = bench.batch / benchmark.stats.stats.median
    info["provenance"] = bench_provenance
