"""Benchmarks of kron_kernels: a pytest-benchmark suite and the ``make bench`` report.

* ``common.py``  -- the cases, the variants (fused / reference / floor / PEFT), timing, peak
  memory and provenance, shared by both entry points.
* ``test_bench_kron.py`` -- ``pytest benchmarks/ --benchmark-only``: one table group per op and shape.
* ``report.py`` -- ``python -m benchmarks.report``: Markdown, JSON and PNG under ``results/<device>/``.
"""
