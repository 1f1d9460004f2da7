"""torch.compile: every adapted model (every method, ViT and Swin) compiles with fullgraph=True,
without a graph break, to the eager results; the ops' custom-op registrations pass
``torch.library.opcheck``; a change of backend recompiles rather than reusing a stale graph.

The model tests use the ``aot_eager`` backend: Dynamo captures the graph and AOTAutograd
traces forward and backward through the ops' fake and autograd registrations -- everything
that can break -- and runs it without Inductor's code generation, which on a 2-core CI host
would cost a minute per model. One test per op family runs the full Inductor path.
"""
import pytest
import torch

import kron_kernels as kk
from kron_kernels.ops import bottleneck as bottleneck_ops
from kron_kernels.ops import kron as kron_ops
from test_adapt import adapted, images, perturb
from test_swin import SWIN_METHODS, adapted as swin_adapted, images as swin_images
from utils import INTERPRET, needs_interpreter, outputs_and_grads

# (backend, method) pairs the CPU can run: the structured torch code and the Triton kernels
# under the interpreter for every method; the dense compositions of the methods that have one
CPU_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton-interpreter", marks=needs_interpreter),
]
DENSE_METHODS = ("kadaptation", "compacter", "arc", "losa")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def graph_breaks(fn, *args) -> int:
    explained = torch._dynamo.explain(fn)(*args)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, f"graph breaks: {reasons}"
    return explained.graph_count


def step(model, x, seed=0):
    """Output and the trainable parameters' gradients of one step with a fixed cotangent."""
    out = model(x)
    params = {k.replace("_orig_mod.", ""): p for k, p in model.named_parameters() if p.requires_grad}
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(params.values()), cot.to(device=out.device, dtype=out.dtype))
    return {"out": out.detach(), **dict(zip(params, grads))}


def assert_same(got, want, tol):
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        scale = want[name].abs().max().item()
        assert err <= tol * max(scale, 1e-30), f"{name}: max abs error {err:.3g} vs scale {scale:.3g}"


# The compiled graph runs the same kernels on the same inputs as eager; what may differ is
# the order of the few fp32 additions Dynamo's functionalised graph performs around them
# (residuals, the attention's softmax after AOTAutograd's decompositions): a few fp32 ulps
# relative to each output's largest entry.
TOL = 1e-5


def check_compiled_model(model, x):
    """In training mode, so FacT's and ARC's default dropout (0.1, seed drawn per call from
    torch's generator) is on: aot_eager runs the graph's seed draw on torch's generator in
    eager's order, so after the same ``torch.manual_seed`` both steps draw the same masks."""
    perturb(model, 3)
    model.train()
    assert graph_breaks(model, x) == 1
    torch.manual_seed(5)
    want = step(model, x)
    torch.manual_seed(5)
    got = step(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    assert_same(got, want, TOL)


# ----------------------------------------------------------------------------- ViT and Swin models
@pytest.mark.slow
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("method", kk.METHODS)
def test_adapted_vit_compiles_whole(method, backend_name):
    """No graph break, one graph, and the eager model's outputs and adapter gradients."""
    model = adapted(method)
    with kk.use_backend(backend_name):
        check_compiled_model(model, images())


@pytest.mark.slow
@pytest.mark.parametrize("method", DENSE_METHODS)
def test_adapted_vit_compiles_whole_dense(method):
    """The dense (cuBLAS-first) compositions, auto's choice on CUDA, are traced into the graph."""
    model = adapted(method)
    with kk.use_backend("dense"):
        check_compiled_model(model, images())


@pytest.mark.slow
@pytest.mark.parametrize("method", SWIN_METHODS)
def test_adapted_swin_compiles_whole(method):
    """Swin's windowed blocks around the same ops (on the torch backend: the custom ops'
    Triton path is the ViT tests', and interpreting it over Swin's windows costs minutes)."""
    model = swin_adapted(method)
    with kk.use_backend("torch"):
        check_compiled_model(model, swin_images())


@pytest.mark.parametrize("op", ["arc", "fact_apply"])
def test_seeded_dropout_compiles_to_the_eager_mask(op):
    """An explicit seed gives eager's mask under Inductor too (the seed, not an RNG draw, picks it)."""
    x, U = _leaf(6, 16, seed=0), _leaf(16, 4, seed=1)
    if op == "arc":
        args = (x, U, _leaf(4, seed=2), _leaf(16, seed=3))

        def fn(x, U, lam, bias):
            return kk.arc(x, U, lam, bias, dropout=0.4, seed=7)
    else:
        args = (x, U, _leaf(16, 4, seed=2), _leaf(3, 4, 4, seed=3))

        def fn(x, U, V, cores):
            return kk.fact_apply(x, U, V, cores, scale=0.5, dropout=0.4, seed=7)

    with kk.use_backend("torch"):
        want = outputs_and_grads(fn, args)
        got = outputs_and_grads(torch.compile(fn, fullgraph=True), args)
    assert_same(got, want, TOL)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kadaptation", "compacter", "arc", "fact_tk", "losa"])
def test_inductor(method):
    """The whole default path: Inductor compiles the graph around the opaque custom ops."""
    model = adapted(method).eval()  # dropout off: Inductor draws the in-graph seed with its own generator
    perturb(model, 3)
    with kk.use_backend("torch"):
        want = step(model, images())
        got = step(torch.compile(model, fullgraph=True), images())
    assert_same(got, want, TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "dense", "auto"])
