"""Fastfood: kk.fastfood (compiled kernel, nothing stored) vs Triton vs the intrinsic-dimension
codes' reference (stored B/Pi/G) vs torch.zeros(D) (the write floor), and a subspace training
step of a ViT-B attention module.

One pytest-benchmark group per (d, D) (``fastfood-d16384-D86000000-fwd`` ...), measured exactly
as the Kronecker suite (``test_bench_kron.py``); ``extra_info`` carries the GB/s. On GPU the
default is the target row (d = 2^14, D = 86e6) and the subspace step; ``--bench-full`` adds every
other (d, D) and ``--bench-cases`` picks any (benchmarks/conftest.py).
"""
import pytest

from benchmarks import common
from benchmarks.test_bench_kron import test_kron_ops as _measure

DEFAULT = {case.group for case in common.fastfood_cases()}
CASES = [
    pytest.param(case, variant, id=f"{case.group}-{variant}",
                 marks=() if case.group in DEFAULT else pytest.mark.bench_full)
    for case in common.fastfood_cases(full=True)
    for variant in case.variants
]


@pytest.mark.parametrize("case, variant", CASES)
def test_fastfood(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance):
    _measure(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance)
