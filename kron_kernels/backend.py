"""Which implementation serves a call: the CUDA extension, Triton, structured torch code, or
a cuBLAS-first dense composition.

* ``cuda``: the compiled extension (CUDA C++ / C++ CPU kernels) where it implements the op;
* ``triton``: the fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``torch``: the structured torch implementation (GEMMs on views of the factors; the CPU path,
  not the naive reference);
* ``dense``: for ops that have one, a composition of dense GEMMs on a materialised small
  increment (e.g. ``kron_linear``: one GEMM on ``W + delta``, the weight-gradient GEMM of the
  adapted rows only, contracted onto the factors) -- plain torch calls, so cuBLAS on a GPU.

``auto`` (the default) uses the compiled extension where it implements the op and the input
lives on CUDA; else, on CUDA, what the op's choice table names (``cuda_auto``: Triton unless
a measurement -- or the absence of one, where the op says so -- picks its dense composition);
else the torch implementation. An explicit backend -- ``set_backend(name)``, the
``use_backend(name)`` context or the ``KRON_KERNELS_BACKEND`` environment variable -- wins
and raises :class:`BackendUnavailableError` when it cannot serve a call, naming why.

Importing this module never touches CUDA, Triton or the extension: everything is probed
lazily, on the first call that needs it, and cached.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Iterator, Optional, Tuple

import torch

BACKENDS = ("auto", "triton", "cuda", "torch", "dense")
_ENV_VAR = "KRON_KERNELS_BACKEND"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "set_backend",
    "get_backend",
    "use_backend",
    "select",
    "triton_status",
    "extension_status",
    "extension",
]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


_state = threading.local()


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the backend for this thread: ``"auto"``, ``"triton"``, ``"cuda"``, ``"torch"`` or ``"dense"``."""
    _state.name = _validate(name)


def get_backend() -> str:
    """The backend in force: ``set_backend`` if called, else ``$KRON_KERNELS_BACKEND``, else auto."""
    name = getattr(_state, "name", None)
    if name is not None:
        return name
    env = os.environ.get(_ENV_VAR)
    if env:
        try:
            return _validate(env)
        except ValueError:
            raise ValueError(f"{_ENV_VAR}={env!r} is not one of {BACKENDS}") from None
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls on backend ``name``."""
    previous = getattr(_state, "name", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.name = previous


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def process_constant(fn):
    """Mark ``fn`` (a probe whose result is constant for the life of the process: an import, the
    extension, a device property) so that torch.compile calls it while tracing and takes its
    result as a constant, instead of tracing into it (an import is a graph break) -- backend
    selection stays outside the captured graph. This is what ``torch.compiler.
    assume_constant_result`` does, without its import of ``torch._dynamo``, which imports
    Triton: importing this package must not (``tests/test_import.py``). ``tests/test_compile.py``
    checks that the marker is still the one torch's decorator sets."""
    fn._dynamo_marked_constant = True
    return fn


def cached_constant(fn):
    """``fn`` computed once per argument tuple (``functools.lru_cache``) and marked with
    :func:`process_constant`. The mark sits on a plain Python function calling the cache:
    Dynamo honours it on Python functions, not on the cache's C wrapper."""
    cached = functools.lru_cache(maxsize=None)(fn)

    def probe(*args):
        return cached(*args)

    probe.__name__, probe.__qualname__, probe.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    probe.__module__ = fn.__module__
    probe.cache_clear = cached.cache_clear
    return process_constant(probe)


# The probes below are constant for the life of the process (cached): see process_constant.
@cached_constant
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_status(device: torch.device) -> Tuple[bool, str]:
    """Whether Triton kernels can run on ``device``, and if not, why."""
    error = _triton_import_error()
    if error:
        return False, error
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and _interpreting():
        return True, ""
    return False, (
        f"Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); "
        f"got a tensor on {device}"
    )


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        return importlib.import_module("kron_kernels._C"), ""
    except ImportError as exc:
        missing = exc
    from . import _build  # standard library only; torch's JIT loader is imported when asked for

    if _build.jit_requested():  # a source checkout: compile csrc/ now (cached across runs)
        try:
            return _build.jit_load(), ""
        except Exception as exc:  # a compiler error is reported where the extension is needed
            return None, f"the compiled extension kron_kernels._C is not installed and its JIT build failed: {exc}"
    return None, (
        f"the compiled extension kron_kernels._C is not available ({missing}); "
        "reinstall with a C++/CUDA toolchain present (pip install --no-build-isolation -e .), "
        f"or set {_build.JIT_ENV_VAR}=1 to compile it from this checkout on first use"
    )


@process_constant
def extension_status() -> Tuple[bool, str]:
    """Whether the compiled extension is importable, and if not, why."""
    module, reason = _load_extension()
    return module is not None, reason


def extension():
    """The compiled extension module; raises an actionable error when it is missing."""
    module, reason = _load_extension()
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def select(
    op: str,
    device: torch.device,
    cuda_ops: frozenset = frozenset(),
    triton_refuses: Optional[str] = None,
    dense: bool = False,
    cuda_auto: Optional[str] = None,
) -> str:
    """Pick ``"cuda"``, ``"triton"``, ``"torch"`` or ``"dense"`` for ``op`` on ``device``.

    ``cuda_ops`` names the device types for which the compiled extension implements ``op``
    (``{"cuda"}``, ``{"cpu"}``, both, or empty when it has no kernel for it).
    ``triton_refuses`` is the op's reason why its Triton kernels cannot take *this* call
    (e.g. an unsupported dtype), or None: ``auto`` then falls back, an explicit
    ``triton`` raises with that reason. ``dense``: the op has a dense (cuBLAS-first)
    composition. ``cuda_auto``: what ``auto`` takes on CUDA, from the op's choice table (the
    measured winner for this call's shape class): ``"dense"``, ``"triton"`` (before the
    extension; the extension where Triton refuses), or None (the extension where it has the
    op, else Triton).
    """
    if cuda_auto not in (None, "triton", "dense") or (cuda_auto == "dense" and not dense):
        raise ValueError(f"{op}: cuda_auto must be None, 'triton' or (with a dense composition) 'dense', "
                         f"got {cuda_auto!r}")
    requested = get_backend()
    if requested == "torch":
        return "torch"
    if requested == "dense":
        if not dense:
            raise BackendUnavailableError(
                f"backend 'dense' has no dense composition for {op}; use set_backend('auto') to fall back"
            )
        return "dense"
    if requested == "cuda":
        if device.type not in cuda_ops:
            raise BackendUnavailableError(
                f"backend 'cuda' has no compiled kernel for {op} on {device.type} tensors; "
                "use set_backend('auto') to fall back"
            )
        ok, reason = extension_status()
        if not ok:
            raise BackendUnavailableError(f"backend 'cuda' cannot run {op}: {reason}")
        return "cuda"
    if requested == "triton":
        ok, reason = triton_status(device)
        if ok and triton_refuses:
            ok, reason = False, triton_refuses
        if not ok:
            raise BackendUnavailableError(f"backend 'triton' cannot run {op}: {reason}")
        return "triton"
    # auto
    on_cuda = device.type == "cuda"
    if on_cuda and cuda_auto == "dense":
        return "dense"
    triton_ok = on_cuda and not triton_refuses and triton_status(device)[0]
    if triton_ok and cuda_auto == "triton":
        return "triton"
    if device.type in cuda_ops and extension_status()[0]:
        return "cuda"
    if triton_ok:
        return "triton"
    return "torch"
