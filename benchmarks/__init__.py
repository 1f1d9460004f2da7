"""Benchmarks of kron_kernels: a pytest-benchmark suite and the ``make bench`` report.

* ``common.py``  -- the cases, the variants (fused / reference / floor / PEFT), timing, peak
  memory and provenance, shared by both entry points.
* ``models.py``  -- the model-level suite: a timm ViT training step per method of ``kk.METHODS``
  (fused / reference) and the anchors (full fine-tuning, linear probing, PEFT LoRA, the floor).
* ``test_bench_*.py`` -- ``pytest benchmarks/ --benchmark-only``: one table group per op and shape,
  and per method and model (``test_bench_models.py``).
* ``report.py`` -- ``python -m benchmarks.report``: Markdown, JSON and PNG under ``results/<device>/``.
"""
