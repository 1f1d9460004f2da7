"""``KRON_KERNELS_FAILURE_LOG`` (tests/conftest.py, used by benchmarks/gpu_session.sh): each failure's
report is appended to the file as it happens -- once, also under pytest-xdist, whose controller
replays every worker's report -- so a GPU call killed at its time limit still leaves the reasons."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("xdist", [pytest.param(["-n", "2"], id="xdist"), pytest.param(["-p", "no:xdist"], id="plain")])
def test_each_failure_logged_once_as_it_happens(tmp_path, xdist):
    planted = tmp_path / "test_planted.py"
    planted.write_text("def test_planted_failure():\n    assert 1 == 2, 'planted'\n\n\ndef test_passes():\n    pass\n")
    log = tmp_path / "failures.log"
    # the suite's conftest loaded as a plugin (-p conftest, tests/ on the path) for a file outside it
    env = {**os.environ, "KRON_KERNELS_FAILURE_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir", str(tmp_path),
         *xdist, str(planted)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = log.read_text()
    assert text.count("==== ") == 1 and "test_planted_failure (call)" in text and "planted" in text
