"""kk.bottleneck_adapter (the Compacter adapter) against reference/compacter.py, on every backend."""
import math

import pytest
import torch

import kron_kernels as kk
from kron_kernels.reference.compacter import bottleneck_adapter as ref_adapter
from utils import (RTOL, TRITON_DEVICES, assert_low_precision_error, compare_low_precision, compare_with_reference,
                   needs_interpreter, outputs_and_grads, rel_err)


def make_inputs(lead, d, k, *, dtype=torch.float64, device="cpu", bias=True, seed=0):
    """``[h, w_down, (b_down), w_up, (b_up)]``, all requiring grad.

    Scaled so that the pre-activation is ~N(0, 1) (GELU's curved region, where a wrong
    derivative shows) and the adapter's branch is as large as the residual ``h``.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    h = randn(*lead, d)
    w_down, b_down = randn(k, d, scale=1 / math.sqrt(d)), randn(k, scale=0.5)
    w_up, b_up = randn(d, k, scale=1 / math.sqrt(k)), randn(d, scale=0.5)
    inputs = [h, w_down, b_down, w_up, b_up] if bias else [h, w_down, w_up]
    return [t.requires_grad_() for t in inputs]


def adapter_fns(bias: bool):
    """``(fused, reference)`` taking the inputs as ``make_inputs`` lays them out."""
    if bias:
        return kk.bottleneck_adapter, ref_adapter
    return (
        lambda h, wd, wu: kk.bottleneck_adapter(h, wd, None, wu, None),
        lambda h, wd, wu: ref_adapter(h, wd, None, wu, None),
    )


def on_backend(name, fn):
    def run(*args):
        with kk.use_backend(name):
            return fn(*args)

    return run


# (lead dims, d, k, bias): odd d and k (k = 3, 6, 24 are not powers of two), token tails
SHAPES = [
    pytest.param((1,), 48, 3, True, id="N1-d48-k3"),
    pytest.param((7,), 96, 6, True, id="N7-d96-k6"),
    pytest.param((37,), 200, 24, True, id="N37-d200-k24"),
    pytest.param((37,), 96, 3, False, id="N37-d96-k3-nobias"),
    pytest.param((2, 5), 48, 24, True, id="B2x5-d48-k24"),
]


# ----------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead, d, k, bias", SHAPES)
def test_torch_backend_matches_reference_fp64(lead, d, k, bias):
    fn, ref = adapter_fns(bias)
    compare_with_reference(on_backend("torch", fn), ref, make_inputs(lead, d, k, bias=bias), RTOL[torch.float64])


@pytest.mark.parametrize("bias", [pytest.param(True, id="bias"), pytest.param(False, id="nobias")])
def test_torch_backend_gradcheck(bias):
    fn, _ = adapter_fns(bias)
    inputs = make_inputs((2, 3), 10, 3, bias=bias)
    assert torch.autograd.gradcheck(on_backend("torch", fn), inputs)


# ----------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU tensors, compiled on CUDA)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("lead, d, k, bias", SHAPES)
def test_triton_matches_reference(lead, d, k, bias, device):
    """The bottleneck family's kernels (triton/bottleneck.py) with the adapter's down bias."""
    fn, ref = adapter_fns(bias)
    inputs = make_inputs(lead, d, k, dtype=torch.float32, bias=bias, device=device)
    compare_with_reference(on_backend("triton", fn), ref, inputs, RTOL[torch.float32])


def test_triton_refuses_float64():
    """The Triton kernels take 16-bit and fp32 activations (as every bottleneck op's)."""
    inputs = make_inputs((4,), 48, 3)
    with kk.use_backend("triton"), pytest.raises(kk.BackendUnavailableError, match="float64"):
        kk.bottleneck_adapter(*inputs)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize(
    "lead, d, k",
    [pytest.param((37,), 200, 24, id="N37-d200-k24"), pytest.param((7,), 96, 6, id="N7-d96-k6")],
)
def test_triton_low_precision(lead, d, k, dtype, device):
    """bf16/fp16 activations with fp32 weights, as in mixed-precision training."""
    inputs = make_inputs(lead, d, k, dtype=torch.float32, device=device)
    compare_low_precision(on_backend("triton", kk.bottleneck_adapter), ref_adapter, inputs, dtype)


# ----------------------------------------------------------------------------------------
# layouts: non-contiguous h, stride-0 gradients, empty batches (both backends)
# ----------------------------------------------------------------------------------------
# each layout: (make a leaf holding h's values, the non-contiguous (.., d) view of it that
# reaches the op). The leaf, not the view, is the input so that the helper's clone of it keeps
# the layout.
LAYOUTS = {
    "transposed": (lambda h: h.t().contiguous(), lambda base: base.t()),  # strides (1, N)
    "row-strided": (lambda h: torch.cat([h, h], 1), lambda base: base[:, : base.shape[1] // 2]),  # (2d, 1)
    "batch-permuted": (  # 3-D view whose batch dims do not collapse: the op must reshape-copy
        lambda h: h.reshape(-1, 2, h.shape[1]).transpose(0, 1).contiguous(),
        lambda base: base.transpose(0, 1),
    ),
}


# (implementation, dtype, device): the torch backend in float64 on the CPU; the Triton kernels
# in fp32 under the interpreter and on CUDA; the dense composition (auto's choice on CUDA) there
BACKENDS = [
    pytest.param("torch", torch.float64, "cpu", id="torch-fp64"),
    pytest.param("triton", torch.float32, "cpu", id="triton-fp32-interpreter", marks=needs_interpreter),
    pytest.param("triton", torch.float32, "cuda", id="triton-fp32-cuda", marks=pytest.mark.gpu),
    pytest.param("dense", torch.float32, "cuda", id="dense-fp32-cuda", marks=pytest.mark.gpu),
]
IMPL_DEVICES = [pytest.param(p.values[0], p.values[2], id=p.id.replace("-fp64", "").replace("-fp32", ""), marks=p.marks)
                for p in BACKENDS]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_noncontiguous_h(impl, dtype, device, layout):
    h, *weights = make_inputs((18,), 48, 6, dtype=dtype, device=device)
    make_base, view = LAYOUTS[layout]
    base = make_base(h.detach()).requires_grad_()
    assert not view(base).is_contiguous() and torch.equal(view(base).reshape(h.shape), h)

    def fused(base, *w):
        return on_backend(impl, kk.bottleneck_adapter)(view(base), *w)

    def ref(base, *w):
        return ref_adapter(view(base), *w)

    compare_with_reference(fused, ref, [base] + weights, RTOL[dtype])


@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_stride0_grad_output(impl, dtype, device):
    """``out.sum().backward()`` hands the backward an expanded (all strides 0) gradient."""
    inputs = make_inputs((3, 7), 96, 6, dtype=dtype, device=device)
    with kk.use_backend(impl):
        got = torch.autograd.grad(kk.bottleneck_adapter(*inputs).sum(), inputs)
    want = torch.autograd.grad(ref_adapter(*inputs).sum(), inputs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) <= RTOL[dtype], f"grad[{i}]"


@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_empty_batch(impl, dtype, device):
    inputs = make_inputs((0, 3), 48, 6, dtype=dtype, device=device)
    with kk.use_backend(impl):
        out = kk.bottleneck_adapter(*inputs)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert out.shape == (0, 3, 48)
    assert grads[0].shape == inputs[0].shape
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_cuda_tiles(device):
    """CUDA-sized tiles (64-token blocks, 64-wide d chunks) and a persistent grid whose
    programs own several token blocks, through the bottleneck launchers as the adapter calls
    them (the op picks small tiles on CPU)."""
    from kron_kernels.triton import bottleneck as triton_bottleneck

    inputs = make_inputs((197,), 96, 24, dtype=torch.float32, device=device)
    h, w_down, b_down, w_up, b_up = (t.detach() for t in inputs)
    one = torch.ones((), device=h.device)
    tiles = dict(block_n=64, block_d=64)
    spec = dict(mode="channel", middle="gelu", residual=True, p_drop=0.0, seed=None, data_dtype=h.dtype,
                down_bias=b_down)
    out = triton_bottleneck.bottleneck_forward(h, None, w_down.t(), w_up.t(), None, None, one, b_up, **spec, **tiles)
    dout = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(h.device)
    grads = triton_bottleneck.bottleneck_backward(
        dout, h, None, w_down.t(), w_up.t(), None, None, one, **spec, need_dx=True, need_dx2=False, need_dw=True,
        num_programs=3, **tiles
    )
    leaves = [t.double().requires_grad_() for t in (h, w_down, b_down, w_up, b_up)]
    want_out = ref_adapter(*leaves)
    want = torch.autograd.grad(want_out, leaves, dout.double())
    assert rel_err(out, want_out) <= RTOL[torch.float32], "out"
    got = [grads["dx"], grads["ddown"].t(), grads["ddown_bias"], grads["dup_t"].t(), grads["dbias"]]
    for name, g, w in zip(["dh", "dw_down", "db_down", "dw_up", "db_up"], got, want):
        assert rel_err(g, w) <= RTOL[torch.float32], name


@pytest.mark.parametrize("impl, dtype, device", BACKENDS)
def test_frozen_h_or_frozen_weights(impl, dtype, device):
    """h from a frozen backbone (no dh) or frozen weights (no weight gradients): the backward
    computes only what is asked, and that correctly."""
    inputs = make_inputs((37,), 96, 6, dtype=dtype, device=device)
    fused = on_backend(impl, kk.bottleneck_adapter)
    for trainable in ([True, False, False, False, False], [False, True, True, True, True]):
        partly_frozen = [t.detach().requires_grad_(train) for t, train in zip(inputs, trainable)]
        compare_with_reference(fused, ref_adapter, partly_frozen, RTOL[dtype], ref_dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# autocast: projections at the autocast precision, residual in h's dtype (as the reference)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl, device", IMPL_DEVICES)
def test_autocast(impl, device):
    """Under bf16 autocast the output and every gradient keep float32 and obey the
    low-precision rule against the float64 reference, with the reference run under the same
    autocast as the naive budget (utils.assert_low_precision_error)."""
    # k = 24 (ViT-B's Compacter width), so that even the b_down gradient has a few dozen elements
    inputs = make_inputs((37,), 96, 24, dtype=torch.float32, device=device)
    exact = outputs_and_grads(ref_adapter, [t.double() for t in inputs])
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        naive = outputs_and_grads(ref_adapter, inputs)
        got = outputs_and_grads(on_backend(impl, kk.bottleneck_adapter), inputs)
    assert got["out"].dtype == naive["out"].dtype == torch.float32
    for name in exact:
        assert got[name].dtype == torch.float32, name
        assert_low_precision_error(name, got[name], exact[name], naive[name], exact[name], torch.bfloat16)


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def _bad(**changes):
    h, w_down, b_down, w_up, b_up = (t.detach() for t in make_inputs((4,), 8, 2, dtype=torch.float32))
    args = dict(h=h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    args.update({name: change(args) for name, change in changes.items()})
    return args


BAD_INPUTS = [
    pytest.param(_bad(h=lambda a: a["h"].numpy()), TypeError, "h must be a torch.Tensor", id="h-not-tensor"),
    pytest.param(_bad(h=lambda a: a["h"][:, :5]), ValueError, "h's last dim must be d = 8", id="h-wrong-d"),
    pytest.param(_bad(h=lambda a: a["h"].long()), TypeError, "h must have dtype", id="h-int"),
    pytest.param(_bad(h=lambda a: a["h"].sum()), ValueError, "h must have at least 1 dims", id="h-scalar"),
    pytest.param(_bad(w_down=lambda a: a["w_down"][None]), ValueError, "w_down must be 2-D", id="w_down-3d"),
    pytest.param(_bad(w_down=lambda a: a["w_down"].int()), TypeError, "w_down must have dtype", id="w_down-int"),
    pytest.param(
        _bad(w_up=lambda a: a["w_up"].t()), ValueError, r"w_up must have shape \(d, k\)", id="w_up-transposed"
    ),
    pytest.param(_bad(w_up=lambda a: a["w_up"][:, :1]), ValueError, "w_up must have shape", id="w_up-wrong-k"),
    pytest.param(_bad(b_down=lambda a: a["b_down"][:1]), ValueError, "b_down must have shape", id="b_down-wrong-k"),
    pytest.param(_bad(b_up=lambda a: a["b_up"][None]), ValueError, "b_up must be 1-D", id="b_up-2d"),
    pytest.param(_bad(b_up=lambda a: a["b_up"].bool()), TypeError, "b_up must have dtype", id="b_up-bool"),
    pytest.param(_bad(w_down=lambda a: a["w_down"][:0]), ValueError, "k, d >= 1", id="k-zero"),
    pytest.param(_bad(w_up=lambda a: a["w_up"].to("meta")), ValueError, "w_up is on meta", id="w_up-other-device"),
]


@pytest.mark.parametrize("args, error, match", BAD_INPUTS)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        kk.bottleneck_adapter(**args)


# ----------------------------------------------------------------------------------------
# CUDA at ViT-B/L sizes
# ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "dense"])  # auto takes dense on CUDA (ops/adapter.py _CUDA_AUTO)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize(
    "d, k", [pytest.param(768, 24, id="vitb-d768-k24"), pytest.param(1024, 32, id="vitl-d1024-k32")]
)
def test_cuda_vit_sizes(d, k, dtype, impl):
    inputs = make_inputs((64, 197), d, k, dtype=torch.float32, device="cuda")
    fused = on_backend(impl, kk.bottleneck_adapter)
    if dtype == torch.float32:
        compare_with_reference(fused, ref_adapter, inputs, RTOL[torch.float32], ref_dtype=torch.float64)
    else:
        compare_low_precision(fused, ref_adapter, inputs, dtype)
