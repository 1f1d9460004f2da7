"""The planted bugs of ``make mutants`` (driver: ``mutants/run.py``).

Each mutant is one small bug, written as exact search/replace edits of the package's source.
``run.py`` applies it to a scratch copy of the repository, runs the mutant's test selection
there (the CPU suite: Triton under the interpreter) and, where given, the GPU-target compile
check (``python -m kron_kernels.triton.targets --only ...`` with Triton 3.6, the GPU machine's),
and reports the mutant *killed* (a test failed or the compile was refused) or *survived*.

Every op family has at least one mutant of every kind in ``KINDS``, or a line in
``NOT_APPLICABLE`` saying why the kind does not exist there; ``run.py`` checks this before it
runs anything, and refuses a mutant whose ``old`` text is not found exactly once (so that the
list cannot rot silently when the code changes: update the snippet with the code).

A mutant that the CPU suite and the compile check cannot kill must carry ``survives``: why, and
the named ``-m gpu`` test that kills it on a GPU. ``run.py`` exits non-zero on a survivor
without one, and on a mutant that carries one but was killed (the explanation is stale).

Fields:
    id        unique name, ``<family>-<kind>[-<where>]``
    family    kron | adapter | bottleneck (ARC, LoSA, FacT) | fwht | fastfood
    kind      one of KINDS (or EXTRA_KINDS)
    what      the bug in words
    edits     ((file, old, new), ...): each ``old`` must occur exactly once in ``file``
    tests     pytest node ids, run in this order with ``-x`` (the first failure kills)
    compile   workload-label substrings for ``kron_kernels.triton.targets --only`` (or empty)
    arch      the compile check's targets (sm_XX)
    survives  for an expected survivor: why, and the gpu test that kills it
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

KINDS = {
    "sign": "a sign flip in a backward",
    "scale": "a dropped scale factor",
    "swap": "a swapped pair (of factors, of gradients, of a butterfly's outputs)",
    "mask": "a mask off by one",
    "accumulation": "fp32 accumulation -> the output's 16-bit dtype",
    "precision": "a dot precision: IEEE -> TF32 for fp32 inputs",
    "compile": "a block size or launch configuration the GPU compiler rejects",
}
# further kinds, for a few families (no coverage requirement)
EXTRA_KINDS = {
    "stride": "an activation read as if contiguous",
    "dropout": "a backward that draws another dropout mask than its forward",
    "offsets": "int32 element offsets (wrong beyond 2^31 elements)",
    "stale": "a model-level bank that reuses what it built after its inputs changed or its graph was consumed",
}
FAMILIES = ("kron", "adapter", "bottleneck", "fwht", "fastfood")

NOT_APPLICABLE = {
    ("fwht", "precision"): "the fwht kernel has no tl.dot: its butterflies are fp32 additions, exact in any precision mode",
    ("fastfood", "precision"): "the Fastfood kernels have no tl.dot: butterflies, a gather and elementwise products in fp32",
    ("adapter", "accumulation"): "the adapter has no kernel of its own: it runs the bottleneck family's, whose "
                                 "accumulation bottleneck-accumulation-pre plants",
    ("adapter", "compile"): "the adapter has no kernel of its own: the bottleneck family's block sizes "
                            "(bottleneck-compile-rpad8), whose adapter launches the compile check compiles too",
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    family: str
    kind: str
    what: str
    edits: Tuple[Tuple[str, str, str], ...]
    tests: Tuple[str, ...]
    compile: Tuple[str, ...] = ()
    arch: Tuple[int, ...] = (90,)
    survives: str = ""


# ----------------------------------------------------------------------------------------
# test selections (pytest node ids; the cuda cases of each are skipped on a CPU machine)
# ----------------------------------------------------------------------------------------
KRON = "kron_kernels/triton/kron.py"
BOTTLENECK = "kron_kernels/triton/bottleneck.py"
FWHT = "kron_kernels/triton/fwht.py"
FASTFOOD = "kron_kernels/triton/fastfood.py"

K_TRITON = ("tests/ops/test_kron.py::test_kron_linear_triton_fp32", "tests/ops/test_kron.py::test_kron_matmul_triton_fp32",
            "tests/ops/test_kron.py::test_kron_linear_slices_triton_fp32")
K_LOW = ("tests/ops/test_kron.py::test_kron_linear_triton_low_precision",
         "tests/ops/test_kron.py::test_kron_linear_slices_triton_low_precision",
         "tests/ops/test_kron.py::test_triton_and_torch_backends_bf16_with_batch_dims")
A_TRITON = ("tests/ops/test_adapter.py::test_triton_matches_reference", "tests/ops/test_adapter.py::test_triton_cuda_tiles")
A_LOW = ("tests/ops/test_adapter.py::test_triton_low_precision", "tests/ops/test_adapter.py::test_autocast")
B_TRITON = ("tests/ops/test_bottleneck.py::test_arc_triton_matches_reference",
            "tests/ops/test_bottleneck.py::test_losa_triton_matches_reference",
            "tests/ops/test_bottleneck.py::test_triton_core_middle_and_cuda_tiles")
B_DROPOUT = ("tests/ops/test_bottleneck.py::test_arc_dropout_uses_one_mask_in_forward_and_backward",)
B_LOW = ("tests/ops/test_bottleneck.py::test_triton_low_precision",)
F_TRITON = ("tests/ops/test_fact_apply.py::test_triton_matches_reference",
            "tests/ops/test_fact_apply.py::test_triton_cuda_tiles")
W_TRITON = ("tests/ops/test_fwht.py::test_triton_interpreter_matches_scipy", "tests/ops/test_fwht.py::test_triton_multipass_split")
W_LOW = ("tests/ops/test_fwht.py::test_low_precision", "tests/ops/test_fwht.py::test_triton_multipass_split")
FF_TRITON = ("tests/ops/test_fastfood.py::test_triton_matches_dense",
             "tests/ops/test_fastfood.py::test_triton_generates_the_same_projection")
DOT_PRECISION = ("tests/ops/test_dot_precision.py",)

MUTANTS = [
    # ------------------------------------------------------------------ Kronecker (KAdaptation)
    Mutant("kron-sign-dV", "kron", "sign", "the backward kernel stores -dVf",
           ((KRON, "offs_j[None, :], dvf_acc,\n", "offs_j[None, :], -dvf_acc,\n"),), K_TRITON),
    Mutant("kron-scale-dU", "kron", "scale", "the backward kernel's dUf misses the scale",
           ((KRON, "offs_j[None, :], duf_acc * scale,\n", "offs_j[None, :], duf_acc,\n"),), K_TRITON),
    Mutant("kron-swap-dU-dV", "kron", "swap", "the launcher hands dVf back as dUf and dUf as dVf",
           ((KRON, "_unflatten_grads(dabar_part.sum(0), duf_part.sum(0), dvf_part.sum(0), m, r)",
             "_unflatten_grads(dabar_part.sum(0), dvf_part.sum(0), duf_part.sum(0), m, r)"),), K_TRITON),
    Mutant("kron-mask-p", "kron", "mask", "the backward kernel masks off the last of the p output columns",
           ((KRON, "    mask_p = offs_p < P\n    mask_q = offs_q < Q\n", "    mask_p = offs_p < P - 1\n    mask_q = offs_q < Q\n"),),
           K_TRITON),
    Mutant("kron-accumulation-chunks", "kron", "accumulation",
           "rank chunks add onto a 16-bit output (and dx) buffer instead of an fp32 one",
           ((KRON, "return torch.float32 if chunked else x2.dtype", "return x2.dtype"),), K_LOW),
    Mutant("kron-precision-tf32", "kron", "precision", "fp32 activations get TF32 dots",
           ((KRON, "        DOT_PRECISION=dot_precision(x2.dtype),", '        DOT_PRECISION="tf32",'),),
           K_TRITON[:1] + DOT_PRECISION),
    Mutant("kron-compile-bwd-dot-k8", "kron", "compile",
           "the backward's dU reduction over the BLOCK_N = 8 tokens of a block as a tl.dot with K = 8",
           ((KRON, "if BLOCK_N >= 16:", "if BLOCK_N >= 8:"),), K_TRITON, compile=("kron_linear ViT-B-r1",)),
    # subtler ones: a path only some shapes take (rank chunks, several token blocks per program)
    Mutant("kron-mask-bias-chunks", "kron", "mask", "the forward adds the bias in every rank chunk, not only the first",
           ((KRON, "mask=(offs_p < P) & (j0 == 0), other=0.0)", "mask=offs_p < P, other=0.0)"),), K_TRITON),
    Mutant("kron-mask-last-block", "kron", "mask", "the backward's persistent loop stops one token block early",
           ((KRON, "for blk in range(pid, n_blocks, n_progs):", "for blk in range(pid, n_blocks - 1, n_progs):"),), K_TRITON),
    Mutant("kron-stride-x", "kron", "stride", "the kernels read x's columns as if contiguous (column stride 1)",
           ((KRON, "cols[None, :, :] * stride_xk", "cols[None, :, :]"),),
           K_TRITON + ("tests/ops/test_kron.py::test_triton_non_contiguous_x",)),
    Mutant("kron-offsets-int32", "kron", "offsets", "the forward kernel's token offsets are int32",
           ((KRON, "    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)\n    mask_n = offs_n < n_rows\n",
             "    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)\n    mask_n = offs_n < n_rows\n"),), K_TRITON,
           survives="wrong only where an offset passes 2^31 elements: no CPU test holds that much (the interpreter "
                    "would take hours) and int32 arithmetic compiles; killed on a GPU by "
                    "tests/ops/test_kron.py::test_gpu_beyond_int32_offsets (2.8M ViT-B tokens, 4.3 GB of x)"),
    Mutant("kron-torch-sign-dA", "kron", "sign", "the torch backend's backward returns -dA",
           (("kron_kernels/ops/kron.py", "dA = torch.bmm(Pb.transpose(1, 2), T.view(m, r * n, a_in))",
             "dA = -torch.bmm(Pb.transpose(1, 2), T.view(m, r * n, a_in))"),),
           ("tests/ops/test_kron.py::test_kron_linear_torch_float64",)),
    Mutant("kron-dense-scale", "kron", "scale", "the dense composition adds the increments without the scale",
           (("kron_kernels/ops/kron.py", "P.permute(0, 1, 3, 2, 4), alpha=scale, out=_rows_view(w, g))",
             "P.permute(0, 1, 3, 2, 4), alpha=1.0, out=_rows_view(w, g))"),),
           ("tests/ops/test_dense.py::test_dense_kron_linear_float64",)),
    # ------------------------------------------------------------------ Compacter bottleneck adapter
    # (the bottleneck family's kernels and torch backend with a down bias: ops/adapter.py)
    Mutant("adapter-sign-down-bias-bwd", "adapter", "sign",
           "the backward kernel recomputes pre with the down bias subtracted",
           ((BOTTLENECK, "        if HAS_DOWN_BIAS:\n            pre += down_bias[None, :]",
             "        if HAS_DOWN_BIAS:\n            pre -= down_bias[None, :]"),), A_TRITON),
    Mutant("adapter-mask-down-bias-fwd", "adapter", "mask", "the forward kernel drops the down bias",
           ((BOTTLENECK, "pre += tl.load(down_bias_ptr + offs_r)[None, :]",
             "pre += tl.load(down_bias_ptr + offs_r, mask=offs_r < 0, other=0.0)[None, :]"),), A_TRITON),
    Mutant("adapter-scale-down-bias-grad", "adapter", "scale",
           "the kernel's down-bias gradient sums the middle's output gradient, not d_pre (GELU' missing)",
           ((BOTTLENECK, "ddown_bias_acc += tl.sum(d_pre, axis=0)", "ddown_bias_acc += tl.sum(d_y, axis=0)"),),
           A_TRITON),
    Mutant("adapter-scale-pdf", "adapter", "scale", "GELU's derivative misses the 1/sqrt(2 pi) of the normal pdf",
           ((BOTTLENECK, "pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI", "pdf = tl.exp(-0.5 * z * z)"),),
           A_TRITON + B_TRITON[1:2]),
    Mutant("adapter-mask-partial-init", "adapter", "mask",
           "a program's first row block adds onto its uninitialised partial sums instead of overwriting them",
           ((BOTTLENECK, "d_summed = tl.where(blk == pid, 0, D)", "d_summed = tl.where(blk == pid, D, D)"),),
           A_TRITON),
    Mutant("adapter-swap-weights", "adapter", "swap",
           "the adapter hands W_u as the down-projection and W_d^T as the up",
           (("kron_kernels/ops/adapter.py", "_apply_bottleneck(h2, None, w_down.t(), w_up.t(),",
             "_apply_bottleneck(h2, None, w_up, w_down,"),),
           ("tests/ops/test_adapter.py::test_torch_backend_matches_reference_fp64",)),
    Mutant("adapter-precision-autocast", "adapter", "precision",
           "the adapter's data precision ignores autocast (fp32 residual stream: IEEE dots where bf16's TF32 serve)",
           (("kron_kernels/ops/adapter.py", '_Spec("channel", "gelu", True, 0.0, 0, _data_dtype(h))',
             '_Spec("channel", "gelu", True, 0.0, 0, h.dtype)'),), DOT_PRECISION),
    Mutant("adapter-torch-mask-down-bias", "adapter", "mask", "the torch backend drops the down bias (channel mode)",
           (("kron_kernels/ops/bottleneck.py", "return torch.addmm(self.down_bias, x, self.down)",
             "return x @ self.down"),),
           ("tests/ops/test_adapter.py::test_torch_backend_matches_reference_fp64",)),
    Mutant("adapter-torch-scale-down-bias-grad", "adapter", "scale",
           "the torch backend's down-bias gradient sums d_y, not d_pre",
           (("kron_kernels/ops/bottleneck.py",
             'grads["ddown_bias"] = None if self.down_bias is None else self.r_sum(d_pre)',
             'grads["ddown_bias"] = None if self.down_bias is None else self.r_sum(d_y)'),),
           ("tests/ops/test_adapter.py::test_torch_backend_matches_reference_fp64",)),
    # ------------------------------------------------------------------ ARC, LoSA, FacT
    Mutant("bottleneck-sign-diag", "bottleneck", "sign", "ARC's backward negates d_pre (the diagonal middle)",
           ((BOTTLENECK, "d_pre = d_y * diag[None, :]", "d_pre = -d_y * diag[None, :]"),), B_TRITON),
    Mutant("bottleneck-scale-dropout", "bottleneck", "scale", "the forward's dropout drops the 1 / (1 - p) of kept values",
           ((BOTTLENECK, "a = tl.where(_keep(seed, offs_n, offs_r, R, p_drop), a * drop_scale, 0.0)",
             "a = tl.where(_keep(seed, offs_n, offs_r, R, p_drop), a, 0.0)"),), B_DROPOUT),
    Mutant("bottleneck-swap-down-up", "bottleneck", "swap", "the launcher pads Up^T into D^T's place and D^T into Up^T's (LoSA)",
           ((BOTTLENECK, "    down_t[:r] = down.t()\n    up_t_p = None\n    if up_t is not None:\n"
                         "        up_t_p = torch.zeros((r_pad, d), **f32)\n        up_t_p[:r] = up_t\n",
             "    down_t[:r] = down.t() if up_t is None else up_t\n    up_t_p = None\n    if up_t is not None:\n"
             "        up_t_p = torch.zeros((r_pad, d), **f32)\n        up_t_p[:r] = down.t()\n"),), B_TRITON),
    Mutant("bottleneck-mask-rows", "bottleneck", "mask", "the forward kernel masks off the last row",
           ((BOTTLENECK, "    mask_n = offs_n < n_rows\n    rows_x = _row_offsets(pid * BLOCK_N",
             "    mask_n = offs_n < n_rows - 1\n    rows_x = _row_offsets(pid * BLOCK_N"),), B_TRITON),
    Mutant("bottleneck-accumulation-pre", "bottleneck", "accumulation",
           "the forward's pre = x D accumulates in the output's 16-bit dtype across feature chunks",
           ((BOTTLENECK, "offs_d[:, None], mask=mask_d[:, None], other=0.0)\n"
                         "        pre = tl.dot(x, down, acc=pre, input_precision=DOT_PRECISION, out_dtype=tl.float32)\n",
             "offs_d[:, None], mask=mask_d[:, None], other=0.0)\n"
             "        pre = tl.dot(x, down, acc=pre, input_precision=DOT_PRECISION, out_dtype=tl.float32)"
             ".to(out_ptr.dtype.element_ty).to(tl.float32)\n"),), B_LOW),
    Mutant("bottleneck-precision-tf32", "bottleneck", "precision", "fp32 activations get TF32 dots (the ARC/LoSA forward)",
           ((BOTTLENECK, "HAS_DROPOUT=has_dropout,\n                DOT_PRECISION=dot_precision(data_dtype), R_PAD=r_pad)",
             'HAS_DROPOUT=has_dropout,\n                DOT_PRECISION="tf32", R_PAD=r_pad)'),),
           B_TRITON[:1] + DOT_PRECISION),
    Mutant("bottleneck-compile-rpad8", "bottleneck", "compile", "r padded to 8 (not 16): FacT r = 4 dots with K = 8",
           ((BOTTLENECK, "return max(16, triton.next_power_of_2(r))", "return max(8, triton.next_power_of_2(r))"),),
           F_TRITON, compile=("fact_linear ViT-S r4 rows3 p0.0",)),
    Mutant("bottleneck-mask-rows-blocked", "bottleneck", "mask",
           "the token mode's rows-blocked path (C a multiple of the row block) reads every block from its batch's first row",
           ((BOTTLENECK, "inner0 = tl.multiple_of(row0 % n_inner, BLOCK_N)", "inner0 = tl.multiple_of(row0 % BLOCK_N, BLOCK_N)"),),
           B_TRITON),
    Mutant("fact-sign-dpre", "bottleneck", "sign", "FacT's cols backward negates each slot's d_pre",
           ((BOTTLENECK, "                d_pre = tl.dot(d_a, tl.trans(core), input_precision=DOT_PRECISION, out_dtype=tl.float32)",
             "                d_pre = -tl.dot(d_a, tl.trans(core), input_precision=DOT_PRECISION, out_dtype=tl.float32)"),),
           F_TRITON),
    Mutant("fact-dropout-seed-bwd", "bottleneck", "dropout", "FacT's rows backward draws its mask with seed + 1",
           ((BOTTLENECK, "                d_a = _fact_drop(dt, seed, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)\n"
                         "                d_pre = tl.dot(d_a, tl.trans(core), acc=d_pre",
             "                d_a = _fact_drop(dt, seed + 1, offs_n, j, K, R, p_drop, drop_scale, scale, HAS_DROPOUT, R_PAD)\n"
             "                d_pre = tl.dot(d_a, tl.trans(core), acc=d_pre"),),
           F_TRITON + ("tests/ops/test_fact_apply.py::test_dropout_uses_one_mask_in_forward_and_backward",)),
    Mutant("fact-scale-s", "bottleneck", "scale", "FacT without dropout misses the scale s",
           ((BOTTLENECK, "        t = t * scale\n", "        t = t\n"),), F_TRITON),
    Mutant("fact-swap-UV", "bottleneck", "swap", "FacT's launcher swaps U and V",
           ((BOTTLENECK, "u_t[:r], v_t[:r] = U.detach().t(), V.detach().t()", "u_t[:r], v_t[:r] = V.detach().t(), U.detach().t()"),),
           F_TRITON),
    Mutant("fact-mask-features", "bottleneck", "mask", "FacT's down-projection masks off the last input feature",
           ((BOTTLENECK, "        mask_d = offs_d < D\n        tile = _load_rows(src_ptr",
             "        mask_d = offs_d < D - 1\n        tile = _load_rows(src_ptr"),), F_TRITON),
    Mutant("losa-torch-scale-pdf", "bottleneck", "scale", "the torch backend's GELU derivative misses 1/sqrt(2 pi)",
           (("kron_kernels/ops/bottleneck.py", "return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327",
             "return cdf + z * torch.exp(-0.5 * z * z)"),),
           ("tests/ops/test_bottleneck.py::test_losa_torch_matches_reference_fp64",)),
    # ------------------------------------------------------------------ Walsh-Hadamard transform
    Mutant("fwht-sign-backward", "fwht", "sign", "the backward transforms the gradient with -scale",
           (("kron_kernels/ops/fwht.py", "return FwhtFunction.apply(grad.contiguous(), ctx.scale, ctx.impl), None, None",
             "return FwhtFunction.apply(grad.contiguous(), -ctx.scale, ctx.impl), None, None"),), W_TRITON),
    Mutant("fwht-scale", "fwht", "scale", "the kernel stores x @ H without the scale",
           ((FWHT, "tl.store(y_ptr + offs, (x * scale).to(y_ptr.dtype.element_ty)", "tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty)"),),
           W_TRITON),
    Mutant("fwht-swap-butterfly", "fwht", "swap", "the butterfly joins (a - b, a + b) instead of (a + b, a - b)",
           ((FWHT, "tl.join(a + b, a - b)", "tl.join(a - b, a + b)"),), W_TRITON),
    Mutant("fwht-mask-vectors", "fwht", "mask", "the kernel masks off the last vector",
           ((FWHT, "mask_v = offs_v < n_vectors", "mask_v = offs_v < n_vectors - 1"),), W_TRITON),
    Mutant("fwht-accumulation-passes", "fwht", "accumulation",
           "between the passes of a long row, 16-bit rows stay in their dtype (one more rounding per pass)",
           ((FWHT, "buffer = torch.empty(x2.shape, device=x2.device, dtype=torch.float32)",
             "buffer = torch.empty(x2.shape, device=x2.device, dtype=out.dtype)"),), W_LOW),
    Mutant("fwht-compile-tile", "fwht", "compile",
           "the autotuned row pass's largest tile grows from 2^13 to 2^16 elements: 128 KiB of shared memory per "
           "block, a T4 has 64 (the fixed _TILE, which this mutant changed before 57e30d8, no longer serves CUDA "
           "rows of 2^8 and more: it survived from then on)",
           ((FWHT, "TILES = (1 << 11, 1 << 12, 1 << 13)", "TILES = (1 << 11, 1 << 12, 1 << 16)"),), W_TRITON,
           compile=("fwht n8192 rows32768 fp32",), arch=(75,)),
    # ------------------------------------------------------------------ Fastfood
    Mutant("fastfood-sign-transpose", "fastfood", "sign", "the transpose kernel subtracts each block's share",
           ((FASTFOOD, "acc += _hadamard(z, LB, LOG_LB) * sign", "acc -= _hadamard(z, LB, LOG_LB) * sign"),), FF_TRITON),
    Mutant("fastfood-scale-norm", "fastfood", "scale", "the forward misses the 1 / ||G_j|| normalisation",
           ((FASTFOOD, "x = _hadamard(x, LB, LOG_LB) * (inv_sqrt_D / norm)", "x = _hadamard(x, LB, LOG_LB) * inv_sqrt_D"),),
           FF_TRITON),
    Mutant("fastfood-swap-B-G", "fastfood", "swap", "the forward applies G where B belongs and B where G belongs",
           ((FASTFOOD, "    x = _hadamard(x * sign, LB, LOG_LB)\n    x = tl.gather(x, perm, 0) * gauss\n",
             "    x = _hadamard(x * gauss, LB, LOG_LB)\n    x = tl.gather(x, perm, 0) * sign\n"),), FF_TRITON),
    Mutant("fastfood-swap-Pi-inverse", "fastfood", "swap", "the transpose with explicit params gathers with Pi, not Pi^-1",
           ((FASTFOOD, "Pi = torch.argsort(Pi, dim=1)  # Pi^-1 of every row", "Pi = Pi  # Pi^-1 of every row"),), FF_TRITON),
    Mutant("fastfood-mask-theta", "fastfood", "mask", "the forward loads theta without its last element",
           ((FASTFOOD, "x = tl.load(theta_ptr + offs, mask=offs < d, other=0.0)", "x = tl.load(theta_ptr + offs, mask=offs < d - 1, other=0.0)"),),
           FF_TRITON),
    Mutant("fastfood-accumulation-partials", "fastfood", "accumulation",
           "the transpose's per-program partial sums (and their reduction) in bf16",
           ((FASTFOOD, "partial = torch.empty(n_programs, Lb, device=g.device, dtype=torch.float32)",
             "partial = torch.empty(n_programs, Lb, device=g.device, dtype=torch.bfloat16)"),), FF_TRITON),
    Mutant("fastfood-compile-warps", "fastfood", "compile",
           "a Fastfood block (Lb <= 2^13 elements in one program, fixed by d) spread over 6 warps: not a power of two",
           ((FASTFOOD, "return (8 if Lb >= 4096 else 4) if device.type", "return (8 if Lb >= 4096 else 6) if device.type"),),
           FF_TRITON, compile=("fastfood d1024",)),
    # ------------------------------------------------------------------ model-level banks, grouped targets
    Mutant("bank-ignores-versions", "kron", "stale", "a bank's stamp ignores the version: in-place updates go unseen",
           (("kron_kernels/nn/_bank.py", "for x in (id(t), t.data_ptr(), t._version))", "for x in (id(t), t.data_ptr()))"),),
           ("tests/nn/test_compacter.py::test_bank_follows_parameter_updates",
            "tests/nn/test_kadaptation.py::test_bank_accumulates_follows_updates_and_copies",
            "tests/nn/test_fact.py::test_core_bank_accumulates_and_follows_updates")),
    Mutant("bank-outlives-its-graph", "kron", "stale", "a backward never drops the set it consumed",
           (("kron_kernels/nn/_bank.py", "    out.register_hook(consumed)\n", "    pass\n"),),
           ("tests/nn/test_compacter.py::test_bank_builds_once_per_forward_and_is_dropped_by_the_backward",
            "tests/nn/test_kadaptation.py::test_bank_accumulates_follows_updates_and_copies",
            "tests/nn/test_fact.py::test_core_bank_accumulates_and_follows_updates")),
    Mutant("kron-deltas-dA-first-only", "kron", "scale", "kron_deltas' shared A gets the first increment's gradient only",
           (("kron_kernels/ops/kron.py", "grad_like(dA.sum(0), A)", "grad_like(dA[0], A)"),),
           ("tests/ops/test_kron.py::test_kron_deltas_float64",)),
    Mutant("kron-dense-group-step", "kron", "mask", "the grouped dense path reads every target's rows at the first's",
           (("kron_kernels/ops/kron.py", "rows = w.as_strided((K, g.rows, w.shape[1]), (g.step * s0, s0, s1)",
             "rows = w.as_strided((K, g.rows, w.shape[1]), (0, s0, s1)"),),
           ("tests/ops/test_dense.py::test_dense_grouped_targets_float64",)),

]
