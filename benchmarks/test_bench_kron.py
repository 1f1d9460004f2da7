"""Kronecker ops and the Compacter adapter: fused vs reference vs floor vs PEFT LoKr.

One pytest-benchmark group per op and shape (``kron_linear-d768-n32-r1`` ...), one
benchmark per variant in it. On CUDA each timed round synchronises, and the
``triton.testing.do_bench`` median / p20 / p80 (ms) are in ``extra_info`` as well; peak
extra memory of one step is in ``extra_info["peak_extra_bytes"]``.
"""
import pytest
import torch

from benchmarks import common

CASES = [
    pytest.param(case, variant, id=f"{case.group}-{variant}")
    for case in common.kron_ops_cases()
    for variant in case.variants
]


@pytest.mark.parametrize("case, variant", CASES)
def test_kron_ops(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance):
    benchmark.group = case.group
    try:
        bench = common.build(case, variant, bench_device, bench_tokens)
    except common.Unavailable as exc:
        pytest.skip(str(exc))
    info = benchmark.extra_info
    info.update(
        case=case.group,
        op=case.op,
        mode=case.mode,
        variant=variant,
        params=case.p,
        tokens=bench_tokens,
        dtype=str(common.activation_dtype(bench_device)).replace("torch.", ""),
        **bench.extra,
    )
    info["backend"] = common.variant_backend(variant, bench.fn)  # one call: compiles, warms up
    if benchmark.disabled:  # --benchmark-disable: a smoke test, one call
        benchmark.pedantic(bench.fn, rounds=1, iterations=1)
        return
    info["peak_extra_bytes"], info["memory_method"] = common.peak_memory(bench.fn, bench_device, warm=False)

    if bench_device.type == "cuda":
        timing = common.time_cuda(bench.fn)
        info.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                    timing_method=timing.method)
        median_s = timing.median_ms * 1e-3

        def synchronised():
            bench.fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synchronised, rounds=bench_rounds, warmup_rounds=2, iterations=1)
    else:
        benchmark.pedantic(bench.fn, rounds=bench_rounds, warmup_rounds=1, iterations=1)
        median_s = benchmark.stats.stats.median
    if bench.bytes_moved is not None:
        info["bytes_moved"] = bench.bytes_moved
        info["gbps"] = bench.bytes_moved / median_s / 1e9
    info["provenance"] = bench_provenance
