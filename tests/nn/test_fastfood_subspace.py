"""kk.nn.FastfoodSubspace (Theta = Theta0 + P theta) and kk.intrinsic_dimension."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import kron_kernels as kk
from bad_hyperparameters import cases, names_argument
from kron_kernels.nn import FastfoodSubspace
from utils import RTOL, assert_rel_close, model_outputs_and_grads, needs_interpreter


def small_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def dense_P(D, d, seed, mode="stacked", generator=1):
    """P (D, d) column by column through kk.fastfood (itself checked against scipy's dense H)."""
    with kk.use_backend("torch"):
        return torch.stack([kk.fastfood(e, D, seed, mode, generator=generator)
                            for e in torch.eye(d, dtype=torch.float64)], dim=1)


VARIANTS = [
    pytest.param(dict(), id="global"),
    pytest.param(dict(per_tensor=True), id="per-tensor"),
    pytest.param(dict(said=True), id="global-said"),
    pytest.param(dict(per_tensor=True, said=True, mode="padded"), id="per-tensor-said-padded"),
    pytest.param(dict(generator=2), id="global-generator2"),
    pytest.param(dict(per_tensor=True, generator=2), id="per-tensor-generator2"),
]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_identity_at_zero_and_only_theta_trains(kwargs):
    net = small_net()
    original = copy.deepcopy(net)
    x = rand(5, 6)
    sub = FastfoodSubspace(net, 24, seed=3, **kwargs)
    assert torch.equal(sub(x), original(x)), "theta = 0 must compute exactly what the module computed"
    trainable = [n for n, p in sub.named_parameters() if p.requires_grad]
    assert trainable == (["theta", "lambdas"] if kwargs.get("said") else ["theta"])
    assert [n for n, _ in net.named_parameters()] == [], "the chosen parameters became buffers"
    assert {n for n, _ in net.named_buffers()} == {n for n, _ in original.named_parameters()}
    sub(x).square().sum().backward()
    assert sub.theta.grad is not None and sub.theta.grad.abs().sum() > 0
    if kwargs.get("said"):  # at theta = 0 the scales' gradient is exactly zero (the increment is 0)
        assert torch.equal(sub.lambdas.grad, torch.zeros_like(sub.lambdas))
    assert all(b.grad is None and not b.requires_grad for b in net.buffers())


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_reparameterisation_and_gradient_match_dense_projection(kwargs):
    """Theta_i = Theta0_i + lambda_i (P theta)_i with P built densely; d theta = P^T dTheta (float64 module)."""
    net = small_net()
    original = copy.deepcopy(net)
    d, seed = 24, 3
    sub = FastfoodSubspace(net, d, seed=seed, **kwargs)
    with torch.no_grad():
        sub.theta.copy_(rand(d, seed=1).float())
        if sub.lambdas is not None:
            sub.lambdas.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, 3.0]))
    mode, generator = kwargs.get("mode", "stacked"), kwargs.get("generator", 1)
    assert sub.generator == generator and f"generator={generator}" in repr(sub)
    names = [n for n, _ in original.named_parameters()]
    sizes = [p.numel() for _, p in original.named_parameters()]
    theta = sub.theta.detach().double().requires_grad_()
    if kwargs.get("per_tensor"):
        incs = [dense_P(D_i, d, sub.tensor_seed(i), mode, generator) @ theta for i, D_i in enumerate(sizes)]
    else:
        incs = list(torch.split(dense_P(sum(sizes), d, seed, mode, generator) @ theta, sizes))
    lam = sub.lambdas.detach().double() if sub.lambdas is not None else torch.ones(len(names), dtype=torch.float64)
    weights = {n: p.detach() + lam[i] * incs[i].view(p.shape) for i, (n, p) in enumerate(original.named_parameters())}
    x = rand(7, 6, seed=2)
    want = functional_call(original, weights, (x,))
    got = sub(x)
    # theta is float32 in the module, the increments are computed in float32 (1e-4 relative)
    assert_rel_close(got, want, 1e-5, "output")
    cot = rand(*want.shape, seed=3)
    (want_grad,) = torch.autograd.grad(want, theta, cot)
    got.backward(cot)
    assert_rel_close(sub.theta.grad, want_grad, 1e-4, "d theta")


