"""Build script: the csrc/ extension when a toolchain is there, a pure-Python install otherwise.

Environment switches
--------------------
KRON_KERNELS_NO_EXT=1     never build the extension (pure-Python install).
TORCH_CUDA_ARCH_LIST      CUDA architectures to build for (default "7.5;8.0;9.0").
MAX_JOBS                  parallel compile jobs (default: the machine's cores).
"""
import glob
import os
import shutil
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """The real toolkit root: `nvcc` on PATH may be a wrapper script outside it (DESIGN.md 9)."""
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
        for token in head.split():
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


def _extensions():
    if os.environ.get("KRON_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp and not cu:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: building kron_kernels without its extension")
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cuda_home = _cuda_home()
    if cu and cuda_home and torch.version.cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "kron_kernels._C",
            cpp + cu,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        )
    elif cpp:
        if cu:
            warnings.warn("no CUDA toolkit or CUDA-enabled torch: building the CPU kernels of csrc/ only")
        ext = cpp_extension.CppExtension(
            "kron_kernels._C", cpp, extra_compile_args={"cxx": ["-O3"]}
        )
    else:
        warnings.warn("no CUDA toolkit: building kron_kernels without its extension")
        return [], {}
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
