"""Compile the Triton kernels for a GPU architecture without a GPU and print their resource use.

    python -m benchmarks.kernel_resources [--arch 90] [--warps 8]

Reads registers, spill stack and shared memory off ptxas (through the cuobjdump that ships
with Triton): the first question to answer about a kernel before timing it, and one that a
machine without a GPU can answer. Sizes are the ViT-B KAdaptation ones (a = 32, p = q = 24).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kron_kernels.triton import bottleneck, kron


def _usage(kernel) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True).stdout
    lines = [line.strip() for line in out.splitlines() if "REG:" in line]
    return lines[0] if lines else out.strip()


def _compile(fn, pointers, scalars, constexprs, arch, warps, stages=None):
    signature = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def kron_cases(dtype="bf16", a=32, p=24, mr=32):
    sizes = dict(A_IN=a, A_OUT=a, P=p, Q=p, MR=mr, A_IN_P=triton.next_power_of_2(a),
                 P_P=kron._pad(p), Q_P=kron._pad(p), BLOCK_N=16, DOT_PRECISION="tf32")
    act, f32 = f"*{dtype}", "*fp32"
    strides = {name: "i32" for name in ("n_rows", "stride_xn", "stride_xk")}
    yield "kron fwd", kron._kron_fwd_kernel, (
        {"x_ptr": act, "y_ptr": act, "bias_ptr": act, "abar_ptr": f32, "uf_ptr": f32, "vf_ptr": f32},
        {**strides, "stride_yn": "i32", "stride_yk": "i32", "scale": "fp32"},
        {**sizes, "BLOCK_J": min(kron._pad(mr), 32), "HAS_BIAS": True},
    )
    yield "kron bwd", kron._kron_bwd_kernel, (
        {"x_ptr": act, "dy_ptr": act, "dx_ptr": act, "abar_ptr": f32, "uf_ptr": f32, "vf_ptr": f32,
         "dabar_part_ptr": f32, "duf_part_ptr": f32, "dvf_part_ptr": f32},
        {**strides, "stride_dyn": "i32", "stride_dyk": "i32", "stride_dxn": "i32", "stride_dxk": "i32",
         "scale": "fp32"},
        {**sizes, "BLOCK_J": min(kron._pad(mr), 16), "NEED_DX": True, "ACCUMULATE_DX": True},
    )


def bottleneck_cases(dtype="bf16"):
    """The low-rank bottleneck kernels at their ViT-B configurations (``bottleneck._config``
    for 2-byte activations): ARC (diagonal, tied, dropout, r = 50 -> R_PAD 64), the LoSA
    mixer (GELU, x2 = z, r = 64) along channels and along tokens (rows blocked: C = 768 is a
    multiple of BLOCK_N) and FacT's core middle (r = 8 -> R_PAD 16)."""
    act, f32 = f"*{dtype}", "*fp32"
    runtime = {"n_rows": "i32", "n_inner": "i32", "D": "i32", "R": "i32", "seed": "i32",
               "p_drop": "fp32", "drop_scale": "fp32"}
    x_strides = {f"stride_{t}{k}": "i32" for t in ("x", "x2") for k in "oid"}
    weights = {"down_t_ptr": f32, "up_t_ptr": f32, "core_ptr": f32, "diag_ptr": f32, "scale_ptr": f32}
    variants = (
        ("arc", dict(MIDDLE=1, HAS_X2=False, HAS_DROPOUT=True, ROWS_BLOCKED=False, R_PAD=64), True),
        ("losa", dict(MIDDLE=2, HAS_X2=True, HAS_DROPOUT=False, ROWS_BLOCKED=False, R_PAD=64), False),
        ("losa tok", dict(MIDDLE=2, HAS_X2=True, HAS_DROPOUT=False, ROWS_BLOCKED=True, R_PAD=64), False),
        ("fact core", dict(MIDDLE=0, HAS_X2=False, HAS_DROPOUT=True, ROWS_BLOCKED=False, R_PAD=16), False),
    )
    for name, flags, tied in variants:
        yield f"{name} fwd", bottleneck._bottleneck_fwd_kernel, (
            {"x_ptr": act, "x2_ptr": act, **weights, "bias_ptr": f32, "out_ptr": act},
            {**runtime, **x_strides, **{f"stride_o{k}": "i32" for k in "oid"}},
            {**flags, "HAS_RESIDUAL": name != "fact core", "HAS_BIAS": name == "arc", "DOT_PRECISION": "tf32",
             "BLOCK_N": 64, "BLOCK_D": 64},
            2,  # num_stages, as bottleneck._config
        )
        yield f"{name} bwd", bottleneck._bottleneck_bwd_kernel, (
            {"x_ptr": act, "x2_ptr": act, "dout_ptr": act, **weights, "dx_ptr": act, "dx2_ptr": act,
             **{f"{g}_part_ptr": f32 for g in ("ddown_t", "dup_t", "dcore", "ddiag", "dscale", "dbias")}},
            {**runtime, **x_strides, **{f"stride_{t}{k}": "i32" for t in ("g", "dx") for k in "oid"}},
            {**flags, "HAS_RESIDUAL": name != "fact core", "TIED": tied, "NEED_DX": True, "NEED_DX2": False,
             "NEED_DW": True, "DOT_PRECISION": "tf32", "BLOCK_N": 64, "BLOCK_D": 32},
            1,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--warps", type=int, default=8)
    args = parser.parse_args(argv)
    for name, fn, (pointers, scalars, constexprs, *stages) in (*kron_cases(), *bottleneck_cases()):
        kernel = _compile(fn, pointers, scalars, constexprs, args.arch, args.warps, *stages)
        print(f"sm_{args.arch} {args.warps} warps  {name:10s} {_usage(kernel)}  triton-shared={kernel.metadata.shared}")


if __name__ == "__main__":
    main()
