"""The low-rank bottleneck ops (FacT increments, ARC, LoSA mixers): fused vs reference vs floor.

One pytest-benchmark group per op and shape (``arc-d768-r50``, ``losa_token-d768-r64-fwd`` ...),
one benchmark per variant in it, measured exactly as the Kronecker suite measures its cases.
"""
import pytest

from benchmarks import common
from benchmarks.test_bench_kron import test_kron_ops as _run_case

CASES = [
    pytest.param(case, variant, id=f"{case.group}-{variant}")
    for case in common.bottleneck_cases()
    for variant in case.variants
]


@pytest.mark.parametrize("case, variant", CASES)
def test_bottleneck_ops(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance):
    _run_case(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance)