@pytest.mark.parametrize("method", kk.METHODS)
def test_inductor_cuda(method, backend_name, monkeypatch):
    """On a GPU: Inductor compiles the graph with the real Triton kernels (and the dense
    compositions) as opaque custom ops, fp32 with TF32 off, in training mode with dropout off
    (Inductor's RNG draws other masks than eager's). The tolerance covers Inductor's fused
    reductions (softmax, LayerNorm) reordering fp32 sums over a ViT-B-width block."""
    if backend_name == "dense" and method not in DENSE_METHODS:
        pytest.skip(f"{method} has no dense composition")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = {"dropout": 0.0} if method in ("fact_tt", "fact_tk", "arc") else {}
    model = adapted(method, **config).cuda().train()
    perturb(model, 3)
    x = images().cuda()
    with kk.use_backend(backend_name):
        want = step(model, x)
        got = step(torch.compile(model, fullgraph=True), x)
    assert_same(got, want, 1e-4)


@pytest.mark.slow
def test_backend_change_recompiles():
    """A graph compiled under one backend is not reused under another: Dynamo guards on the
    selection (made in Python, outside the graph) and recompiles."""
    model = adapted("kadaptation")
    perturb(model, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    calls = {"triton": 0}
    from kron_kernels.triton import kron as triton_kron

    forward = triton_kron.kron_linear_forward

    def counting(*args, **kwargs):
        calls["triton"] += 1
        return forward(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_kron, "kron_linear_forward", counting)
        with kk.use_backend("torch"):
            want = step(model, images())
            compiled(images())
        assert calls["triton"] == 0
        if INTERPRET:
            with kk.use_backend("triton"):
                got = step(compiled, images())
            assert calls["triton"] == len(model.blocks)
            assert_same(got, want, TOL)
        with kk.use_backend("dense"):
            got = step(compiled, images())
        assert_same(got, want, TOL)


def test_process_constant_is_dynamos_marker():
    """backend.process_constant sets what torch.compiler.assume_constant_result sets (without
    importing Dynamo at package import); if torch changes the mechanism, this fails first."""
    from kron_kernels import backend

    def probe():
        return 1

    marked = torch.compiler.assume_constant_result(lambda: 1)
    markers = {k: v for k, v in vars(marked).items()}
    assert markers == vars(backend.process_constant(probe)) == {"_dynamo_marked_constant": True}


# ----------------------------------------------------------------------------- opcheck
def _leaf(*shape, seed, scale=0.3, dtype=torch.float32, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return t.to(dtype).requires_grad_(grad)


def _kron_cases():
    x = _leaf(7, 24, seed=0)
    W, b = _leaf(40, 24, seed=1, grad=False), _leaf(40, seed=2)
    factors = [_leaf(2, 2, 4, seed=3), _leaf(2, 5, 3, seed=4), _leaf(2, 6, 3, seed=5),
               _leaf(2, 2, 4, seed=6), _leaf(2, 5, 3, seed=7), _leaf(2, 6, 3, seed=8)]
    yield kron_ops._kron_linear_op, (x, W, b, factors, [0, 30], 40, 0.5)
    yield kron_ops._kron_linear_op, (x, None, None, factors[:3], [0], 10, 1.5)
    yield kron_ops._kron_delta_op, (*factors[:3], 0.5, ..., torch.float32)
    yield kron_ops._kron_delta_op, (*factors[:3], 0.5, ..., torch.bfloat16)  # delivered converted
    dy = _leaf(7, 40, seed=9, grad=False)
    yield kron_ops._kron_linear_backward_op, (dy, x.detach(), W, [f.detach() for f in factors], [0, 30], 0.5,
                                              ..., [True, False, True] + [True, False, True] * 2)


def _adapter_cases():
    """The Compacter adapter as it reaches the bottleneck ops: ``D = W_d^T`` and ``Up^T = W_u^T``
    (transposed views), GELU, a down bias, the output bias, residual, scale 1."""
    seed = torch.tensor(0)
    h = _leaf(9, 16, seed=0)
    w_down, b_down, w_up, b_up = _leaf(4, 16, seed=1), _leaf(4, seed=2), _leaf(16, 4, seed=3), _leaf(16, seed=4)
    one = torch.ones(())
    yield bottleneck_ops._bottleneck_op, (h, None, w_down.t(), w_up.t(), None, one, b_up, b_down, "channel", "gelu",
                                          True, 0.0, seed, torch.float32)
    yield bottleneck_ops._bottleneck_op, (h, None, w_down.t(), w_up.t(), None, one, None, None, "channel", "gelu",
                                          True, 0.0, seed, torch.float32)
    yield bottleneck_ops._bottleneck_backward_op, (
        _leaf(9, 16, seed=5, grad=False), h.detach(), None, w_down.detach().t(), w_up.detach().t(), None, one,
        torch.float32, b_down.detach(), "channel", "gelu", True, 0.0, seed, torch.float32, ...,
        [True, False, True, True, False, False, True, True])


def _bottleneck_cases():
    seed = torch.tensor(11)
    x = _leaf(9, 16, seed=0)
    U, lam, bias = _leaf(16, 3, seed=1), _leaf(3, seed=2), _leaf(16, seed=3)
    one = torch.ones(())
    yield bottleneck_ops._bottleneck_op, (x, None, U, None, lam, one, bias, None, "channel", "diag", True, 0.25,
                                          seed, torch.float32)
    h, z = _leaf(2, 6, 8, seed=4), _leaf(2, 6, 8, seed=5, grad=False)
    W_down, W_up, alpha = _leaf(6, 3, seed=6), _leaf(3, 6, seed=7), _leaf(1, seed=8)
    yield bottleneck_ops._bottleneck_op, (h, z, W_down, W_up, None, alpha, None, None, "token", "gelu", True, 0.0,
                                          seed, torch.float32)
    cores = _leaf(3, 3, 3, seed=9)
    V = _leaf(16, 3, seed=10)
    W = _leaf(48, 16, seed=11, grad=False)
    yield bottleneck_ops._fact_op, (x, W, None, U, V, cores, "rows", 0.5, 0.2, seed)
    yield bottleneck_ops._fact_op, (_leaf(5, 48, seed=12), None, None, U, V, cores, "cols", 2.0, 0.0, seed)
    yield bottleneck_ops._keep_mask_op, (10, 3, 0.4, seed, torch.device("cpu"))


OPCHECK_CASES = [
    pytest.param(op, args, id=f"{op._name}-{k}")
    for family in (_kron_cases, _adapter_cases, _bottleneck_cases)
    for k, (op, args) in enumerate(family())
]


@pytest.mark.parametrize("impl", [pytest.param("torch"), pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("op, args", OPCHECK_CASES)
def test_opcheck(op, args, impl):
    """Schema, fake (shapes, dtypes, strides), autograd registration and AOT dispatch of every
    custom op, on the torch code and on the Triton kernels (interpreted)."""
    if op is bottleneck_ops._keep_mask_op:
        if impl != "torch":
            pytest.skip("the mask op is the torch backend's")
        args = list(args)
    else:
        args = list(args)
        if ... in args:  # backward ops and kron_delta: the impl sits before the last arguments
            args[args.index(...)] = impl
        else:
            args.append(impl)
    torch.library.opcheck(op, tuple(args))
