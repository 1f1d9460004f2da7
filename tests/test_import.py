"""`import kron_kernels` never touches CUDA, Triton or the compiled extension, and works without it."""
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_is_lazy():
    out = run_python(
        """
        import sys, torch
        import kron_kernels as kk
        assert not torch.cuda.is_initialized(), "import initialised CUDA"
        assert "triton" not in sys.modules, "import imported triton"
        assert "kron_kernels._C" not in sys.modules, "import loaded the extension"
        print(sorted(kk.__all__)[:3])
        """
    )
    assert "BackendUnavailableError" in out


def test_import_and_ops_without_extension():
    """With the extension made unimportable, the package imports and runs on torch, and
    asking for the 'cuda' backend explains what to do."""
    run_python(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "kron_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, kron_kernels as kk
        from kron_kernels import backend
        ok, reason = backend.extension_status()
        assert not ok and "pip install" in reason, reason
        y = kk.kron_matmul(torch.randn(3, 4), torch.randn(2, 2, 2), torch.randn(2, 3, 1), torch.randn(2, 2, 1))
        assert y.shape == (3, 6)
        try:
            backend.extension()
        except kk.BackendUnavailableError as e:
            assert "kron_kernels._C" in str(e)
        else:
            raise AssertionError("extension() did not raise")
        """
    )


@pytest.mark.parametrize("module", ["kron_kernels.ops", "kron_kernels.reference.kadaptation", "kron_kernels.reference.compacter"])
def test_submodules_import_without_triton(module):
    run_python(
        f"""
        import sys
        import {module}
        assert "triton" not in sys.modules
        """
    )
