"""kk.fact_apply / kk.fact_linear -- FacT's slots applied to activations (DESIGN.md 4.2) -- on
the torch backend and on the Triton kernels, against a float64 per-slot reference built from
``reference/fact.py`` (FacT's chain, ``x @ U`` recomputed for every slot).

Shapes are deliberately odd: d = 96/200/40, r = 3/8/20 (padded to 16/32 in the kernels),
N = 1/7/37/197, batch dims, k = 1/3/4 slots. The Triton cases stay small: the interpreter
runs them on the CPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import conftest
import kron_kernels as kk
from kron_kernels.ops.bottleneck import dropout_keep_mask
from kron_kernels.reference import fact as ref_fact
from utils import RTOL, TRITON_DEVICES, compare_low_precision, compare_with_reference, needs_interpreter, rel_err

SCALE = 0.7


def on_backend(name, fn):
    def run(*args):
        with kk.use_backend(name):
            return fn(*args)

    return run


def randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def fact_inputs(lead, d, r, k, split, *, linear=False, dtype=torch.float64, device="cpu", seed=0, weight_grad=False):
    """``[x, U, V, cores]`` (``linear``: ``[x, weight, bias, U, V, cores]``). V is random (FacT
    starts it at zero, which would hide dU and dcores) and the increment is about as large as
    the frozen Linear's output, so an error in either shows."""
    gen = torch.Generator().manual_seed(seed)
    width, d_out = (d, k * d) if split == "rows" else (k * d, d)
    x = randn(gen, *lead, width)
    U, V = randn(gen, d, r, scale=d**-0.5), randn(gen, d, r, scale=r**-0.5)
    cores = randn(gen, k, r, r, scale=r**-0.5)
    tensors = [x, U, V, cores]
    if linear:
        tensors[1:1] = [randn(gen, d_out, width, scale=width**-0.5), randn(gen, d_out, scale=0.5)]
    trainable = [True] * len(tensors)
    if linear:
        trainable[1] = trainable[2] = weight_grad  # the frozen Linear
    return [t.to(device=device, dtype=dtype).requires_grad_(g) for t, g in zip(tensors, trainable)]


def reference(x, U, V, cores, split, p=0.0, keep=None):
    """Per slot ``s * drop((x_j @ U) @ cores[j]) @ V.T`` as FacT's chain; ``keep (..., k, r)``."""
    k, d = cores.shape[0], U.shape[0]
    outs = [
        ref_fact.fact_apply(x if split == "rows" else x[..., j * d:(j + 1) * d], U, V, cores[j], SCALE, p,
                            None if keep is None else keep[..., j, :])
        for j in range(k)
    ]
    return torch.cat(outs, -1) if split == "rows" else sum(outs)


def fns(split, linear, p=0.0, seed=None, keep=None):
    """``(fused, reference)`` over the inputs as :func:`fact_inputs` lays them out."""
    kw = dict(scale=SCALE, dropout=p, split=split, seed=seed)
    if linear:
        return (lambda x, W, b, U, V, C: kk.fact_linear(x, W, b, U, V, C, **kw),
                lambda x, W, b, U, V, C: F.linear(x, W, b) + reference(x, U, V, C, split, p, keep))
    return (lambda x, U, V, C: kk.fact_apply(x, U, V, C, **kw),
            lambda x, U, V, C: reference(x, U, V, C, split, p, keep))


