"""Compile the Triton kernels for a GPU architecture without a GPU and print their resource use.

    python -m benchmarks.kernel_resources [--arch 90] [--warps 8]

Reads registers, spill stack and shared memory off ptxas (through the cuobjdump that ships
with Triton): the first question to answer about a kernel before timing it, and one that a
machine without a GPU can answer. Sizes are ViT-B's (KAdaptation: a = 32, p = q = 24; FacT: d = 768, r = 8);
the Walsh-Hadamard and Fastfood kernels at the sizes of their launchers' largest one-program tiles.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kron_kernels.triton import bottleneck, fastfood, fwht, kron


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
                 P_P=kron._pad(p), Q_P=kron._pad(p), DOT_PRECISION="tf32")
    act, f32 = f"*{dtype}", "*fp32"
    strides = {name: "i32" for name in ("n_rows", "stride_xn", "stride_xk")}
    yield "kron fwd", kron._kron_fwd_kernel, (
        {"x_ptr": act, "y_ptr": act, "bias_ptr": act, "abar_ptr": f32, "uf_ptr": f32, "vf_ptr": f32},
        {**strides, "stride_yn": "i32", "stride_yk": "i32", "scale": "fp32"},
        {**sizes, "BLOCK_N": 16, "BLOCK_J": min(kron._pad(mr), 32), "HAS_BIAS": True},
    )
    yield "kron bwd", kron._kron_bwd_kernel, (
        {"x_ptr": act, "dy_ptr": act, "dx_ptr": act, "abar_ptr": f32, "uf_ptr": f32, "vf_ptr": f32,
         "dabar_part_ptr": f32, "duf_part_ptr": f32, "dvf_part_ptr": f32},
        {**strides, "stride_dyn": "i32", "stride_dyk": "i32", "stride_dxn": "i32", "stride_dxk": "i32",
         "scale": "fp32"},
        {**sizes, "BLOCK_N": kron._BWD_BLOCK_N, "BLOCK_J": min(kron._pad(mr), 16), "NEED_DX": True,
         "ACCUMULATE_DX": True},
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


def fact_cases(dtype="bf16", r_pad=16):
    """The multi-slot FacT kernels (``ops.fact_linear``) at ViT-B (d = 768, r = 8 -> R_PAD 16,
    2-byte activations), both splits, with dropout and every gradient, at the tiles of
    ``bottleneck._config``: the forward with bias (the fused Linear's output), the backward
    with dx and the weight gradients."""
    act, f32 = f"*{dtype}", "*fp32"
    runtime = {"n_rows": "i32", "D": "i32", "K": "i32", "R": "i32", "seed": "i32",
               "p_drop": "fp32", "drop_scale": "fp32", "scale": "fp32"}
    weights = {"u_t_ptr": f32, "v_t_ptr": f32, "core_ptr": f32}
    for split in ("rows", "cols"):
        flags = dict(SPLIT_ROWS=split == "rows", HAS_DROPOUT=True, DOT_PRECISION="tf32", R_PAD=r_pad)
        yield f"fact {split} fwd", bottleneck._fact_fwd_kernel, (
            {"x_ptr": act, **weights, "bias_ptr": f32, "out_ptr": act},
            {**runtime, **{f"stride_{t}{k}": "i32" for t in ("x", "o") for k in "nd"}},
            {**flags, "HAS_BIAS": True, "BLOCK_N": 64, "BLOCK_D": 64},
            2,
        )
        yield f"fact {split} bwd", bottleneck._fact_bwd_kernel, (
            {"x_ptr": act, "dout_ptr": act, **weights, "dx_ptr": act,
             **{f"{g}_part_ptr": f32 for g in ("du_t", "dv_t", "dcore")}},
            {**runtime, **{f"stride_{t}{k}": "i32" for t in ("x", "g", "dx") for k in "nd"}},
            {**flags, "NEED_DX": True, "NEED_DW": True, "BLOCK_N": 64, "BLOCK_D": 32},
            1,
        )


def transform_cases(dtype="bf16"):
    """``kk.fwht``'s Triton kernel on its row pass at 2^10 and 2^13 (``fwht._TILE`` elements per
    program) and on a strided pass of 2^7; the fused Fastfood kernels at ``Lb = 2^13`` (their
    largest) with B, Pi, G generated in the kernel."""
    pass_args = ({"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}, {"n_vectors": "i64", "stride": "i64", "scale": "fp32"})
    for log_a, row_pass in ((10, True), (13, True), (fwht.MAX_STRIDED_LOG, False)):
        a = 1 << log_a
        yield f"fwht {'row' if row_pass else 'strided'} 2^{log_a}", fwht._fwht_kernel, (
            *pass_args, {"A": a, "LOG_A": log_a, "BLOCK_V": max(1, fwht._TILE // a), "ROW_PASS": row_pass})
    lb = {"LB": 1 << 13, "LOG_LB": 13, "HAS_PARAMS": False}
    params = {"keys_ptr": "*i64", "b_ptr": "*fp32", "pi_ptr": "*i64", "g_ptr": "*fp32"}
    yield "fastfood fwd 2^13", fastfood._fastfood_fwd_kernel, (
        {"theta_ptr": "*fp32", "out_ptr": "*fp32", **params}, {"d": "i32", "D": "i64", "inv_sqrt_D": "fp32"}, lb)
    yield "fastfood bwd 2^13", fastfood._fastfood_t_kernel, (
        {"g_ptr": "*fp32", "part_ptr": "*fp32", "keys_ptr": "*i64", "b_ptr": "*fp32", "pinv_ptr": "*i64",
         "gg_ptr": "*fp32"}, {"nb": "i64", "D": "i64", "inv_sqrt_D": "fp32"}, lb)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--warps", type=int, default=8)
    args = parser.parse_args(argv)
    for name, fn, (pointers, scalars, constexprs, *stages) in (*kron_cases(), *bottleneck_cases(), *fact_cases(),
                                                               *transform_cases()):
        kernel = _compile(fn, pointers, scalars, constexprs, args.arch, args.warps, *stages)
        print(f"sm_{args.arch} {args.warps} warps  {name:10s} {_usage(kernel)}  triton-shared={kernel.metadata.shared}")


if __name__ == "__main__":
    main()
