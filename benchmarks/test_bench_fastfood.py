"""Fastfood: kk.fastfood (compiled kernel, nothing stored) vs Triton vs the intrinsic-dimension
codes' reference (stored B/Pi/G) vs torch.zeros(D) (the write floor), and a subspace training
step of a ViT-B attention module.

One pytest-benchmark group per (d, D) (``fastfood-d16384-D86000000-fwd`` ...), measured exactly
as the Kronecker suite (``test_bench_kron.py``); ``extra_info`` carries the GB/s.
"""
import pytest

from benchmarks import common
from benchmarks.test_bench_kron import test_kron_ops as _measure

CASES = [
    pytest.param(case, variant, id=f"{case.group}-{variant}")
    for case in common.fastfood_cases()
    for variant in case.variants
]


@pytest.mark.parametrize("case, variant", CASES)
def test_fastfood(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance):
    _measure(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance)
