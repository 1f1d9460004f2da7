"""How the ``csrc/`` extension is built: shared by ``setup.py`` (ahead of time) and the JIT path.

``setup.py`` loads this file by path (it must not import the package while building it), so
only the standard library is imported at module level.

JIT: a source checkout without a built ``kron_kernels._C`` compiles the extension on first use
when ``KRON_KERNELS_JIT=1`` (never at import, never unasked), through
``torch.utils.cpp_extension.load``, which caches the build in ``$TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``) and reuses it while the sources are unchanged.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import List, Optional, Tuple

JIT_ENV_VAR = "KRON_KERNELS_JIT"
DEFAULT_ARCH_LIST = "7.5;8.0;9.0"  # T4, A100, H100; CUDA 13 has no sm_70 (DESIGN.md 9)
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
CUDA_MACRO = "KRON_KERNELS_WITH_CUDA"


def cuda_home() -> Optional[str]:
    """The real toolkit root: ``nvcc`` on PATH may be a wrapper script outside it (DESIGN.md 9)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as fh:
                head = fh.read(4096).decode("utf-8", "ignore")
        except OSError:
            head = ""
        for token in head.split():  # a wrapper's `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            if token.endswith("/bin/nvcc") and os.path.exists(token):
                return os.path.dirname(os.path.dirname(token))
        if os.path.basename(os.path.dirname(real)) == "bin":
            root = os.path.dirname(os.path.dirname(real))
            if os.path.isdir(os.path.join(root, "include")):
                return root
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def openmp_flags() -> List[str]:
    """``-fopenmp`` where torch parallelises with OpenMP (its Linux wheels): at::parallel_for is
    an inline ``#pragma omp parallel``, serial unless the extension is compiled with OpenMP.
    The extension then binds to the libgomp that torch has already loaded (same soname)."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def sources(root: str) -> Tuple[List[str], List[str]]:
    """``(cpp, cu)`` source files under ``<root>/csrc``."""
    csrc = os.path.join(root, "csrc")
    return sorted(glob.glob(os.path.join(csrc, "*.cpp"))), sorted(glob.glob(os.path.join(csrc, "*.cu")))


def use_cuda(cu: List[str]) -> Optional[str]:
    """The toolkit root when the CUDA sources can be built (nvcc and a CUDA-built torch), else None."""
    import torch

    home = cuda_home()
    return home if cu and home and torch.version.cuda else None


def jit_requested() -> bool:
    return os.environ.get(JIT_ENV_VAR, "0") == "1"


def jit_load():
    """Compile (or reuse the cached build of) the extension from this checkout's ``csrc/``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cpp, cu = sources(root)
    if not cpp:
        raise ImportError(f"{JIT_ENV_VAR}=1 but there are no C++ sources under {os.path.join(root, 'csrc')}")
    home = use_cuda(cu)
    if home:  # before torch.utils.cpp_extension is imported: it guesses CUDA_HOME at import
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cflags, cuda_flags, files = list(CXX_FLAGS) + openmp_flags(), list(NVCC_FLAGS), list(cpp)
    if home:
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        cflags.append(f"-D{CUDA_MACRO}")
        cuda_flags.append(f"-D{CUDA_MACRO}")
        files += cu
    return cpp_extension.load(
        name="kron_kernels_C",
        sources=files,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=openmp_flags(),
        with_cuda=bool(home),
        verbose=os.environ.get("KRON_KERNELS_JIT_VERBOSE", "0") == "1",
    )
