"""The low-rank bottleneck family -- kk.fact_tt_delta, kk.fact_tk_delta, kk.arc, kk.losa_mixer --
against reference/fact.py, reference/arc.py, reference/losa.py, on every backend.

Ranks are deliberately not multiples of 16 (FacT r = 4/8, ARC r = 50, LoSA r = 8/64): the
kernels pad them to 16/64 with zero rows. The token axis is T = 197 (ViT-B) on the torch
backend and T = 37 under the Triton interpreter (small shapes keep it fast).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import conftest
import kron_kernels as kk
from kron_kernels.ops.bottleneck import dropout_keep_mask
from kron_kernels.reference import arc as ref_arc_module
from kron_kernels.reference import fact as ref_fact
from kron_kernels.reference import losa as ref_losa
from utils import (
    RTOL, TRITON_DEVICES, assert_low_precision_error, compare_low_precision, compare_with_reference, needs_interpreter,
    outputs_and_grads, rel_err,
)


def on_backend(name, fn):
    def run(*args):
        with kk.use_backend(name):
            return fn(*args)

    return run


def randn(gen, *shape, scale=1.0, dtype=torch.float64, device="cpu"):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------
# FacT increments
# ----------------------------------------------------------------------------------------
SCALE = 0.7
# (d, r, S): r = 4/8 are FacT's ranks, r = 50 a non-power of two; S = 144 is ViT-B's slot count
FACT_SHAPES = [
    pytest.param(96, 4, 5, id="d96-r4-S5"),
    pytest.param(200, 8, 12, id="d200-r8-S12"),
    pytest.param(64, 50, 3, id="d64-r50-S3"),
    pytest.param(16, 4, 144, id="d16-r4-S144"),
    pytest.param(768, 8, 3, id="vitb-d768-r8-S3"),  # ViT-B's width (torch code on every device)
]


def fact_inputs(d, r, S, tucker: bool, dtype=torch.float64, seed=0):
    """``[U, V, cores]`` or ``[U, V, C, P]``; V is random (not FacT's zero init) so every
    gradient is nonzero and checked."""
    gen = torch.Generator().manual_seed(seed)
    U, V = randn(gen, d, r, scale=d**-0.5, dtype=dtype), randn(gen, d, r, scale=d**-0.5, dtype=dtype)
    if tucker:
        rest = [randn(gen, r, r, r, scale=r**-0.5, dtype=dtype), randn(gen, S, r, dtype=dtype)]
    else:
        rest = [randn(gen, S, r, r, dtype=dtype)]
    return [t.requires_grad_() for t in [U, V, *rest]]


FACT_OPS = {
    "tt": (
        lambda U, V, cores: kk.fact_tt_delta(U, V, cores, SCALE),
        lambda U, V, cores: ref_fact.fact_tt_delta(U, V, cores, SCALE),
    ),
    "tk": (
        lambda U, V, C, P: kk.fact_tk_delta(U, V, C, P, SCALE),
        lambda U, V, C, P: ref_fact.fact_tk_delta(U, V, C, P, SCALE),
    ),
}


@pytest.mark.parametrize("fmt", ["tt", "tk"])
@pytest.mark.parametrize("d, r, S", FACT_SHAPES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")])
def test_fact_delta_matches_reference(fmt, d, r, S, dtype):
    fused, ref = FACT_OPS[fmt]
    # fp32 is judged against the exact (fp64) reference
    compare_with_reference(fused, ref, fact_inputs(d, r, S, fmt == "tk", dtype), RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("fmt", ["tt", "tk"])
def test_fact_delta_gradcheck(fmt):
    fused, _ = FACT_OPS[fmt]
    assert torch.autograd.gradcheck(fused, fact_inputs(7, 3, 4, fmt == "tk"))


def test_fact_delta_orientation_matches_fact_chain():
    """DESIGN.md 4.2: ``x @ delta[i].T`` is what FacT's chain ``FacTv(FacTs_i(FacTu(x))) * s``
    adds to slot i's output (and TK's slot cores are ``sum_t P[i, t] C[t]``)."""
    U, V, C, P = (t.detach() for t in fact_inputs(40, 4, 6, tucker=True))
    x = randn(torch.Generator().manual_seed(1), 9, 40)
    cores = ref_fact.fact_tk_cores(C, P)
    tt, tk = kk.fact_tt_delta(U, V, cores, SCALE), kk.fact_tk_delta(U, V, C, P, SCALE)
    for i in (0, 5):
        chain = ref_fact.fact_apply(x, U, V, cores[i], SCALE)
        assert rel_err(x @ tt[i].t(), chain) <= RTOL[torch.float64]
        assert rel_err(x @ tk[i].t(), chain) <= RTOL[torch.float64]
    qkv = ref_fact.fact_qkv(x, U, V, cores[:3], SCALE)
    assert rel_err(qkv, torch.cat([x @ tt[i].t() for i in range(3)], -1)) <= RTOL[torch.float64]


# ----------------------------------------------------------------------------------------
# ARC and the LoSA mixer: inputs and references
# ----------------------------------------------------------------------------------------
def arc_inputs(lead, d, r, *, bias=True, dtype=torch.float64, device="cpu", seed=0):
    """``[x, U, lam, (bias)]``. ``lam`` is random (ARC starts it at 0, which would make the
    branch and dU vanish) and the branch is as large as the residual."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(dtype=dtype, device=device)
    inputs = [randn(gen, *lead, d, **kw), randn(gen, d, r, scale=d**-0.5, **kw), randn(gen, r, **kw)]
    if bias:
        inputs.append(randn(gen, d, scale=0.5, **kw))
    return [t.requires_grad_() for t in inputs]


