"""Build script: the csrc/ extension when a toolchain is there, a pure-Python install otherwise.

Environment switches
--------------------
KRON_KERNELS_NO_EXT=1     never build the extension (pure-Python install).
TORCH_CUDA_ARCH_LIST      CUDA architectures to build for (default "7.5;8.0;9.0").
MAX_JOBS                  parallel compile jobs (default: the machine's cores).
"""
import importlib.util
import os
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    """kron_kernels/_build.py by path: the package itself must not be imported while it is built."""
    spec = importlib.util.spec_from_file_location("_kron_kernels_build", os.path.join(HERE, "kron_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("KRON_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    helpers = _load_build_helpers()
    cpp, cu = (sorted(os.path.relpath(f, HERE) for f in files) for files in helpers.sources(HERE))
    if not cpp and not cu:
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: building kron_kernels without its extension")
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cuda_home = helpers.use_cuda(cu)
    openmp = helpers.openmp_flags()  # the CPU kernel's at::parallel_for is OpenMP in torch's builds
    if cuda_home:
        # torch guesses CUDA_HOME from `nvcc` on PATH, which may be a wrapper outside the toolkit
        # (the link then fails on -lcudart): set the real root before building (DESIGN.md 9)
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", helpers.DEFAULT_ARCH_LIST)
        ext = cpp_extension.CUDAExtension(
            "kron_kernels._C",
            cpp + cu,
            extra_compile_args={"cxx": helpers.CXX_FLAGS + openmp, "nvcc": list(helpers.NVCC_FLAGS)},
            extra_link_args=openmp,
            define_macros=[(helpers.CUDA_MACRO, None)],
        )
    elif cpp:
        if cu:
            warnings.warn("no CUDA toolkit or CUDA-enabled torch: building the CPU kernels of csrc/ only")
        ext = cpp_extension.CppExtension(
            "kron_kernels._C", cpp, extra_compile_args={"cxx": helpers.CXX_FLAGS + openmp}, extra_link_args=openmp
        )
    else:
        warnings.warn("no CUDA toolkit: building kron_kernels without its extension")
        return [], {}
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
