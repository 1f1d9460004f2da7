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

from kron_kernels.triton import kron


def _usage(kernel) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True).stdout
    lines = [line.strip() for line in out.splitlines() if "REG:" in line]
    return lines[0] if lines else out.strip()


def _compile(fn, pointers, scalars, constexprs, arch, warps):
    signature = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--warps", type=int, default=8)
    args = parser.parse_args(argv)
    for name, fn, (pointers, scalars, constexprs) in kron_cases():
        kernel = _compile(fn, pointers, scalars, constexprs, args.arch, args.warps)
        print(f"sm_{args.arch} {args.warps} warps  {name:10s} {_usage(kernel)}  triton-shared={kernel.metadata.shared}")


if __name__ == "__main__":
    main()
