"""Compile every Triton kernel configuration the launchers can choose, for real GPU targets,
on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks a kernel's indexing but not what the GPU
compiler demands (``tl.dot`` needs K >= 16 on Triton 3.6; shared memory per block; register
pressure): a kernel that passes every CPU test can still fail its first compile on a GPU.
This module closes that gap without hand-written copies of the launch parameters:

1. :func:`record_launches` runs the package's own public ops, forward and backward, on fake
   CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides, no memory)
   while :func:`kron_kernels.triton.simulate_gpu` makes the launchers size their launches for
   a given GPU (SM count, shared memory); every ``kernel[grid](...)`` is recorded instead of
   run, with exactly the arguments, constexprs, ``num_warps`` and ``num_stages`` the launcher
   chose (autotuned kernels: every configuration of the autotuner).
2. :func:`compile_launch` specialises a recorded launch the way Triton's own launcher does
   (argument types, the ``== 1`` and divisibility-by-16 specialisations, options) and compiles
   it with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``: TTIR -> PTX -> cubin through
   ptxas, as on the GPU.
3. :func:`workloads` are the calls: every op at the ViT-S/B/L widths of every method's
   defaults and of the benchmarks and GPU tests, in fp32/fp16/bf16, every rank and block-size
   branch (rank chunks, tails, with and without input gradients), plus the odd sizes of the CPU
   tests.

``python -m kron_kernels.triton.targets [--arch 75 80 90] [--json FILE] [--resources]``
compiles them all and reports every failure with its kernel, target and configuration; the
test suite runs it (``tests/test_gpu_targets.py``) with the installed Triton and with
Triton 3.6 (the GPU machine's). Must run with ``TRITON_INTERPRET`` unset: the interpreter
replaces ``@triton.jit`` functions with Python ones that cannot be compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import GPUProperties, simulate_gpu

__all__ = [
    "TARGETS",
    "Launch",
    "record_launches",
    "compile_launch",
    "workloads",
    "jit_functions",
    "launched_kernels",
    "check",
]

# The GPUs the package is built for (DESIGN.md 9): the launchers' choices depend on the SM
# count and the opt-in shared memory per block, so each target carries its reference card's.
TARGETS: Dict[int, GPUProperties] = {
    75: GPUProperties("Tesla T4 (sm_75)", (7, 5), 40, 64 * 1024),
    80: GPUProperties("A100 (sm_80)", (8, 0), 108, 163 * 1024),
    90: GPUProperties("H100 (sm_90)", (9, 0), 132, 227 * 1024),
}

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}


# ----------------------------------------------------------------------------------------
# recording launches
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` as a launcher issued it (tensors as fake tensors)."""

    kernel: Any  # triton.runtime.jit.JITFunction
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    workload: str = ""

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def bound(self) -> Dict[str, Any]:
        """Every kernel parameter by name (defaults filled in)."""
        bound = self.kernel.signature.bind(*self.args, **{k: v for k, v in self.kwargs.items()
                                                          if k in self.kernel.arg_names})
        bound.apply_defaults()
        return dict(bound.arguments)

    def options(self) -> Dict[str, Any]:
        return {k: v for k, v in self.kwargs.items() if k not in self.kernel.arg_names}

    def config(self) -> str:
        """The compile-time choices: constexprs, options and the runtime argument types."""
        parts = []
        for param, (name, value) in zip(self.kernel.params, self.bound().items()):
            if param.is_constexpr:
                parts.append(f"{name}={value}")
            elif isinstance(value, torch.Tensor):
                parts.append(f"{name}:*{_TORCH_TO_TRITON[value.dtype]}")
            elif isinstance(value, int) and not isinstance(value, bool) and value == 1:
                parts.append(f"{name}=1")  # Triton specialises runtime ints equal to 1
        parts += [f"{k}={v}" for k, v in sorted(self.options().items())]
        return ", ".join(parts)

    def key(self) -> Tuple[str, str]:
        """Launches with equal keys compile to the same kernel (up to divisibility hints)."""
        return self.name, self.config()


def _mock(value):
    """Fake tensors have no storage: Triton's specialisation sees a 16-byte aligned pointer
    of the same dtype (a fresh PyTorch allocation is 256-byte aligned)."""
    from triton.runtime.jit import MockTensor

    if isinstance(value, torch.Tensor):
        return MockTensor(value.dtype, list(value.shape))
    return value