# (lead dims, d, r, k, split)
SHAPES_TORCH = [
    pytest.param((7,), 96, 8, 3, "rows", id="rows-N7-d96-r8-k3"),
    pytest.param((1,), 200, 3, 1, "rows", id="rows-N1-d200-r3-k1"),
    pytest.param((2, 197), 96, 20, 4, "rows", id="rows-B2xN197-d96-r20-k4"),
    pytest.param((197,), 96, 8, 4, "cols", id="cols-N197-d96-r8-k4"),
    pytest.param((2, 7), 200, 3, 3, "cols", id="cols-B2x7-d200-r3-k3"),
    pytest.param((1,), 96, 20, 1, "cols", id="cols-N1-d96-r20-k1"),
]
# small ones for the interpreter; the 16-row blocks leave tails for N = 7, 37, 197
SHAPES_TRITON = [
    pytest.param((7,), 96, 8, 3, "rows", id="rows-N7-d96-r8-k3"),
    pytest.param((1,), 200, 3, 1, "rows", id="rows-N1-d200-r3-k1"),
    pytest.param((2, 5), 40, 20, 4, "rows", id="rows-B2x5-d40-r20-k4"),
    pytest.param((197,), 40, 3, 3, "rows", id="rows-N197-d40-r3-k3"),
    pytest.param((37,), 96, 8, 4, "cols", id="cols-N37-d96-r8-k4"),
    pytest.param((2, 3), 200, 3, 3, "cols", id="cols-B2x3-d200-r3-k3"),
    pytest.param((1,), 40, 20, 1, "cols", id="cols-N1-d40-r20-k1"),
]
OPS = [pytest.param(False, id="apply"), pytest.param(True, id="linear")]


# ----------------------------------------------------------------------------------------
# forward and every gradient against the float64 reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("linear", OPS)
@pytest.mark.parametrize("lead, d, r, k, split", SHAPES_TORCH)
def test_torch_matches_reference_fp64(lead, d, r, k, split, linear):
    fused, ref = fns(split, linear)
    inputs = fact_inputs(lead, d, r, k, split, linear=linear, weight_grad=True)
    compare_with_reference(on_backend("torch", fused), ref, inputs, RTOL[torch.float64])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("linear", OPS)
