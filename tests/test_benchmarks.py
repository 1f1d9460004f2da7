"""The benchmark report and suite still run (a smoke test: tiny sizes, few repeats).

The numbers of this run mean nothing; it guards the code path of `make bench` and of
`pytest benchmarks/ --benchmark-only` against rot, on the CPU that CI has.
"""
import json
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


@pytest.mark.slow
def test_pytest_benchmark_suite_collects_and_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-q", "--benchmark-disable", "--bench-tokens", "8",
         "-k", "d768-n32-r1", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