@dataclasses.dataclass
class Recording:
    """The launches recorded so far; ``label`` tags the launches that follow."""

    launches: List[Launch] = dataclasses.field(default_factory=list)
    label: str = ""
    tiled: set = dataclasses.field(default_factory=set)  # autotuned classes recorded with every tile


@contextlib.contextmanager
def record_launches(props: GPUProperties) -> Iterator[Recording]:
    """Record, instead of running, every Triton launch made in the context, with the launchers
    sizing their launches for ``props``. Create the tensors inside the context with
    ``device="cuda"``: they are fake (no GPU is needed). The compiled extension is hidden in
    the context, so ops that prefer it take their Triton path."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime import autotuner, jit

    from .. import backend

    recording = Recording()

    def run(self, *args, grid, warmup, **kwargs):
        recording.launches.append(Launch(self, args, kwargs, recording.label))

    def autotuned_run(self, *args, grid=None, warmup=False, **kwargs):
        # every configuration the autotuner may pick on this device -- its pruning (by the
        # simulated GPU's shared memory) runs as on the real one -- once per kernel, tensor
        # dtypes, factor width and dot precision (the tile's dot shapes and shared memory follow
        # from them); the kernel's other launches of that class (flags) with its first one
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
        finally:
            self.nargs = None
        # (the dot precision too: 3xTF32 splits the dot operands, so its tiles need more
        # shared memory than the same tile with TF32 or IEEE dots)
        tile_class = (self.base_fn.__name__, tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)),
                      tuple(sorted((k, v) for k, v in kwargs.items() if k in ("R_PAD", "DOT_PRECISION"))))
        if tile_class in recording.tiled:
            configs = configs[:1]
        recording.tiled.add(tile_class)
        for config in configs:
            self.fn.run(*args, grid=None, warmup=False, **{**kwargs, **config.all_kwargs()})
        # as a tuned call leaves it: the persistent backwards' launchers read the chosen
        # configuration's program count back
        self.best_config = configs[0]

    patches = [(jit.JITFunction, "run", run), (autotuner.Autotuner, "run", autotuned_run),
               (backend, "extension_status", lambda: (False, "hidden while recording Triton launches"))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        with FakeTensorMode(), simulate_gpu(props), backend.use_backend("triton"):
            yield recording
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


# ----------------------------------------------------------------------------------------
# compiling a recorded launch
# ----------------------------------------------------------------------------------------
def compile_launch(launch: Launch, arch: int):
    """Compile ``launch`` for ``sm_<arch>`` exactly as Triton's launcher would on that GPU
    (same specialisation and options); returns the ``CompiledKernel`` (``.asm["cubin"]``,
    ``.metadata.shared``, ``.n_regs`` after loading) or raises the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    compiler_backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, compiler_backend)
    args = [_mock(a) for a in launch.args]
    kwargs = {k: _mock(v) for k, v in launch.kwargs.items()}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(compiler_backend, kwargs, bound_args,
                                                              specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def resource_usage(compiled) -> str:
    """``REG:.. STACK:.. SHARED:..`` as ptxas reports them (cuobjdump shipped with Triton)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True).stdout
    lines = [line.strip() for line in out.splitlines() if "REG:" in line]
    return lines[0] if lines else out.strip()


# ----------------------------------------------------------------------------------------
# the kernels of the package
# ----------------------------------------------------------------------------------------
def jit_functions() -> Dict[str, Any]:
    """Every ``@triton.jit`` function defined in ``kron_kernels.triton.*``, by qualified name."""
    from triton.runtime.jit import JITFunction

    from .. import triton as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = value
    return found


def launched_kernels() -> Dict[str, Any]:
    """The jit functions that are kernels (launched by a launcher), not helpers called from
    other jit functions: a jit function whose name no other jit function's source mentions."""
    import re

    functions = jit_functions()
    sources = {qual: fn.src for qual, fn in functions.items()}
    kernels = {}
    for qual, fn in functions.items():
        name = fn.fn.__name__
        called = any(re.search(rf"\b{re.escape(name)}\s*\(", src) for other, src in sources.items() if other != qual)
        if not called:
            kernels[qual] = fn
    return kernels


# ----------------------------------------------------------------------------------------
# workloads: the public ops at the shapes the package is used, tested and benchmarked at
# ----------------------------------------------------------------------------------------
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = {"ViT-S": 384, "ViT-B": 768, "ViT-L": 1024}
TOKENS = 2 * 197  # two images; the launch configurations do not depend on the token count


def _dtype_id(dtype) -> str:
    return _TORCH_TO_TRITON[dtype]


def _param(*shape):
    return torch.empty(*shape, device="cuda", dtype=torch.float32, requires_grad=True)


def _act(*shape, dtype, grad=True):
    return torch.empty(*shape, device="cuda", dtype=dtype, requires_grad=grad)


def _backward(out: torch.Tensor) -> None:
    """Run the backward of the package's autograd Function that produced ``out``.

    The autograd engine needs a real CUDA context for CUDA tensors, fake or not; the op's
    Function node is reached through the views an op adds around it and applied directly."""
    node, seen = out.grad_fn, set()
    while node is not None and not isinstance(node, torch.autograd.function.BackwardCFunction):
        seen.add(node)
        node = next((n for n, _ in node.next_functions if n is not None and n not in seen), None)
    if node is None:
        raise RuntimeError("no autograd Function of the package produced this output")
    n_outputs = len(getattr(node, "_input_metadata", [None])) or 1
    node.apply(*[torch.empty_like(out) if i == 0 else None for i in range(n_outputs)])


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run():
        out = fn()
        if out.requires_grad:
            _backward(out)

    return run


def _kron_workloads():
    from .. import ops

    # (label, m, a_out, a_in, p, q, r): KAdaptation's defaults at every width (n = 32 terms of
    # a 32 x 32 A, p = q = d / 32), the benchmarks' and GPU tests' r = 4, and the CPU tests'
    # odd sizes (tails, r = 1, m*r > 32 rank chunks)
    shapes = [(f"{model}-r{r}", 32, 32, 32, d // 32, d // 32, r) for model, d in WIDTHS.items() for r in (1, 4)]
    shapes += [("odd-m3-ao5-ai4-p6-q7-r2", 3, 5, 4, 6, 7, 2), ("tiny-m1-p1-r1", 1, 1, 1, 1, 1, 1),
               ("m5-d200-r3", 5, 5, 8, 40, 25, 3), ("m4-d48-r20-chunked", 4, 8, 8, 6, 6, 20)]
    for label, m, a_out, a_in, p, q, r in shapes:
        vit = label.startswith("ViT")
        for dtype in DTYPES if vit else (torch.float32,):  # the CPU tests' odd sizes run in fp32
            for x_grad in (True, False) if vit else (True,):
                tag = f"kron_linear {label} {_dtype_id(dtype)}{'' if x_grad else ' no-dx'}"

                def linear(dtype=dtype, x_grad=x_grad, m=m, a_out=a_out, a_in=a_in, p=p, q=q, r=r):
                    x = _act(TOKENS, a_in * q, dtype=dtype, grad=x_grad)
                    W = torch.empty(a_out * p, a_in * q, device="cuda", dtype=dtype)
                    b = torch.empty(a_out * p, device="cuda", dtype=dtype)
                    return ops.kron_linear(x, W, b, _param(m, a_out, a_in), _param(m, p, r), _param(m, q, r))

                yield tag, _fwd_bwd(linear)
            if vit:
                # KAdaptation on timm's fused qkv: q and v row slices of one (3d, d) GEMM
                def slices(dtype=dtype, d=a_in * q, p=p, r=r):
                    x = _act(TOKENS, d, dtype=dtype)
                    W = torch.empty(3 * d, d, device="cuda", dtype=dtype)
                    b = torch.empty(3 * d, device="cuda", dtype=dtype)
                    targets = [(start, _param(32, 32, 32), _param(32, p, r), _param(32, p, r)) for start in (0, 2 * d)]
                    return ops.kron_linear_slices(x, W, b, targets)

                yield f"kron_linear_slices qv {label} {_dtype_id(dtype)}", _fwd_bwd(slices)

            def matmul(dtype=dtype, m=m, a_out=a_out, a_in=a_in, p=p, q=q, r=r):
                x = _act(TOKENS, a_in * q, dtype=dtype)
                return ops.kron_matmul(x, _param(m, a_out, a_in), _param(m, p, r), _param(m, q, r))

            yield f"kron_matmul {label} {_dtype_id(dtype)}", _fwd_bwd(matmul)

            def delta(dtype=dtype, m=m, a_out=a_out, a_in=a_in, p=p, q=q, r=r):
                def f(*shape):
                    return torch.empty(*shape, device="cuda", dtype=dtype)

                return ops.kron_delta(f(m, a_out, a_in), f(m, p, r), f(m, q, r))

            yield f"kron_delta {label} {_dtype_id(dtype)}", delta

            if dtype != torch.float32:
                # the Compacter modules' PHM weights under autocast: fp32 factors, stored 16-bit
                def delta_as(dtype=dtype, m=m, a_out=a_out, a_in=a_in, p=p, q=q, r=r):
                    return ops.kron_delta(_param(m, a_out, a_in), _param(m, p, r), _param(m, q, r), dtype=dtype)

                yield f"kron_delta fp32-as-{_dtype_id(dtype)} {label}", delta_as


def _adapter_workloads():
    from .. import ops

    # Compacter: k = d / 32 at every width; the CPU tests' odd sizes; k > 64 (halved row blocks)
    shapes = [(model, d, d // 32) for model, d in WIDTHS.items()] + [("odd-d96-k5", 96, 5), ("d768-k96", 768, 96)]
    for label, d, k in shapes:
        for dtype in DTYPES:
            for h_grad in (True, False):
                def adapter(dtype=dtype, d=d, k=k, h_grad=h_grad):
                    h = _act(TOKENS, d, dtype=dtype, grad=h_grad)
                    return ops.bottleneck_adapter(h, _param(k, d), _param(k), _param(d, k), _param(d))

                yield f"bottleneck_adapter {label}-k{k} {_dtype_id(dtype)}{'' if h_grad else ' no-dh'}", _fwd_bwd(adapter)


def _bottleneck_workloads():
    from .. import ops

    for model, d in WIDTHS.items():
        for dtype in DTYPES:
            dt = _dtype_id(dtype)
            # ARC: r = 50 (its default), with and without dropout; r = 100 (> 64: halved row blocks)
            for r, p in ((50, 0.1), (50, 0.0), (100, 0.1)):
                def arc(dtype=dtype, d=d, r=r, p=p):
                    x = _act(TOKENS, d, dtype=dtype)
                    return ops.arc(x, _param(d, r), _param(r), _param(d), dropout=p, seed=1)

                yield f"arc {model} r{r} p{p} {dt}", _fwd_bwd(arc)
            # LoSA: r = 64 along channels and along the 197 tokens (and a token count that
            # is a multiple of the row block: rows blocked)
            for axis, tokens in (("channel", 197), ("token", 197), ("token", 256)):
                for z_grad in (False, True):
                    def losa(dtype=dtype, d=d, axis=axis, tokens=tokens, z_grad=z_grad):
                        h = _act(2, tokens, d, dtype=dtype)
                        z = _act(2, tokens, d, dtype=dtype, grad=z_grad)
                        n = d if axis == "channel" else tokens
                        alpha = _param(1)
                        return ops.losa_mixer(h, z, _param(n, 64), _param(64, n), alpha, axis=axis)

                    yield f"losa_mixer {model} {axis} T{tokens}{' dz' if z_grad else ''} {dt}", _fwd_bwd(losa)
            # FacT: r = 4 (fact_tt's default), 8 (fact_tk's, the benchmarks'), 16, 32; rows (qkv:
            # 3 slots, fc1: 4) and cols (fc2: 4 chunks), as fact_linear (the modules) and
            # fact_apply, with dropout 0.1 and 0
            for r in (4, 8, 16, 32):
                for split, k in (("rows", 3), ("rows", 4), ("cols", 4)):
                    for p in (0.1, 0.0):
                        def fact(dtype=dtype, d=d, r=r, split=split, k=k, p=p, linear=True):
                            d_in, d_out = (d, k * d) if split == "rows" else (k * d, d)
                            x = _act(TOKENS, d_in, dtype=dtype)
                            args = (_param(d, r), _param(d, r), _param(k, r, r))
                            if linear:
                                W = torch.empty(d_out, d_in, device="cuda", dtype=dtype)
                                b = torch.empty(d_out, device="cuda", dtype=dtype)
                                return ops.fact_linear(x, W, b, *args, scale=0.1, dropout=p, split=split, seed=1)
                            return ops.fact_apply(x, *args, scale=0.1, dropout=p, split=split, seed=1)

                        yield f"fact_linear {model} r{r} {split}{k} p{p} {dt}", _fwd_bwd(fact)
                        if p > 0:
                            yield (f"fact_apply {model} r{r} {split}{k} p{p} {dt}",
                                   _fwd_bwd(lambda fact=fact: fact(linear=False)))


@contextlib.contextmanager
def _as_under_autocast(dtype):
    """The adapter and bottleneck ops as they run inside ``torch.autocast("cuda", dtype)`` on
    fp32 activations (a timm ViT's residual stream): their dots take ``dtype``'s precision
    (TF32 for bf16, 3xTF32 for fp16) on fp32 tiles. A machine without CUDA cannot enter a CUDA
    autocast region, so the ops' autocast probe (``ops._common.autocast_dtype``, read through
    ``autocast_target``) answers ``dtype`` instead."""
    common = importlib.import_module("kron_kernels.ops._common")
    saved = common.autocast_dtype
    common.autocast_dtype = lambda device: dtype
    try:
        yield
    finally:
        common.autocast_dtype = saved


def _autocast_workloads():
    from .. import ops

    d = WIDTHS["ViT-B"]
    for dtype in (torch.bfloat16, torch.float16):
        tag = f"fp32 autocast-{_dtype_id(dtype)}"

        def adapter(d=d):
            h = _act(TOKENS, d, dtype=torch.float32)
            return ops.bottleneck_adapter(h, _param(d // 32, d), _param(d // 32), _param(d, d // 32), _param(d))

        def arc(d=d):
            return ops.arc(_act(TOKENS, d, dtype=torch.float32), _param(d, 50), _param(50), _param(d), dropout=0.1,
                           seed=1)

        def losa(axis, d=d):
            h, z = _act(2, 197, d, dtype=torch.float32), _act(2, 197, d, dtype=torch.float32, grad=False)
            n = d if axis == "channel" else 197
            return ops.losa_mixer(h, z, _param(n, 64), _param(64, n), _param(1), axis=axis)

        calls = [(f"bottleneck_adapter ViT-B-k{d // 32}", adapter), ("arc ViT-B r50 p0.1", arc),
                 ("losa_mixer ViT-B channel T197", lambda: losa("channel")),
                 ("losa_mixer ViT-B token T197", lambda: losa("token"))]
        for label, call in calls:
            def run(call=call, dtype=dtype):
                with _as_under_autocast(dtype):
                    _fwd_bwd(call)()

            yield f"{label} {tag}", run


def _transform_workloads():
    from .. import ops
    bottleneck_ops = importlib.import_module("kron_kernels.ops.bottleneck")
    fastfood_ops = importlib.import_module("kron_kernels.ops.fastfood")  # ops.fastfood is the function

    # fwht: every row length 2^0 .. 2^15 (one row pass up to 2^13, strided passes beyond) at
    # the benchmarks' 32768 rows; 3 rows (programs narrower than the tile) at a few lengths
    for log_n in range(0, 16):
        for dtype in DTYPES:
            for rows in (16 * 2048, 3) if log_n in (0, 7, 10, 15) else (16 * 2048,):
                def fwht(dtype=dtype, log_n=log_n, rows=rows):
                    return ops.fwht(_act(rows, 1 << log_n, dtype=dtype))

                yield f"fwht n{1 << log_n} rows{rows} {_dtype_id(dtype)}", _fwd_bwd(fwht)
    # fastfood: stacked blocks Lb = 2^0 .. 2^13 (the Triton kernels' range) for both generator
    # versions (GENERATOR is a constexpr: one kernel each), padded mode, explicit params (which
    # generate nothing: the launcher compiles them with GENERATOR = 1 whatever the version)
    for generator in fastfood_ops.GENERATORS:
        for log_d in range(0, 14):
            def fastfood(d=1 << log_d, generator=generator):
                return ops.fastfood(_param(d), 10**6, seed=3, generator=generator)

            yield f"fastfood d{1 << log_d}" + ("" if generator == 1 else f" generator{generator}"), _fwd_bwd(fastfood)
    yield "fastfood padded", _fwd_bwd(lambda: ops.fastfood(_param(1000), 5000, seed=3, mode="padded"))

    def explicit():
        d, D = 1 << 10, 10**5
        Lb, nb = fastfood_ops.fastfood_block_size(D, d)
        B = torch.empty(nb, Lb, device="cuda")
        Pi = torch.empty(nb, Lb, device="cuda", dtype=torch.int64)
        G = torch.empty(nb, Lb, device="cuda")
        from ..triton import fastfood as triton_fastfood

        # the op validates Pi's values (data-dependent: not possible on fake tensors), so the
        # launchers are called with explicit parameters directly
        out = triton_fastfood.fastfood_forward(_param(d).detach(), D, Lb, nb, 3, (B, Pi, G))
        triton_fastfood.fastfood_transpose(out, d, Lb, nb, 3, (B, Pi, G))
        return out

    yield "fastfood explicit params", explicit
    yield "dropout keep mask", lambda: bottleneck_ops.dropout_keep_mask(TOKENS, 50, 0.1, 1, "cuda", "triton")


def workloads() -> List[Tuple[str, Callable[[], Any]]]:
    """``(label, call)`` pairs; run each inside :func:`record_launches`."""
    return [*_kron_workloads(), *_adapter_workloads(), *_bottleneck_workloads(), *_autocast_workloads(),
            *_transform_workloads()]


# ----------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------
def collect(props: GPUProperties, selected: Optional[Sequence[str]] = None) -> List[Launch]:
    """Every distinct launch the workloads make on ``props`` (first workload kept per key)."""
    distinct: Dict[Tuple[str, str], Launch] = {}
    with record_launches(props) as recording:
        for label, call in workloads():
            if selected and not any(s in label for s in selected):
                continue
            recording.label = label
            start = len(recording.launches)
            try:
                call()
            except Exception as exc:
                raise RuntimeError(f"workload {label!r} failed while recording: {type(exc).__name__}: {exc}") from exc
            if len(recording.launches) == start:
                raise RuntimeError(f"workload {label!r} launched no Triton kernel")
        for launch in recording.launches:
            distinct.setdefault(launch.key(), launch)
    return list(distinct.values())


_pending: List[Tuple[Launch, int, bool]] = []  # what the forked compile workers read


def _compile_entry(index: int) -> Dict[str, Any]:
    launch, arch, resources = _pending[index]
    entry = {"kernel": launch.name, "config": launch.config(), "workload": launch.workload}
    try:
        compiled = compile_launch(launch, arch)
    except Exception as exc:  # the compiler's error, whatever its class
        entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        return entry
    shared, limit = compiled.metadata.shared, TARGETS[arch].shared_memory_per_block_optin
    entry.update(ok=shared <= limit, shared=shared)
    if shared > limit:  # the launch would fail with "out of resource: shared memory" on the GPU
        entry["error"] = f"needs {shared} bytes of shared memory per block, sm_{arch} ({TARGETS[arch].name}) has {limit}"
    if resources:
        entry["resources"] = resource_usage(compiled)
    return entry


def check(archs: Sequence[int], selected: Optional[Sequence[str]] = None, resources: bool = False,
          log=print, jobs: Optional[int] = None) -> Dict[str, Any]:
    """Compile every distinct launch for every arch (``jobs`` processes, default one per
    core); returns a JSON-able report."""
    import multiprocessing

    import triton

    report: Dict[str, Any] = {"triton": triton.__version__, "torch": torch.__version__, "targets": {},
                              "kernels": sorted(launched_kernels())}
    _pending.clear()
    for arch in archs:
        _pending.extend((launch, arch, resources) for launch in collect(TARGETS[arch], selected))
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    if jobs > 1:
        # fork: the workers inherit the recorded launches (fake tensors do not pickle)
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            entries = pool.map(_compile_entry, range(len(_pending)), chunksize=1)
    else:
        entries = [_compile_entry(i) for i in range(len(_pending))]
    for (launch, arch, _), entry in zip(_pending, entries):
        status = "ok  " if entry["ok"] else "FAIL"
        if entry["ok"]:
            extra = f"{entry['resources']} triton-shared={entry['shared']}" if resources else ""
        else:
            extra = entry["error"].strip().splitlines()[-1]
        log(f"sm_{arch} {status} {launch.name} [{launch.workload}] {extra}")
        target = report["targets"].setdefault(str(arch), {"name": TARGETS[arch].name, "launches": []})
        target["launches"].append(entry)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _pending.clear()
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    parser.add_argument("--only", nargs="*", help="workloads whose label contains any of these substrings")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--resources", action="store_true", help="also print ptxas registers/spills/shared memory")
    parser.add_argument("--quiet", action="store_true", help="print failures only")
    parser.add_argument("--jobs", type=int, help="compile processes (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

    def log(line):
        if not args.quiet or " FAIL " in line:
            print(line, flush=True)

    report = check(args.arch, args.only, args.resources, log, args.jobs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    failures = [(arch, e) for arch, t in report["targets"].items() for e in t["launches"] if not e["ok"]]
    total = sum(len(t["launches"]) for t in report["targets"].values())
    print(f"triton {report['triton']}: {total - len(failures)} of {total} launch configurations compiled "
          f"for sm_{', sm_'.join(map(str, args.arch))} in {report['seconds']} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