def test_include_by_prefix_list_and_predicate():
    net = small_net()
    assert FastfoodSubspace(copy.deepcopy(net), 8, include="0").names == ["0.weight", "0.bias"]
    assert FastfoodSubspace(copy.deepcopy(net), 8, include=["3.weight", "1"]).names == ["1.weight", "1.bias", "3.weight"]
    sub = FastfoodSubspace(net, 8, include=lambda n: n.endswith("bias"))
    assert sub.names == ["0.bias", "1.bias", "3.bias"] and sub.D == 16 + 16 + 3
    # the parameters that were not chosen stay parameters, frozen
    assert {n for n, p in net.named_parameters()} == {"0.weight", "1.weight", "3.weight"}
    assert not any(p.requires_grad for p in net.parameters())


def test_tied_parameters_move_together():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    net = Tied().double()
    sub = FastfoodSubspace(net, 5, seed=1)
    with torch.no_grad():
        sub.theta.normal_()
    values = sub.reparameterised()
    assert values["a.weight"] is values["b.weight"] and sub.D == 16
    x = rand(3, 4)
    assert_rel_close(sub(x), x @ values["a.weight"].T @ values["a.weight"].T, 1e-12)


def test_training_reduces_the_loss():
    net = small_net(torch.float32)
    sub = FastfoodSubspace(net, 32, seed=0)
    x = rand(64, 6, dtype=torch.float32)
    y = x[:, :3].argmax(-1)  # a learnable labelling
    opt = torch.optim.Adam([sub.theta], lr=0.05)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(sub(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.8 * first
    assert "theta" in sub.state_dict() and "module.0.weight" in sub.state_dict()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(d=0), ValueError, "d must be a positive int"),
        (dict(d=4, mode="blocks"), ValueError, "mode must be one of"),
        (dict(d=4, seed=-3), ValueError, "seed must be an int in"),
        (dict(d=4, include="5"), ValueError, r"include: no parameter of the module is or is under \['5'\]"),
        (dict(d=4, include=lambda n: False), ValueError, "include chose no parameter"),
        (dict(d=4, include=[3]), TypeError, "include must be None, a name"),
    ],
    ids=["d0", "mode", "seed", "include-unknown", "include-empty", "include-type"],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastfoodSubspace(small_net(), **kwargs)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        FastfoodSubspace(lambda x: x, 4)


