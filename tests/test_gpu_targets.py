"""Every Triton kernel configuration the launchers can choose compiles for sm_75, sm_80 and
sm_90, without a GPU (``kron_kernels.triton.targets``).

The interpreter the CPU tests run under accepts kernels no GPU compiles (the H200 run of
commit 349dfe8 failed on a ``tl.dot`` with K = 8). Here the launchers run on fake CUDA tensors
for each target's SM count and shared memory, every launch they make is recorded and compiled
through ptxas for that target -- with the installed Triton for every target, and with every
Triton in ``$KRON_KERNELS_EXTRA_TRITON`` (``make test`` puts Triton 3.6, the GPU machine's,
there) for the GPU machine's sm_90.
The compiles run in a subprocess: this process interprets its kernels (``TRITON_INTERPRET=1``).
"""
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# one xdist worker should run them all (--dist loadgroup); the reports are shared through a
# file lock either way (see reports)
pytestmark = pytest.mark.xdist_group("gpu_targets")

REPO = Path(__file__).resolve().parents[1]
ARCHS = (75, 80, 90)
EXTRA_ENV = "KRON_KERNELS_EXTRA_TRITON"


def _tritons():
    """(id, site-packages dir to put first on sys.path or None for the installed Triton)."""
    found = [("installed", None)]
    for path in filter(None, os.environ.get(EXTRA_ENV, "").split(os.pathsep)):
        versions = sorted(p.name[len("triton-"):-len(".dist-info")] for p in Path(path).glob("triton-*.dist-info"))
        found.append((f"triton-{versions[0] if versions else 'missing'}", path))
    return found


TRITONS = _tritons()
# The installed Triton compiles for every target; an extra Triton (make test: 3.6, the GPU
# machine's) for the GPU machine's H100/H200 alone -- all three would double the check's cold
# compile time (some 1,400 configurations per target list, minutes on 2 cores).
EXTRA_ARCHS = (90,)


def _archs(triton_id):
    return ARCHS if triton_id == "installed" else EXTRA_ARCHS


TRITON_ARCHS = [(t, a) for t, _ in TRITONS for a in _archs(t)]


