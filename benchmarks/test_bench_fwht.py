"""Walsh-Hadamard transform: kk.fwht (compiled extension) vs Triton vs the torch butterfly vs
torch.clone (the memcpy floor) vs Dao's fast_hadamard_transform where installed.

One pytest-benchmark group per row length and dtype (``fwht-n4096-float32-fwd`` ...), measured
exactly as the Kronecker suite (``test_bench_kron.py``); ``extra_info`` carries the GB/s. By
default the target rows n = 2^10 ... 2^13 run; ``--bench-full`` adds 2^8, 2^9, 2^14, 2^15 and
``--bench-cases`` picks any (benchmarks/conftest.py).
"""
import pytest

from benchmarks import common
from benchmarks.test_bench_kron import test_kron_ops as _measure

DEFAULT = {case.group for case in common.fwht_cases()}
CASES = [
    pytest.param(case, variant, id=f"{case.group}-{variant}",
                 marks=() if case.group in DEFAULT else pytest.mark.bench_full)
    for case in common.fwht_cases(full=True)
    for variant in case.variants
]


@pytest.mark.parametrize("case, variant", CASES)
def test_fwht(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance):
    _measure(benchmark, case, variant, bench_device, bench_tokens, bench_rounds, bench_provenance)