def arc_fns(bias: bool, dropout=0.0, seed=None, keep=None):
    """``(fused, reference)`` over the inputs as ``arc_inputs`` lays them out."""
    if bias:
        return (lambda x, U, lam, b: kk.arc(x, U, lam, b, dropout, seed=seed),
                lambda x, U, lam, b: ref_arc_module.arc(x, U, lam, b, dropout, keep))
    return (lambda x, U, lam: kk.arc(x, U, lam, None, dropout, seed=seed),
            lambda x, U, lam: ref_arc_module.arc(x, U, lam, None, dropout, keep))


def losa_inputs(shape, r, axis, *, dtype=torch.float64, device="cpu", seed=0, z_grad=True):
    """``[h, z, W_down, W_up, alpha]``: the GELU input ~N(0, 1) (its curved region, where a
    wrong derivative shows), W_up random (LoSA starts it at 0, which would hide dW_down)."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(dtype=dtype, device=device)
    n = shape[-1] if axis == "channel" else shape[-2]
    h, z = randn(gen, *shape, scale=0.5, **kw), randn(gen, *shape, scale=0.5, **kw)
    W_down, W_up = randn(gen, n, r, scale=(2 / n) ** 0.5, **kw), randn(gen, r, n, scale=r**-0.5, **kw)
    alpha = torch.tensor(0.8, **kw)
    return [h.requires_grad_(), z.requires_grad_(z_grad), W_down.requires_grad_(), W_up.requires_grad_(),
            alpha.requires_grad_()]


def losa_fns(axis):
    return (lambda h, z, wd, wu, a: kk.losa_mixer(h, z, wd, wu, a, axis),
            lambda h, z, wd, wu, a: ref_losa.losa_mixer(h, z, wd, wu, a, axis))


# (lead dims, d, r, bias): N = 1 and token tails, r = 4/8/50 (not multiples of 16)
ARC_SHAPES = [
    pytest.param((1,), 96, 4, True, id="N1-d96-r4"),
    pytest.param((37,), 200, 50, True, id="N37-d200-r50"),
    pytest.param((2, 5), 96, 8, True, id="B2x5-d96-r8"),
    pytest.param((19,), 48, 50, False, id="N19-d48-r50-nobias"),
]
# (shape, r, axis): channel C = 96/200, token T = 197 on torch
LOSA_SHAPES_TORCH = [
    pytest.param((2, 7, 96), 8, "channel", id="channel-B2-T7-C96-r8"),
    pytest.param((33, 200), 64, "channel", id="channel-N33-C200-r64"),
    pytest.param((2, 197, 24), 64, "token", id="token-B2-T197-C24-r64"),
    pytest.param((3, 2, 37, 20), 8, "token", id="token-B3x2-T37-C20-r8"),
]
# small ones for the interpreter
LOSA_SHAPES_TRITON = [
    pytest.param((2, 7, 96), 8, "channel", id="channel-B2-T7-C96-r8"),
    pytest.param((19, 40), 64, "channel", id="channel-N19-C40-r64"),
    pytest.param((2, 37, 20), 50, "token", id="token-B2-T37-C20-r50"),
    pytest.param((2, 37, 32), 64, "token", id="token-B2-T37-C32-r64-rows-blocked"),
    pytest.param((1, 2, 37, 9), 8, "token", id="token-B1x2-T37-C9-r8"),
]


# ----------------------------------------------------------------------------------------
# torch backend (float64 against the reference, gradcheck)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead, d, r, bias", ARC_SHAPES)
def test_arc_torch_matches_reference_fp64(lead, d, r, bias):
    fused, ref = arc_fns(bias)
    compare_with_reference(on_backend("torch", fused), ref, arc_inputs(lead, d, r, bias=bias), RTOL[torch.float64])


@pytest.mark.parametrize("shape, r, axis", LOSA_SHAPES_TORCH)
def test_losa_torch_matches_reference_fp64(shape, r, axis):
    fused, ref = losa_fns(axis)
    compare_with_reference(on_backend("torch", fused), ref, losa_inputs(shape, r, axis), RTOL[torch.float64])


@pytest.mark.parametrize("op", ["arc", "arc-dropout", "losa-channel", "losa-token"])
def test_torch_gradcheck(op):
    if op.startswith("arc"):
        # with dropout the seed fixes the mask, so the op is a deterministic function of its inputs
        fused, _ = arc_fns(True, dropout=0.3 if op == "arc-dropout" else 0.0, seed=11)
        inputs = arc_inputs((2, 3), 10, 3)
    else:
        axis = op.split("-")[1]
        fused, _ = losa_fns(axis)
        inputs = losa_inputs((2, 5, 6), 3, axis)
    assert torch.autograd.gradcheck(on_backend("torch", fused), inputs)


# ----------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU tensors, compiled on CUDA)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("lead, d, r, bias", ARC_SHAPES)
def test_arc_triton_matches_reference(lead, d, r, bias, device):
    fused, ref = arc_fns(bias)
    inputs = arc_inputs(lead, d, r, bias=bias, dtype=torch.float32, device=device)
    compare_with_reference(on_backend("triton", fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape, r, axis", LOSA_SHAPES_TRITON)
def test_losa_triton_matches_reference(shape, r, axis, device):
    fused, ref = losa_fns(axis)
    inputs = losa_inputs(shape, r, axis, dtype=torch.float32, device=device)
    compare_with_reference(on_backend("triton", fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)


LOW_PRECISION = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(
    "op, shape, r",
    [
        pytest.param("arc", (37,), 50, id="arc-N37-d96-r50"),
        pytest.param("channel", (19, 40), 64, id="losa-channel-N19-C40-r64"),
        pytest.param("token", (2, 37, 20), 8, id="losa-token-T37-C20-r8"),
    ],
)
def test_triton_low_precision(op, shape, r, dtype, device):
    """fp16/bf16 activations with fp32 factors, as in mixed-precision training."""
    if op == "arc":
        fused, ref = arc_fns(True)
        inputs = arc_inputs(shape, 96, r, dtype=torch.float32, device=device)
        activations = (0,)
    else:
        fused, ref = losa_fns(op)
        inputs = losa_inputs(shape, r, op, dtype=torch.float32, device=device)
        activations = (0, 1)
    compare_low_precision(on_backend("triton", fused), ref, inputs, dtype, activations=activations)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_core_middle_and_cuda_tiles(device):
    """The family's third middle (an r x r core, for FacT's fused application) through the
    launchers, without residual, with dropout; and CUDA-sized tiles (64-row blocks, 64-wide
    feature chunks) with a persistent backward grid whose programs own several row blocks."""
    from kron_kernels.triton import bottleneck as tb

    gen = torch.Generator().manual_seed(3)
    n, d, r, p = 197, 96, 8, 0.25
    x, down, up_t = randn(gen, n, d), randn(gen, d, r, scale=d**-0.5), randn(gen, r, d, scale=r**-0.5)
    core, dout = randn(gen, r, r), randn(gen, n, d)
    scale = torch.tensor(0.6, dtype=torch.float64)
    keep = tb.dropout_keep_mask(n, r, p, 5, device).cpu()
    f32 = [t.float().to(device) for t in (x, down, up_t, core, scale, dout)]
    kw = dict(mode="channel", middle="core", residual=False, p_drop=p, seed=5, data_dtype=torch.float32)
    tiles = dict(block_n=64, block_d=64)
    out = tb.bottleneck_forward(f32[0], None, f32[1], f32[2], f32[3], None, f32[4], None, **kw, **tiles)
    grads = tb.bottleneck_backward(f32[5], f32[0], None, f32[1], f32[2], f32[3], None, f32[4], **kw,
                                   need_dx=True, need_dx2=False, need_dw=True, num_programs=2, **tiles)
    leaves = [t.requires_grad_() for t in (x, down, up_t, core, scale)]
    want = scale * ((((x @ down) @ core) * keep / (1 - p)) @ up_t)
    want_grads = torch.autograd.grad(want, leaves, dout)
    assert rel_err(out, want) <= RTOL[torch.float32], "out"
    for name, w in zip(["dx", "ddown", "dup_t", "dcore", "dscale"], want_grads):
        assert rel_err(grads[name], w) <= RTOL[torch.float32], name


@pytest.mark.parametrize("impl, dtype, device", [
    pytest.param("torch", torch.float64, "cpu", id="torch-fp64"),
    pytest.param("triton", torch.float32, "cpu", id="triton-fp32-interpreter", marks=needs_interpreter),
    pytest.param("triton", torch.float32, "cuda", id="triton-fp32-cuda", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("mode", ["channel", "token"])
def test_down_bias(mode, impl, dtype, device):
    """The down-projection bias (the Compacter adapter's ``b_d``, ops/adapter.py) in both row
    layouts, with an input sum and a trainable scale: the output and every gradient, the bias's
    included, against the formula in float64."""
    from kron_kernels.ops import bottleneck as ops_bottleneck

    gen = torch.Generator().manual_seed(4)
    b, t, c, r = 3, 21, 10, 5
    n = c if mode == "channel" else t
    x1, x2 = randn(gen, b, t, c), randn(gen, b, t, c)
    down, up_t, down_bias = randn(gen, n, r, scale=n**-0.5), randn(gen, r, n, scale=r**-0.5), randn(gen, r)
    scale = torch.tensor(0.7, dtype=torch.float64)
    leaves = [v.requires_grad_() for v in (x1, x2, down, up_t, scale, down_bias)]

    def formula(x1, x2, down, up_t, scale, down_bias):
        x = x1 + x2
        x = x if mode == "channel" else x.transpose(1, 2)
        out = scale * (F.gelu(x @ down + down_bias) @ up_t)
        return x1 + (out if mode == "channel" else out.transpose(1, 2))

    def fused(x1, x2, down, up_t, scale, down_bias):
        spec = ops_bottleneck._Spec(mode, "gelu", True, 0.0, 0, x1.dtype)
        rows = (lambda v: v.reshape(-1, c)) if mode == "channel" else (lambda v: v)
        out = ops_bottleneck._apply_bottleneck(rows(x1), rows(x2), down, up_t, None, scale, None, spec, impl,
                                               down_bias=down_bias)
        return out.reshape(x1.shape)

    compare_with_reference(fused, formula, [v.detach().to(device, dtype).requires_grad_() for v in leaves],
                           RTOL[dtype], ref_dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# dropout: one mask per seed, used by forward and backward; p = 0 is no dropout; keep rate
# ----------------------------------------------------------------------------------------
# (implementation, dtype, device): the torch backend in float64 on the CPU, the Triton kernels
# in fp32 under the interpreter and on CUDA
BACKENDS = [
    pytest.param("torch", torch.float64, "cpu", id="torch-fp64"),
    pytest.param("triton", torch.float32, "cpu", id="triton-fp32-interpreter", marks=needs_interpreter),
    pytest.param("triton", torch.float32, "cuda", id="triton-fp32-cuda", marks=pytest.mark.gpu),
]
IMPL_DEVICES = [pytest.param(p.values[0], p.values[2], id=p.id.replace("-fp64", "").replace("-fp32", ""), marks=p.marks)
                for p in BACKENDS]
# the ops with a dense composition (ARC, LoSA) also take it on CUDA (auto's choice there)
BACKENDS_AND_DENSE = BACKENDS + [pytest.param("dense", torch.float32, "cuda", id="dense-fp32-cuda",
                                              marks=pytest.mark.gpu)]


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
def test_arc_dropout_uses_one_mask_in_forward_and_backward(impl, dtype, device):
    """The output and every gradient equal the reference run with the backend's own mask for
    the seed (kept values scaled by 1 / (1 - p)): a backward that drew a different mask, or
    forgot the scaling, would fail on the gradients."""
    p, seed, (lead, d, r) = 0.3, 1234, ((3, 13), 48, 50)
    inputs = arc_inputs(lead, d, r, dtype=dtype, device=device)
    keep = dropout_keep_mask(math.prod(lead), r, p, seed, device, impl).view(*lead, r)
    assert 0 < keep.sum() < keep.numel(), "the mask must drop some elements and keep others"
    fused, ref = arc_fns(True, dropout=p, seed=seed, keep=keep.to(dtype))
    compare_with_reference(on_backend(impl, fused), ref, inputs, RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
def test_dropout_seed_determinism(impl, dtype, device):
    x, U, lam, b = (t.detach() for t in arc_inputs((40,), 48, 8, dtype=dtype, device=device))
    with kk.use_backend(impl):
        first, again = (kk.arc(x, U, lam, b, 0.5, seed=7) for _ in range(2))
        other = kk.arc(x, U, lam, b, 0.5, seed=8)
        torch.manual_seed(0)
        drawn = kk.arc(x, U, lam, b, 0.5)
        torch.manual_seed(0)
        drawn_again = kk.arc(x, U, lam, b, 0.5)
    assert torch.equal(first, again), "same seed, same mask"
    assert not torch.equal(first, other), "another seed, another mask"
    assert torch.equal(drawn, drawn_again), "seed=None draws from torch's generator (torch.manual_seed)"


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
def test_dropout_zero_or_eval_is_no_dropout(impl, dtype, device):
    inputs = arc_inputs((21,), 48, 8, dtype=dtype, device=device)
    with kk.use_backend(impl):
        plain = kk.arc(*inputs)
        zero = kk.arc(*inputs, dropout=0.0, seed=3)
        evaluating = kk.arc(*inputs, dropout=0.4, training=False)
    assert torch.equal(plain, zero) and torch.equal(plain, evaluating)
    assert rel_err(plain, ref_arc_module.arc(*inputs)) <= RTOL[dtype]


@pytest.mark.parametrize("impl, device", IMPL_DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(impl, device, p):
    """The keep rate of 4096 x 50 draws is 1 - p within 5 binomial standard deviations
    (sigma = sqrt(p (1 - p) / n) ~ 1e-3): a biased or correlated generator fails."""
    n, r = 4096, 50
    keep = dropout_keep_mask(n, r, p, 99, device, impl).double()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(keep.mean().item() - (1 - p)) <= 5 * sigma
    # rows and columns are independent: no column (r index) is kept far more often than others
    col_sigma = math.sqrt(p * (1 - p) / n)
    assert (keep.mean(0) - (1 - p)).abs().max().item() <= 5 * col_sigma


# ----------------------------------------------------------------------------------------
# layouts: non-contiguous activations, stride-0 gradients, empty batches, frozen inputs
# ----------------------------------------------------------------------------------------
# (make a leaf holding the values, the non-contiguous view of it that reaches the op); the
# leaf is the input so that the comparison helper's clone keeps the layout
LAYOUTS = {
    "transposed": (lambda t: t.transpose(-1, -2).contiguous(), lambda base: base.transpose(-1, -2)),
    "strided": (lambda t: torch.cat([t, t], -1), lambda base: base[..., : base.shape[-1] // 2]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
@pytest.mark.parametrize("op", ["arc", "channel", "token"])
def test_noncontiguous_inputs(op, impl, dtype, device, layout):
    make_base, view = LAYOUTS[layout]
    if op == "arc":
        x, *rest = arc_inputs((18,), 48, 6, dtype=dtype, device=device)
        acts, (fused, ref) = [x], arc_fns(True)
    else:
        # C = 16: the token mode's rows-blocked path (C % BLOCK_N == 0) with arbitrary strides
        h, z, *rest = losa_inputs((2, 37, 16), 8, op, dtype=dtype, device=device)
        acts, (fused, ref) = [h, z], losa_fns(op)
    bases = [make_base(t.detach()).requires_grad_() for t in acts]
    assert not view(bases[0]).is_contiguous() and torch.equal(view(bases[0]), acts[0])
    k = len(bases)

    def fused_view(*args):
        return on_backend(impl, fused)(*[view(b) for b in args[:k]], *args[k:])

    def ref_view(*args):
        return ref(*[view(b) for b in args[:k]], *args[k:])

    compare_with_reference(fused_view, ref_view, bases + rest, RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
@pytest.mark.parametrize("op", ["arc", "token"])
def test_stride0_grad_output(op, impl, dtype, device):
    """``out.sum().backward()`` hands the backward an expanded (all strides 0) gradient."""
    if op == "arc":
        inputs, (fused, ref) = arc_inputs((3, 7), 96, 6, dtype=dtype, device=device), arc_fns(True)
    else:
        inputs, (fused, ref) = losa_inputs((2, 37, 12), 8, op, dtype=dtype, device=device), losa_fns(op)
    with kk.use_backend(impl):
        got = torch.autograd.grad(fused(*inputs).sum(), inputs)
    want = torch.autograd.grad(ref(*inputs).sum(), inputs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) <= RTOL[dtype], f"grad[{i}]"


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
def test_empty_batch(impl, dtype, device):
    inputs = arc_inputs((0, 3), 48, 6, dtype=dtype, device=device)
    losa = losa_inputs((0, 37, 5), 8, "token", dtype=dtype, device=device)
    with kk.use_backend(impl):
        for fn, ins in ((arc_fns(True)[0], inputs), (losa_fns("token")[0], losa)):
            out = fn(*ins)
            grads = torch.autograd.grad(out, ins, torch.ones_like(out))
            assert out.shape == ins[0].shape
            for g in grads[2:]:
                assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_losa_frozen_backbone_output(axis, impl, dtype, device):
    """LoSA's z comes from the no-grad backbone: no dz is computed, the rest is right; and
    with frozen weights and alpha only dh is."""
    fused, ref = losa_fns(axis)
    inputs = losa_inputs((2, 37, 12), 8, axis, dtype=dtype, device=device, z_grad=False)
    compare_with_reference(on_backend(impl, fused), ref, inputs, RTOL[dtype], ref_dtype=torch.float64)
    only_h = [t.detach().requires_grad_(i == 0) for i, t in enumerate(inputs)]
    compare_with_reference(on_backend(impl, fused), ref, only_h, RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
def test_arc_partly_frozen(impl, dtype, device):
    """x from a frozen layer (no dx: the backward's weight-gradient-only path), or frozen
    factors (dx only)."""
    fused, ref = arc_fns(True)
    inputs = arc_inputs((37,), 96, 50, dtype=dtype, device=device)
    for trainable in ([False, True, True, True], [True, False, False, False], [False, True, False, False]):
        partly = [t.detach().requires_grad_(train) for t, train in zip(inputs, trainable)]
        compare_with_reference(on_backend(impl, fused), ref, partly, RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("impl, dtype, device", BACKENDS_AND_DENSE)
def test_losa_float_alpha(impl, dtype, device):
    h, z, wd, wu, _ = losa_inputs((5, 24), 8, "channel", dtype=dtype, device=device)
    with kk.use_backend(impl):
        out = kk.losa_mixer(h, z, wd, wu, 0.25)
    assert rel_err(out, ref_losa.losa_mixer(h, z, wd, wu, 0.25)) <= RTOL[dtype]


def test_auto_backend_on_cpu_is_torch_and_fp64_refuses_triton(monkeypatch):
    """auto on CPU tensors takes the torch backend (what the op's own select call returns)."""
    x, U, lam, b = arc_inputs((4,), 8, 2)
    chosen, real = [], kk.backend.select
    with monkeypatch.context() as patch:
        patch.setattr(kk.backend, "select", lambda *a, **kw: chosen.append(real(*a, **kw)) or chosen[-1])
        kk.arc(x, U, lam, b)
        kk.losa_mixer(*losa_inputs((2, 5, 6), 3, "token"), axis="token")
    assert chosen == ["torch", "torch"]
    if conftest.INTERPRET:
        with kk.use_backend("triton"), pytest.raises(kk.BackendUnavailableError, match="float64"):
            kk.arc(x, U, lam, b)


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def _arc_bad(**changes):
    x, U, lam, b = (t.detach() for t in arc_inputs((4,), 8, 2, dtype=torch.float32))
    args = dict(x=x, U=U, lam=lam, bias=b)
    args.update({name: change(args) for name, change in changes.items()})
    return args


def _losa_bad(axis="channel", **changes):
    h, z, wd, wu, a = (t.detach() for t in losa_inputs((3, 5, 6), 2, axis, dtype=torch.float32))
    args = dict(h=h, z=z, W_down=wd, W_up=wu, alpha=a, axis=axis)
    args.update({name: change(args) for name, change in changes.items()})
    return args


def _fact_bad(cores_or_C=(4, 2, 2), P=None, V=(8, 2), dtype=torch.float32):
    args = dict(U=torch.ones(8, 2), V=torch.ones(*V))
    if P is None:
        args["cores"] = torch.ones(*cores_or_C)
    else:
        args.update(C=torch.ones(*cores_or_C, dtype=dtype), P=torch.ones(*P))
    return args


def _bad(op, args, error, match, id):
    return pytest.param(op, args, error, match, id=id)


ARC, LOSA, TT, TK = kk.arc, kk.losa_mixer, kk.fact_tt_delta, kk.fact_tk_delta
BAD_INPUTS = [
    _bad(ARC, _arc_bad(x=lambda a: a["x"].numpy()), TypeError, "x must be a torch.Tensor", "arc-x-numpy"),
    _bad(ARC, _arc_bad(x=lambda a: a["x"][:, :5]), ValueError, "x's last dim must be d = 8", "arc-x-wrong-d"),
    _bad(ARC, _arc_bad(x=lambda a: a["x"].long()), TypeError, "x must have dtype", "arc-x-int"),
    _bad(ARC, _arc_bad(U=lambda a: a["U"][None]), ValueError, "U must be 2-D", "arc-U-3d"),
    _bad(ARC, _arc_bad(lam=lambda a: a["lam"][:1]), ValueError, r"lam must have shape \(r,\)", "arc-lam-wrong-r"),
    _bad(ARC, _arc_bad(bias=lambda a: a["bias"][:3]), ValueError, "bias must have shape", "arc-bias-wrong-d"),
    _bad(ARC, _arc_bad(U=lambda a: a["U"].to("meta")), ValueError, "U is on meta", "arc-U-other-device"),
    _bad(ARC, _arc_bad(dropout=lambda a: 1.0), ValueError, r"dropout must be in \[0, 1\)", "arc-dropout-1"),
    _bad(ARC, _arc_bad(dropout=lambda a: 0.1, seed=lambda a: 1.5), TypeError, "seed must be an int", "arc-seed-float"),
    _bad(LOSA, _losa_bad(z=lambda a: a["z"][:, :4]), ValueError, "z must have h's shape", "losa-z-shape"),
    _bad(LOSA, _losa_bad(z=lambda a: a["z"].half()), TypeError, "z has dtype", "losa-z-dtype"),
    _bad(LOSA, _losa_bad(W_down=lambda a: a["W_down"].t()), ValueError, "W_down must have shape", "losa-W_down-t"),
    _bad(LOSA, _losa_bad(W_up=lambda a: a["W_up"][:1]), ValueError, "W_up must have shape", "losa-W_up-wrong-r"),
    _bad(LOSA, _losa_bad(alpha=lambda a: torch.ones(2)), ValueError, "alpha must have one element", "losa-alpha-2"),
    _bad(LOSA, _losa_bad(alpha=lambda a: "big"), TypeError, "alpha must be a real number", "losa-alpha-str"),
    _bad(LOSA, _losa_bad(axis=lambda a: "time"), ValueError, "axis must be 'channel' or 'token'", "losa-axis"),
    _bad(LOSA, _losa_bad("token", W_down=lambda a: a["W_down"][:4]), ValueError, r"W_down must have shape \(T",
         "losa-token-W_down-wrong-T"),
    _bad(LOSA, _losa_bad("token", h=lambda a: a["h"][0, 0], z=lambda a: a["z"][0, 0]), ValueError,
         "h must have at least 2 dims", "losa-token-1d"),
    _bad(TT, _fact_bad(V=(8, 3)), ValueError, "V must have the shape of U", "tt-V-rank"),
    _bad(TT, _fact_bad((4, 2)), ValueError, "cores must be 3-D", "tt-cores-2d"),
    _bad(TT, _fact_bad((4, 3, 3)), ValueError, r"cores must have shape \(S, r, r\)", "tt-cores-wrong-r"),
    _bad(TK, _fact_bad((2, 2, 3), P=(4, 2)), ValueError, r"C must have shape \(r, r, r\)", "tk-C-shape"),
    _bad(TK, _fact_bad((2, 2, 2), P=(4, 3)), ValueError, r"P must have shape \(S, r\)", "tk-P-shape"),
    _bad(TK, _fact_bad((2, 2, 2), P=(4, 2), dtype=torch.int32), TypeError, "C must have dtype", "tk-C-int"),
]


@pytest.mark.parametrize("op, args, error, match", BAD_INPUTS)
def test_bad_input(op, args, error, match):
    with pytest.raises(error, match=match):
        op(**args)


# ----------------------------------------------------------------------------------------
# CUDA at ViT-B/L sizes
# ----------------------------------------------------------------------------------------
GPU_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


# auto takes the dense composition for ARC and LoSA on CUDA (ops/bottleneck.py _CUDA_AUTO): the
# implementations are named
GPU_IMPLS = ["triton", "dense"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("d", [pytest.param(768, id="vitb-d768"), pytest.param(1024, id="vitl-d1024")])
def test_cuda_arc_vit_sizes(d, dtype, impl):
    inputs = arc_inputs((64, 197), d, 50, dtype=torch.float32, device="cuda")
    fused, ref = arc_fns(True)
    if dtype == torch.float32:
        compare_with_reference(on_backend(impl, fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)
    else:
        compare_low_precision(on_backend(impl, fused), ref, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("d", [pytest.param(768, id="vitb-d768"), pytest.param(1024, id="vitl-d1024")])
def test_cuda_losa_vit_sizes(d, axis, dtype, impl):
    inputs = losa_inputs((64, 197, d), 64, axis, dtype=torch.float32, device="cuda", z_grad=False)
    fused, ref = losa_fns(axis)
    if dtype == torch.float32:
        compare_with_reference(on_backend(impl, fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)
    else:
        compare_low_precision(on_backend(impl, fused), ref, inputs, dtype, activations=(0, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("p", [0.1])
def test_cuda_arc_dropout(p, impl):
    """Each implementation with its own mask for the seed (dense: the torch backend's)."""
    lead, d, r = (64, 197), 768, 50
    inputs = arc_inputs(lead, d, r, dtype=torch.float32, device="cuda")
    keep = dropout_keep_mask(math.prod(lead), r, p, 42, "cuda", impl).view(*lead, r)
    assert abs(keep.float().mean().item() - (1 - p)) < 5e-3
    fused, ref = arc_fns(True, dropout=p, seed=42, keep=keep.float())
    compare_with_reference(on_backend(impl, fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# autocast: fp32 activations (a timm ViT's residual stream) in a bf16 autocast region
# ----------------------------------------------------------------------------------------
class _GemmDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The input dtypes of every matrix product run inside the mode."""

    GEMMS = ("mm", "bmm", "addmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.GEMMS:
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


AUTOCAST_CASES = [
    pytest.param(lambda: (arc_inputs((4, 9), 48, 8, dtype=torch.float32), arc_fns(True)), id="arc"),
    pytest.param(lambda: (losa_inputs((3, 9, 40), 8, "channel", dtype=torch.float32, z_grad=False),
                          losa_fns("channel")), id="losa-channel"),
    pytest.param(lambda: (losa_inputs((3, 37, 20), 8, "token", dtype=torch.float32, z_grad=False),
                          losa_fns("token")), id="losa-token"),
]


@pytest.mark.parametrize("case", AUTOCAST_CASES)
def test_dense_follows_autocast(case):
    """Under bf16 autocast the dense composition (auto's CUDA path for ARC and LoSA) runs every
    GEMM, forward and backward, in bf16, as the reference's matmuls do there; the result and
    the input gradient keep fp32. (It ran fp32 FFMA GEMMs on an H200, commit 93d8659: ARC
    0.81x its reference.) The values obey the low-precision rule against the reference run
    under the same autocast, both judged against float64."""
    inputs, (fused, ref) = case()
    cotangent = None

    def run(fn, leaves, autocast):
        nonlocal cotangent
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*leaves)
        if cotangent is None:
            cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        wrt = [t for t in leaves if t.requires_grad]
        return [out, *torch.autograd.grad(out, wrt, cotangent.to(out.dtype))]

    with kk.use_backend("dense"), _GemmDtypes() as mode:
        got = run(fused, inputs, True)
    assert mode.seen and all(dtypes == {torch.bfloat16} for dtypes in mode.seen), mode.seen
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    naive = run(ref, inputs, True)
    exact = run(ref, [t.double() for t in inputs], False)
    for i, (g, n, e) in enumerate(zip(got, naive, exact)):
        assert_low_precision_error(f"output/grad {i}", g, e, n, e, torch.bfloat16)


DENSE_CASES = [
    pytest.param(lambda: (arc_inputs((5, 7), 16, 4), arc_fns(True)), id="arc"),
    pytest.param(lambda: (arc_inputs((5, 7), 16, 4), arc_fns(True, dropout=0.3, seed=3)), id="arc-dropout"),
    pytest.param(lambda: (losa_inputs((3, 9, 40), 8, "channel"), losa_fns("channel")), id="losa-channel"),
    pytest.param(lambda: (losa_inputs((2, 3, 37, 20), 8, "token"), losa_fns("token")), id="losa-token"),
]


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_matches_torch_backend_fp64(case):
    """The dense composition (auto's CUDA path) on the CPU in float64: output and every gradient
    equal the torch backend's, dropout included (the same mask for a seed; its 1 / (1 - p)
    folded into ARC's diagonal)."""
    inputs, (fused, _) = case()
    got = outputs_and_grads(on_backend("dense", fused), inputs)
    want = outputs_and_grads(on_backend("torch", fused), inputs)
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) <= RTOL[torch.float64], name