@pytest.mark.parametrize("lead, d, r, k, split", SHAPES_TRITON)
def test_triton_matches_reference(lead, d, r, k, split, linear, device):
    fused, ref = fns(split, linear)
    inputs = fact_inputs(lead, d, r, k, split, linear=linear, dtype=torch.float32, device=device)
    compare_with_reference(on_backend("triton", fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)


@pytest.mark.parametrize("split, k", [("rows", 3), ("cols", 4), ("rows", 1)], ids=["rows-k3", "cols-k4", "rows-k1"])
@pytest.mark.parametrize("linear", OPS)
def test_torch_gradcheck(split, k, linear):
    """Dropout with a fixed seed is a deterministic function of the inputs, so gradcheck
    covers the masked backward too."""
    fused, _ = fns(split, linear, p=0.3, seed=11)
    inputs = fact_inputs((2, 3), 6, 3, k, split, linear=linear, weight_grad=True)
    assert torch.autograd.gradcheck(on_backend("torch", fused), inputs)


LOW_PRECISION = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("split, k", [("rows", 3), ("cols", 4)], ids=["rows-k3", "cols-k4"])
def test_triton_low_precision(split, k, dtype, device):
    """fp16/bf16 activations and frozen Linear, fp32 factors, as in mixed-precision training."""
    fused, ref = fns(split, linear=True)
    inputs = fact_inputs((37,), 96, 8, k, split, linear=True, dtype=torch.float32, device=device)
    compare_low_precision(on_backend("triton", fused), ref, inputs, dtype, activations=(0, 1, 2))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("split", ["rows", "cols"])
def test_triton_cuda_tiles(split, device):
    """CUDA-sized tiles (64-row blocks, 64-wide feature chunks) and a persistent backward grid
    whose programs own several row blocks and accumulate every slot into one partial sum."""
    from kron_kernels.triton import bottleneck as tb

    lead, d, r, k, p = (197,), 96, 8, 3, 0.25
    x, U, V, cores = fact_inputs(lead, d, r, k, split)
    keep = dropout_keep_mask(197 * k, r, p, 5, device, "triton").cpu().view(197, k, r)
    dout = randn(torch.Generator().manual_seed(1), 197, k * d if split == "rows" else d)
    f32 = [t.detach().float().to(device) for t in (x, U, V, cores, dout)]
    kw = dict(split=split, scale=SCALE, p_drop=p, seed=5, block_n=64, block_d=64)
    out = tb.fact_forward(f32[0], None, None, *f32[1:4], **kw)
    grads = tb.fact_backward(f32[4], f32[0], None, *f32[1:4], **kw, need_dx=True, need_dw=True, num_programs=2)
    want = reference(x, U, V, cores, split, p, keep.double())
    want_grads = torch.autograd.grad(want, [x, U, V, cores], dout)
    assert rel_err(out, want) <= RTOL[torch.float32], "out"
    for name, w in zip(["dx", "dU", "dV", "dcores"], want_grads):
        assert rel_err(grads[name], w) <= RTOL[torch.float32], name


# ----------------------------------------------------------------------------------------
# dropout: one mask per (seed, row, slot, rank index), in forward and backward
# ----------------------------------------------------------------------------------------
# (implementation, dtype, device): the torch backend in float64 on the CPU, the Triton kernels
# (auto's choice on CUDA) in fp32 under the interpreter and on CUDA, the dense composition
# (measured against them on the next GPU run) in float64 on the CPU and fp32 on CUDA
BACKENDS = [
    pytest.param("torch", torch.float64, "cpu", id="torch-fp64"),
    pytest.param("triton", torch.float32, "cpu", id="triton-fp32-interpreter", marks=needs_interpreter),
    pytest.param("triton", torch.float32, "cuda", id="triton-fp32-cuda", marks=pytest.mark.gpu),
    pytest.param("dense", torch.float64, "cpu", id="dense-fp64"),
    pytest.param("dense", torch.float32, "cuda", id="dense-fp32-cuda", marks=pytest.mark.gpu),
]
IMPL_DEVICES = [pytest.param(p.values[0], p.values[2], id=p.id.replace("-fp64", "").replace("-fp32", ""), marks=p.marks)
                for p in BACKENDS]


@pytest.mark.parametrize("split", ["rows", "cols"])
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_dropout_uses_one_mask_in_forward_and_backward(impl, dtype, device, split):
    """Output and every gradient equal the reference run with the backend's documented mask
    (``dropout_keep_mask`` for N*k rows, viewed (N, k, r)): a backward that drew another mask,
    a mask not keyed by the slot, or a missing 1/(1-p) would fail."""
    p, seed, lead, d, r, k = 0.3, 1234, (3, 13), 40, 8, 3
    inputs = fact_inputs(lead, d, r, k, split, linear=True, dtype=dtype, device=device)
    keep = dropout_keep_mask(math.prod(lead) * k, r, p, seed, device, impl).view(*lead, k, r)
    assert 0 < keep.sum() < keep.numel(), "the mask must drop some elements and keep others"
    assert not torch.equal(keep[..., 0, :], keep[..., 1, :]), "the slots must draw different masks"
    fused, ref = fns(split, True, p=p, seed=seed, keep=keep.to(dtype))
    compare_with_reference(on_backend(impl, fused), ref, inputs, RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_dropout_seed_determinism(impl, dtype, device):
    x, U, V, cores = (t.detach() for t in fact_inputs((40,), 24, 4, 3, "rows", dtype=dtype, device=device))
    with kk.use_backend(impl):
        first, again = (kk.fact_apply(x, U, V, cores, dropout=0.5, seed=7) for _ in range(2))
        other = kk.fact_apply(x, U, V, cores, dropout=0.5, seed=8)
        torch.manual_seed(0)
        drawn = kk.fact_apply(x, U, V, cores, dropout=0.5)
        torch.manual_seed(0)
        drawn_again = kk.fact_apply(x, U, V, cores, dropout=0.5)
    assert torch.equal(first, again), "same seed, same mask"
    assert not torch.equal(first, other), "another seed, another mask"
    assert torch.equal(drawn, drawn_again), "seed=None draws from torch's generator (torch.manual_seed)"


@pytest.mark.parametrize("split", ["rows", "cols"])
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_dropout_zero_or_eval_is_no_dropout(impl, dtype, device, split):
    inputs = [t.detach() for t in fact_inputs((21,), 24, 4, 3, split, dtype=dtype, device=device)]
    kw = dict(scale=SCALE, split=split)
    with kk.use_backend(impl):
        plain = kk.fact_apply(*inputs, **kw)
        zero = kk.fact_apply(*inputs, **kw, dropout=0.0, seed=3)
        evaluating = kk.fact_apply(*inputs, **kw, dropout=0.4, training=False)
    assert torch.equal(plain, zero) and torch.equal(plain, evaluating)
    assert rel_err(plain, reference(*inputs, split)) <= RTOL[dtype]


@pytest.mark.parametrize("impl, device", IMPL_DEVICES)
def test_dropout_keep_rate_per_slot(impl, device):
    """Each slot's keep rate over 2048 x 16 draws is 1 - p within 5 binomial standard
    deviations (sigma = sqrt(p (1 - p) / n) ~ 2.6e-3 at p = 0.3)."""
    n, k, r, p = 2048, 4, 16, 0.3
    keep = dropout_keep_mask(n * k, r, p, 99, device, impl).view(n, k, r).double()
    sigma = math.sqrt(p * (1 - p) / (n * r))
    assert (keep.mean(dim=(0, 2)) - (1 - p)).abs().max().item() <= 5 * sigma


# ----------------------------------------------------------------------------------------
# fact_linear is F.linear + fact_apply; layouts; frozen parts; empty batches
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["rows", "cols"])
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_fact_linear_is_linear_plus_fact_apply(impl, dtype, device, split):
    """fact_linear equals F.linear + fact_apply with the same dropout seed, and both (output
    and every gradient) equal the float64 reference ``F.linear(x, W, b) + s * drop((x_j @ U)
    @ cores[j]) @ V.T`` per slot, run with the backend's documented mask for that seed."""
    lead, p, seed, r, k = (2, 9), 0.2, 21, 4, 3
    inputs = fact_inputs(lead, 24, r, k, split, linear=True, dtype=dtype, device=device, weight_grad=True)
    kw = dict(scale=SCALE, dropout=p, split=split, seed=seed)
    with kk.use_backend(impl):
        fused = kk.fact_linear(*inputs, **kw)
        split_up = F.linear(*inputs[:3]) + kk.fact_apply(inputs[0], *inputs[3:], **kw)
    assert rel_err(fused, split_up) <= RTOL[dtype]
    keep = dropout_keep_mask(math.prod(lead) * k, r, p, seed, device, impl).view(*lead, k, r)
    linear, ref = fns(split, True, p=p, seed=seed, keep=keep.to(dtype))
    apply, _ = fns(split, False, p=p, seed=seed)
    compare_with_reference(on_backend(impl, linear), ref, inputs, RTOL[dtype], ref_dtype=torch.float64)
    compare_with_reference(on_backend(impl, lambda x, W, b, *f: F.linear(x, W, b) + apply(x, *f)), ref, inputs,
                           RTOL[dtype], ref_dtype=torch.float64)


# (make a leaf holding the values, the non-contiguous view of it that reaches the op)
LAYOUTS = {
    "transposed": (lambda t: t.transpose(-1, -2).contiguous(), lambda base: base.transpose(-1, -2)),
    "strided": (lambda t: torch.cat([t, t], -1), lambda base: base[..., : base.shape[-1] // 2]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("split", ["rows", "cols"])
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_noncontiguous_x(impl, dtype, device, split, layout):
    make_base, view = LAYOUTS[layout]
    x, *rest = fact_inputs((2, 9), 24, 4, 3, split, linear=True, dtype=dtype, device=device)
    base = make_base(x.detach()).requires_grad_()
    assert not view(base).is_contiguous() and torch.equal(view(base), x)
    fused, ref = fns(split, True)
    compare_with_reference(lambda b, *a: on_backend(impl, fused)(view(b), *a), lambda b, *a: ref(view(b), *a),
                           [base, *rest], RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("split", ["rows", "cols"])
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_stride0_grad_output(impl, dtype, device, split):
    """``out.sum().backward()`` hands the backward an expanded (all strides 0) gradient."""
    inputs = fact_inputs((3, 7), 40, 3, 3, split, linear=True, dtype=dtype, device=device)
    fused, ref = fns(split, True)
    with kk.use_backend(impl):
        got = torch.autograd.grad(fused(*inputs).sum(), [t for t in inputs if t.requires_grad])
    want = torch.autograd.grad(ref(*inputs).sum(), [t for t in inputs if t.requires_grad])
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) <= RTOL[dtype], f"grad[{i}]"


@pytest.mark.parametrize("trainable", [pytest.param([False, True, True, True, True, True], id="no-dx"),
                                       pytest.param([True, False, False, False, False, False], id="dx-only"),
                                       pytest.param([False, False, False, True, False, True], id="U-cores")])
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_partly_frozen(impl, dtype, device, trainable):
    """x from a frozen layer (the weight-gradient-only backward), frozen factors (dx only,
    one program per row block), a subset of the factors; weight/bias gradients when asked."""
    inputs = fact_inputs((19,), 40, 8, 3, "rows", linear=True, dtype=dtype, device=device)
    partly = [t.detach().requires_grad_(train) for t, train in zip(inputs, trainable)]
    fused, ref = fns("rows", True)
    compare_with_reference(on_backend(impl, fused), ref, partly, RTOL[dtype], ref_dtype=torch.float64)


@pytest.mark.parametrize("split", ["rows", "cols"])
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_empty_batch(impl, dtype, device, split):
    inputs = fact_inputs((0, 3), 24, 4, 3, split, linear=True, dtype=dtype, device=device, weight_grad=True)
    with kk.use_backend(impl):
        out = fns(split, True)[0](*inputs)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert out.shape == (0, 3, inputs[1].shape[0])
    for g, t in zip(grads[1:], inputs[1:]):
        assert torch.equal(g, torch.zeros_like(t))


def test_backend_selection(monkeypatch):
    """auto on CPU is torch (what the op's own select call returns); the Triton backend refuses
    float64 by name; there is no CUDA extension kernel for FacT, and an explicit ``cuda``
    backend says so."""
    inputs = [t.detach() for t in fact_inputs((4,), 8, 2, 3, "rows")]
    chosen, real = [], kk.backend.select
    with monkeypatch.context() as patch:
        patch.setattr(kk.backend, "select", lambda *a, **kw: chosen.append(real(*a, **kw)) or chosen[-1])
        kk.fact_apply(*inputs)
    assert chosen == ["torch"]
    with kk.use_backend("cuda"), pytest.raises(kk.BackendUnavailableError, match="no compiled kernel for fact_apply"):
        kk.fact_apply(*inputs)
    if conftest.INTERPRET:
        with kk.use_backend("triton"), pytest.raises(kk.BackendUnavailableError, match="float64"):
            kk.fact_apply(*inputs)


def test_autocast_runs_in_the_autocast_dtype():
    x, W, b, U, V, cores = (t.detach().float() for t in fact_inputs((5,), 8, 2, 3, "rows", linear=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kk.fact_linear(x, W, b, U, V, cores, scale=SCALE)
    assert out.dtype == torch.bfloat16
    want = F.linear(x, W, b) + reference(x, U, V, cores, "rows")
    assert rel_err(out, want) <= 2**-7  # bf16 inputs and output: a few units of its 2^-8 precision


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
D, R = 16, 3


def _args(**changes):
    args = dict(x=torch.zeros(2, D), weight=torch.zeros(3 * D, D), bias=torch.zeros(3 * D), U=torch.zeros(D, R),
                V=torch.zeros(D, R), cores=torch.zeros(3, R, R))
    args.update(changes)
    return args


def _bad(op, changes, error, match, id):
    return pytest.param(op, changes, error, match, id=id)


APPLY, LINEAR = "apply", "linear"
BAD_INPUTS = [
    _bad(APPLY, dict(x=torch.zeros(2, D + 1)), ValueError, r"x's last dim must be d = 16", "x-rows"),
    _bad(APPLY, dict(split="cols"), ValueError, r"x's last dim must be k \* d = 48 for split='cols'", "x-cols"),
    _bad(APPLY, dict(cores=torch.zeros(3, R, R + 1)), ValueError, r"cores must have shape \(k, r, r\)", "cores"),
    _bad(APPLY, dict(cores=torch.zeros(R, R)), ValueError, "cores must be 3-D", "cores-2d"),
    _bad(APPLY, dict(V=torch.zeros(D, R + 1)), ValueError, "V must have the shape of U", "V"),
    _bad(APPLY, dict(split="diag"), ValueError, "split must be 'rows' or 'cols'", "split"),
    _bad(APPLY, dict(dropout=1.5), ValueError, r"dropout must be in \[0, 1\)", "dropout"),
    _bad(APPLY, dict(dropout=0.1, seed=1.5), TypeError, "seed must be an int", "seed-float"),
    _bad(APPLY, dict(scale=torch.ones(())), TypeError, "scale must be a Python number", "scale-tensor"),
    _bad(APPLY, dict(x=torch.zeros(2, D, dtype=torch.int64)), TypeError, "x must have dtype in", "x-dtype"),
    _bad(APPLY, dict(x=torch.zeros(2, D, device="meta")), ValueError, "x is on meta", "x-device"),
    _bad(LINEAR, dict(weight=torch.zeros(D, D)), ValueError, r"weight must have shape \(out, in\) = \(48, 16\)",
         "weight-shape"),
    _bad(LINEAR, dict(weight=None), TypeError, "weight must be a torch.Tensor", "weight-none"),
    _bad(LINEAR, dict(bias=torch.zeros(D)), ValueError, r"bias must have shape \(48,\)", "bias-shape"),
    _bad(LINEAR, dict(weight=torch.zeros(3 * D, D, dtype=torch.float64)), TypeError, "weight has dtype", "weight-dtype"),
    _bad(LINEAR, dict(bias=torch.zeros(3 * D, device="meta")), ValueError, "bias is on meta", "bias-device"),
]


@pytest.mark.parametrize("op, changes, error, match", BAD_INPUTS)
def test_bad_input(op, changes, error, match):
    args = _args(**changes)
    if op == APPLY:
        del args["weight"], args["bias"]
        call = kk.fact_apply
    else:
        call = kk.fact_linear
    with pytest.raises(error, match=match):
        call(**args)


# ----------------------------------------------------------------------------------------
# CUDA at ViT-B sizes: the compiled kernels against the float64 reference (and the naive
# reference in bf16 for the low-precision rule)
# ----------------------------------------------------------------------------------------
VIT_B = [
    pytest.param(8, 3, "rows", id="qkv-r8-k3"),
    pytest.param(16, 4, "rows", id="fc1-r16-k4"),
    pytest.param(8, 4, "cols", id="fc2-r8-k4"),
    pytest.param(16, 1, "rows", id="proj-r16-k1"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "dense"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("r, k, split", VIT_B)
def test_cuda_vit_b(r, k, split, dtype, impl):
    """The Triton kernels (auto's choice for FacT on CUDA, ops/bottleneck.py _CUDA_AUTO) and the
    dense composition they are measured against, named."""
    inputs = fact_inputs((8, 197), 768, r, k, split, linear=True, dtype=torch.float32, device="cuda")
    fused, ref = fns(split, True)
    if dtype == torch.float32:
        compare_with_reference(on_backend(impl, fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)
    else:
        compare_low_precision(on_backend(impl, fused), ref, inputs, dtype, activations=(0, 1, 2))


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("r, k, split", [pytest.param(8, 3, "rows", id="rows-r8-k3"),
                                         pytest.param(4, 4, "cols", id="cols-r4-k4")])
def test_dense_low_precision(r, k, split, dtype):
    """The dense composition with 16-bit activations and frozen Linear, fp32 factors, on the
    CPU: the low-precision rule against the naive reference run in that dtype."""
    inputs = fact_inputs((4, 37), 48, r, k, split, linear=True, dtype=torch.float32)
    fused, ref = fns(split, True)
    compare_low_precision(on_backend("dense", fused), ref, inputs, dtype, activations=(0, 1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["rows", "cols"])
def test_cuda_dropout_vit_b(split):
    p, seed, lead, k = 0.1, 42, (8, 197), 4
    inputs = fact_inputs(lead, 768, 8, k, split, linear=True, dtype=torch.float32, device="cuda")
    keep = dropout_keep_mask(math.prod(lead) * k, 8, p, seed, "cuda", "triton").view(*lead, k, 8)
    assert abs(keep.float().mean().item() - (1 - p)) < 5e-3  # ~ 10 sigma for 50k draws
    fused, ref = fns(split, True, p=p, seed=seed, keep=keep.float())
    compare_with_reference(on_backend("triton", fused), ref, inputs, RTOL[torch.float32], ref_dtype=torch.float64)
