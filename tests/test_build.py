"""The JIT path of a source checkout: with the installed extension unimportable and
KRON_KERNELS_JIT=1, the first call that needs the extension compiles csrc/ through
torch.utils.cpp_extension.load (cached) and the op runs on it; without the variable nothing
is compiled and the error says how to get the extension."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_INSTALLED = """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "kron_kernels._C":
                raise ImportError("blocked: a source checkout without a build")
    sys.meta_path.insert(0, Block())
    import torch, kron_kernels as kk
    from kron_kernels import backend
"""


def run(code: str, env_extra: dict, timeout: int):
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    env.pop("KRON_KERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(BLOCK_INSTALLED) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_no_jit_unless_asked(tmp_path):
    run(
        """
        ok, reason = backend.extension_status()
        assert not ok and "KRON_KERNELS_JIT=1" in reason, reason
        y = kk.fwht(torch.ones(2, 8))  # auto falls back to the torch butterfly
        assert torch.equal(y[:, 0], torch.full((2,), 8.0))
        p = kk.fastfood(torch.ones(3), 10, seed=1)  # and fastfood to its torch chain
        assert p.shape == (10,) and torch.isfinite(p).all()
        """,
        {"KRON_KERNELS_JIT": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path)},
        timeout=120,
    )
    assert not any(tmp_path.iterdir()), "something was compiled without KRON_KERNELS_JIT=1"


@pytest.mark.slow
def test_jit_builds_and_runs(tmp_path):
    """Compiles for one CUDA architecture only (where nvcc is present) to keep CI short."""
    out = run(
        """
        ok, reason = backend.extension_status()
        assert ok, reason
        assert backend.extension().__name__ == "kron_kernels_C"
        x = torch.randn(3, 64)
        with kk.use_backend("cuda"):
            y = kk.fwht(x, 0.5)
        with kk.use_backend("torch"):
            assert torch.allclose(y, kk.fwht(x, 0.5), rtol=1e-5, atol=1e-5)
        theta = torch.randn(20)
        with kk.use_backend("cuda"):  # the C++ Fastfood kernel of the JIT build
            p = kk.fastfood(theta, 100, seed=3)
        with kk.use_backend("torch"):
            assert torch.allclose(p, kk.fastfood(theta, 100, seed=3), rtol=1e-5, atol=1e-6)
        assert not torch.cuda.is_initialized()
        print(backend.extension().kernels())
        """,
        {"KRON_KERNELS_JIT": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path), "TORCH_CUDA_ARCH_LIST": "7.5"},
        timeout=900,
    )
    assert "fwht" in out and "fastfood" in out