def _env(site):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(REPO)] + ([site] if site else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    return env


def _run(args, site, **kwargs):
    return subprocess.run([sys.executable, *args], env=_env(site), cwd=REPO, capture_output=True, text=True,
                          **kwargs)


@pytest.fixture(scope="session")
def reports(tmp_path_factory):
    """The compile report of each Triton, made once per test session on first use (minutes on
    2 cores). Under pytest-xdist every worker may ask for it (``--dist loadgroup`` does not keep
    the ``xdist_group`` together with every pytest / xdist pair: it split this module's tests over
    both workers, which then compiled everything twice), so the workers share one report per
    Triton in the session's common temporary folder: the first takes a file lock and writes it,
    the others wait on the lock and read it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-of-<user>/pytest-<n>: one per session, common to the workers
    cache = {}

    def get(triton_id):
        if triton_id not in cache:
            site = dict(TRITONS)[triton_id]
            if site is not None and not Path(site, "triton").is_dir():
                pytest.fail(f"{EXTRA_ENV} names {site}, which holds no triton package")
            out = shared / f"gpu-targets-{triton_id}.json"
            with open(shared / f"gpu-targets-{triton_id}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                if not out.exists():
                    partial = out.with_suffix(".partial")
                    archs = [str(a) for a in _archs(triton_id)]
                    proc = _run(["-m", "kron_kernels.triton.targets", "--quiet", "--arch", *archs,
                                 "--json", str(partial)], site)
                    if not partial.exists():
                        pytest.fail(f"the compile check did not finish (exit {proc.returncode}):\n"
                                    f"{proc.stdout}\n{proc.stderr}")
                    partial.replace(out)
            cache[triton_id] = json.loads(out.read_text())
        return cache[triton_id]

    return get


@pytest.mark.parametrize("triton_id, arch", TRITON_ARCHS, ids=[f"{t}-sm_{a}" for t, a in TRITON_ARCHS])
def test_every_launch_compiles(reports, triton_id, arch):
    report = reports(triton_id)
    launches = report["targets"][str(arch)]["launches"]
    failures = [e for e in launches if not e["ok"]]
    assert not failures, f"Triton {report['triton']}, sm_{arch}: {len(failures)} of {len(launches)} failed:\n" + "\n".join(
        f"- {e['kernel']} ({e['workload']}): {e['config']}\n    {e['error'].strip().splitlines()[-1]}" for e in failures
    )


@pytest.mark.parametrize("triton_id", [t for t, _ in TRITONS])
def test_every_kernel_has_a_compiled_configuration(reports, triton_id):
    """A kernel no workload launches would escape the check: every launched kernel (a jit
    function no other jit function calls) must have at least one configuration per target."""
    report = reports(triton_id)
    kernels = {name.split(".")[-1] for name in report["kernels"]}
    # the package's kernels at the time of writing, at least (13 until the Compacter adapter's two were
    # folded into the bottleneck family's)
    assert len(kernels) >= 11, report["kernels"]
    for arch in _archs(triton_id):
        covered = {e["kernel"] for e in report["targets"][str(arch)]["launches"]}
        assert kernels <= covered, f"sm_{arch}: no configuration of {sorted(kernels - covered)}"


def test_extra_triton_is_3_6_when_make_test_runs():
    """``make test`` checks the GPU machine's Triton (3.6) besides the installed one."""
    if not os.environ.get(EXTRA_ENV):
        pytest.skip(f"{EXTRA_ENV} not set (make test sets it)")
    assert any(tid.startswith("triton-3.6.") for tid, _ in TRITONS[1:]), TRITONS


PLANTED = '''
import torch
import triton
import triton.language as tl

from kron_kernels.triton import targets


@triton.jit
def planted_kernel(x_ptr, y_ptr, BLOCK_N: tl.constexpr):
    """x: (BLOCK_N, 16) fp16; y = x^T x: a dot that reduces over BLOCK_N rows."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 16)
    x = tl.load(x_ptr + offs_n[:, None] * 16 + offs_k[None, :])
    y = tl.dot(tl.trans(x), x)
    tl.store(y_ptr + offs_k[:, None] * 16 + offs_k[None, :], y)


def launcher(x):
    y = torch.empty(16, 16, device=x.device, dtype=torch.float32)
    planted_kernel[(1,)](x, y, BLOCK_N=x.shape[0], num_warps=4)
    return y


with targets.record_launches(targets.TARGETS[90]) as recording:
    for rows in (8, 16):
        launcher(torch.empty(rows, 16, device="cuda", dtype=torch.float16))
for launch in recording.launches:
    try:
        targets.compile_launch(launch, 90)
        print("ok", launch.config())
    except Exception as exc:
        print("FAIL", launch.config(), "|", str(exc).strip().splitlines()[-1])
'''


@pytest.mark.parametrize("triton_id", [t for t, _ in TRITONS])
def test_check_rejects_a_dot_with_k_below_16(tmp_path, triton_id):
    """The check itself can fail: a planted kernel whose dot reduces over 8 rows is recorded
    with the configuration its launcher chose and rejected by the sm_90 compile, while the
    same kernel at 16 rows compiles."""
    script = tmp_path / "planted.py"
    script.write_text(textwrap.dedent(PLANTED))
    proc = _run([str(script)], dict(TRITONS)[triton_id])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith("FAIL") and "BLOCK_N=8" in lines[0] and "K >= 16" in lines[0], lines[0]
    assert lines[1].startswith("ok") and "BLOCK_N=16" in lines[1], lines[1]


def test_interpreter_refused():
    """Interpreted kernels cannot be compiled: the command says so instead of failing obscurely."""
    env = _env(None)
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "kron_kernels.triton.targets", "--arch", "90"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET" in proc.stderr