def test_vit_submodule():
    """One block's attention of a (tiny) timm ViT: identity at theta = 0, only those weights move."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=48, num_heads=3, num_classes=5)
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    want = vit(x)
    sub = FastfoodSubspace(vit, 64, include="blocks.0.attn")
    assert torch.equal(sub(x), want)
    assert sub.D == 48 * 48 * 3 + 48 * 3 + 48 * 48 + 48
    with torch.no_grad():
        sub.theta.normal_()
    moved = sub.reparameterised()
    assert set(moved) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                          "blocks.0.attn.proj.bias"}
    assert not torch.allclose(sub(x), want)


# --------------------------------------------------------------------- intrinsic dimension
def blobs(n=384, classes=4, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 2
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, dim, generator=gen), y


def test_intrinsic_dimension_tiny_task(capsys):
    x, y = blobs()
    train = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    x_test, y_test = x[256:], y[256:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    before = copy.deepcopy(model.state_dict())

    def accuracy(m):
        return (m(x_test).argmax(-1) == y_test).float().mean().item()

    result = kk.intrinsic_dimension(model, train, nn.functional.cross_entropy, accuracy, dims=[64, 1, 16],
                                    steps=60, lr=0.05, full_lr=0.02, progress=True)
    assert "intrinsic dimension" in capsys.readouterr().err  # the tqdm bar
    assert list(result.metrics) == [1, 16, 64]
    assert result.full_metric > 0.9, "the blobs are separable: full training must solve them"
    target = 0.9 * result.full_metric
    reached = [d for d, m in result.metrics.items() if m >= target]
    assert result.d90 == (reached[0] if reached else None)
    assert result.metrics[1] < target, "one direction cannot separate four classes"
    assert result.d90 is not None
    assert result.n_params == 8 * 16 + 16 + 16 * 4 + 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the model is left untouched"
    assert "d90 = " in str(result)


def test_intrinsic_dimension_bad_input():
    model = nn.Linear(2, 2)
    args = (model, [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], nn.functional.cross_entropy,
            lambda m: 1.0)
    with pytest.raises(ValueError, match="dims must be a non-empty list of positive ints"):
        kk.intrinsic_dimension(*args, dims=[0, 4])
    with pytest.raises(ValueError, match="threshold must be in"):
        kk.intrinsic_dimension(*args, dims=[4], threshold=1.5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        kk.intrinsic_dimension(*args, dims=[4], steps=0)
    with pytest.raises(ValueError, match=r"generator must be one of \(1, 2\), got 3"):
        kk.intrinsic_dimension(*args, dims=[4], generator=3)
    with pytest.raises(TypeError, match="generator must be one of"):
        kk.intrinsic_dimension(*args, dims=[4], generator="2")


@pytest.mark.gpu
def test_gpu_subspace_matches_cpu():
    net = small_net(torch.float32)
    x = rand(9, 6, dtype=torch.float32)
    cpu = FastfoodSubspace(copy.deepcopy(net), 200, seed=4)
    gpu = FastfoodSubspace(copy.deepcopy(net).cuda(), 200, seed=4)
    theta = rand(200, dtype=torch.float32, seed=1)
    with torch.no_grad():
        cpu.theta.copy_(theta)
        gpu.theta.copy_(theta.cuda())
    assert_rel_close(gpu(x.cuda()), cpu(x), 1e-5)


# (backend, marks): the projections' implementations on the CPU
COMPILE_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cuda", id="extension-cpu",
                 marks=pytest.mark.skipif(not kk.backend.extension_status()[0], reason="the extension is not built")),
    pytest.param("triton", id="triton-interpreter", marks=needs_interpreter),
]


@pytest.mark.slow  # Inductor compiles of a small network: ~6 s with a cold cache
@pytest.mark.parametrize("backend_name", COMPILE_BACKENDS)
@pytest.mark.parametrize("kwargs", [VARIANTS[0], VARIANTS[3]])
def test_torch_compile_fullgraph(kwargs, backend_name, fresh_dynamo):
    """The wrapped model (functional_call over the reparameterised tensors) compiles whole --
    fullgraph=True raises on a graph break -- to the eager output and theta / lambda gradients.
    The projections are the same kernels on the same theta (exact); the float64 network runs in
    Inductor's fused kernels, whose other summation order moves the output by ~1e-16 relative
    (RTOL[float64]). The float32 gradients: theta's measured exact, SAID's lambda_i is a float32
    sum over tensor i's increment that Inductor may add in another order (measured one ulp,
    6e-8 relative; 1e-6 allows a few ulps of 2^-24 and fails any real difference)."""
    sub = FastfoodSubspace(small_net(), 24, seed=3, **kwargs)
    with torch.no_grad():
        sub.theta.copy_(rand(24, seed=1).float())
        if sub.lambdas is not None:
            sub.lambdas.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, 3.0]))
    x, cotangent = rand(7, 6, seed=2), rand(7, 3, seed=3)
    with kk.use_backend(backend_name):
        want = model_outputs_and_grads(sub, x, cotangent)
        got = model_outputs_and_grads(torch.compile(sub, fullgraph=True), x, cotangent)
    got = {name.replace("_orig_mod.", ""): t for name, t in got.items()}
    assert got.keys() == want.keys()
    assert_rel_close(got.pop("out"), want.pop("out"), RTOL[torch.float64], "out")
    for name in want:
        assert_rel_close(got[name], want[name], 1e-6, name)


@pytest.mark.parametrize(
    "argument, value, error",
    cases(d="positive_int", seed="non_negative_int", per_tensor="bool", said="bool", generator="positive_int")
    + [pytest.param("seed", 1 << 64, ValueError, id="seed-2^64"),
       pytest.param("generator", 3, ValueError, id="generator-3")],
)
def test_hyperparameters_through_the_shared_validators(argument, value, error):
    """d, seed, per_tensor, said and generator (one of 1, 2): a TypeError for a value of the wrong
    kind (a bool, a string, a tensor, None, a float as a count; an int as a flag), a ValueError out
    of range; the message names the argument and the module is left exactly as it was."""
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = [(n, p.requires_grad) for n, p in net.named_parameters()]
    kwargs = dict(d=4, seed=0, per_tensor=False, said=False, generator=1)
    kwargs[argument] = value
    with pytest.raises(error, match=names_argument(argument)):
        FastfoodSubspace(net, **kwargs)
    assert [(n, p.requires_grad) for n, p in net.named_parameters()] == params
    assert not list(net.named_buffers())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    sub = FastfoodSubspace(net, 4, seed=7)  # still wrappable
    assert type(sub.d) is int and sub.seed == 7
