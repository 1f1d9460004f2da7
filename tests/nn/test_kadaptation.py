"""kron_kernels.nn.KAdaptationLinear against the paper-style reference module."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kron_kernels as kk
from bad_hyperparameters import cases, names_argument
from kron_kernels.nn import KAdaptationLinear
from kron_kernels.reference import kadaptation as ref
from utils import RTOL, TRITON_DEVICES, assert_low_precision_error, assert_rel_close

# (in, out, base bias, targets, n, r, bias, scale): the q/v and q/k/v slices of a fused qkv,
# a full-rows target (the kron_linear path), a non-power-of-two n, adapter bias on a
# bias-free base (merge then has to create the bias)
CASES = [
    pytest.param((64, 192, True, {"q": (0, 64), "v": (128, 192)}, 8, 1, False, 1.0), id="qkv64-qv-n8"),
    pytest.param((64, 192, False, {"q": (0, 64), "k": (64, 128), "v": (128, 192)}, 8, 2, True, 0.5),
                 id="qkv64-qkv-n8-r2-bias-nobase"),
    pytest.param((96, 96, True, {"proj": (0, 96)}, 6, 1, True, 1.0), id="proj96-n6-bias"),
    pytest.param((48, 48, False, {"proj": (0, 48)}, 4, 3, False, 2.0), id="proj48-n4-r3-nobase"),
    pytest.param((96, 288, True, {"v": (192, 288)}, 6, 1, False, 1.0), id="qkv96-v-n6"),
]


def make_base(d_in, d_out, base_bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=base_bias).to(dtype).requires_grad_(False)


def make_shared(targets, n, dtype=torch.float64, seed=1):
    """The module owning A_<target>, as kk.adapt builds it for a whole model."""
    shared = nn.Module()
    gen = torch.Generator().manual_seed(seed)
    for name in targets:
        shared.register_parameter(f"A_{name}", nn.Parameter(torch.randn(n, n, n, generator=gen, dtype=dtype)))
    return shared


def make_pair(case, shared: bool, dtype=torch.float64):
    """(fused, reference) modules on copies of one frozen Linear, with the same random factors."""
    d_in, d_out, base_bias, targets, n, r, bias, scale = case
    owner = make_shared(targets, n, dtype) if shared else None
    fused = KAdaptationLinear(make_base(d_in, d_out, base_bias, dtype), targets, n, r, bias, scale, shared=owner)
    reference = ref.KAdaptationLinear(make_base(d_in, d_out, base_bias, dtype), targets, n, r, bias, scale, owner)
    perturb(fused, seed=2)
    reference.load_state_dict(fused.state_dict())  # same names and shapes: loads strictly
    return fused, reference, owner


def perturb(module, seed):
    """Nonzero values for every adapter parameter (V is zero at init, hiding the increment)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in module.kk_adapter_params:
            p = getattr(module, name)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))


def outputs_and_grads(module, x, params, seed=0, autocast=None):
    """{"out", "x", <param names>}: the output and the gradients of a fixed random cotangent.

    With ``autocast`` (a dtype) the forward runs under CPU autocast and the backward outside it.
    """
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [x, *params.values()], g)
    return {"out": out, "x": grads[0], **dict(zip(params, grads[1:]))}


def trainable(module, owner):
    params = dict(module.named_parameters())
    if owner is not None:
        params.update({f"shared.{k}": v for k, v in owner.named_parameters()})
    return {k: v for k, v in params.items() if v.requires_grad}


@pytest.mark.parametrize("shared", [True, False], ids=["shared-A", "own-A"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float64(case, shared):
    fused, reference, owner = make_pair(case, shared)
    x = torch.randn(2, 7, case[0], dtype=torch.float64)
    got = outputs_and_grads(fused, x, trainable(fused, owner))
    want = outputs_and_grads(reference, x, trainable(reference, owner))
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float64], name)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_matches_reference_triton_fp32(case, device):
    """The module on the Triton kernels (interpreted on the CPU, or on CUDA), fp32, against the
    reference in float64."""
    fused, reference, owner = make_pair(case, shared=True)
    owner32 = None if owner is None else copy.deepcopy(owner).float().to(device)
    fused32 = KAdaptationLinear(make_base(*case[:3], dtype=torch.float32), case[3], *case[4:], shared=owner32)
    fused32.load_state_dict(fused.state_dict())
    fused32.to(device)
    x = torch.randn(5, case[0], dtype=torch.float64)
    want = outputs_and_grads(reference, x, trainable(reference, owner))
    with kk.use_backend("triton"):
        got = outputs_and_grads(fused32, x.float().to(device), trainable(fused32, owner32))
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float32], name)


@pytest.mark.parametrize("case", CASES)
def test_autocast_bf16_low_precision_rule(case):
    """fp32 frozen Linear and factors under bf16 autocast: every output and gradient obeys the
    low-precision rule (utils.assert_low_precision_error, DESIGN.md 6) against the float64
    reference, with the naive reference under the same autocast as the budget. The float64
    reference sees x and the frozen weight and bias rounded to bf16, as autocast hands them to
    both modules' GEMMs: an error is what a computation adds to the data it is given."""
    d_in, d_out, base_bias, targets, n, r, bias, scale = case

    def build(cls, dtype):
        owner = make_shared(targets, n, dtype)
        module = cls(make_base(d_in, d_out, base_bias, dtype), targets, n, r, bias, scale, shared=owner)
        return module, owner

    fused, owner = build(KAdaptationLinear, torch.float32)
    perturb(fused, seed=6)
    naive, naive_owner = build(ref.KAdaptationLinear, torch.float32)
    exact, exact_owner = build(ref.KAdaptationLinear, torch.float64)
    for module in (naive, exact):
        module.load_state_dict(fused.state_dict())
    with torch.no_grad():  # the frozen Linear as autocast rounds it
        for name in ("weight", "bias"):
            if getattr(exact, name) is not None:
                getattr(exact, name).copy_(getattr(fused, name).to(torch.bfloat16))
    x = torch.randn(40, d_in)
    want = outputs_and_grads(exact, x.to(torch.bfloat16).double(), trainable(exact, exact_owner))
    got = outputs_and_grads(fused, x, trainable(fused, owner), autocast=torch.bfloat16)
    base = outputs_and_grads(naive, x, trainable(naive, naive_owner), autocast=torch.bfloat16)
    assert got["out"].dtype == torch.bfloat16
    for name in want:
        assert_low_precision_error(name, got[name], want[name], base[name], want[name], torch.bfloat16)


@pytest.mark.parametrize("cls", [KAdaptationLinear, ref.KAdaptationLinear], ids=["fused", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_increment_is_exactly_zero_at_init(case, cls):
    d_in, d_out, base_bias, targets, n, r, bias, scale = case
    base = make_base(d_in, d_out, base_bias, torch.float32)
    module = cls(base, targets, n, r, bias, scale)
    x = torch.randn(3, 5, d_in)
    assert torch.equal(module(x), F.linear(x, base.weight, base.bias))
    assert all(not getattr(module, f"V_{t}").any() for t in targets)


@pytest.mark.parametrize("case", CASES)
def test_every_factor_learns_from_the_second_step(case):
    d_in, d_out, base_bias, targets, n, r, bias, scale = case
    torch.manual_seed(0)
    module = KAdaptationLinear(make_base(d_in, d_out, base_bias), targets, n, r, bias, scale)
    params = dict(module.named_parameters())
    assert {k for k, p in params.items() if p.requires_grad} == set(module.kk_adapter_params)
    initial = {k: p.detach().clone() for k, p in params.items()}
    optimizer = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=0.1)
    x, target = torch.randn(16, d_in, dtype=torch.float64), torch.randn(16, d_out, dtype=torch.float64)
    for step in range(2):
        optimizer.zero_grad()
        F.mse_loss(module(x), target).backward()
        if step == 0:  # the first backward reaches V (A and U are random); A and U wait for V to move
            for t in targets:
                assert module.get_parameter(f"V_{t}").grad.abs().max() > 0, f"V_{t}"
        optimizer.step()
    for name in module.kk_adapter_params:
        assert params[name].grad.abs().max() > 0, f"{name} got no gradient in step 2"
        assert not torch.equal(params[name], initial[name]), f"{name} did not change"
    assert module.weight.grad is None and torch.equal(module.weight, initial["weight"])


@pytest.mark.parametrize("cls", [KAdaptationLinear, ref.KAdaptationLinear], ids=["fused", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_round_trip(case, cls):
    d_in, d_out, base_bias, targets, n, r, bias, scale = case
    module = cls(make_base(d_in, d_out, base_bias), targets, n, r, bias, scale)
    perturb(module, seed=3)
    weight0 = module.weight.detach().clone()
    bias0 = None if module.bias is None else module.bias.detach().clone()
    x = torch.randn(4, 3, d_in, dtype=torch.float64)
    y0 = module(x)
    module.merge()
    assert module.merged
    assert not torch.equal(module.weight, weight0)
    # the merged forward is the plain Linear: the increment must not be added a second time
    assert_rel_close(module(x), y0, RTOL[torch.float64], "merged output")
    assert_rel_close(module(x), F.linear(x, module.weight, module.bias), 0.0, "merged = plain linear")
    with pytest.raises(ValueError, match="already merged"):
        module.merge()
    module.unmerge()
    assert not module.merged
    assert torch.equal(module.weight, weight0), "unmerge must restore the weight bitwise"
    if bias0 is None:
        assert module.bias is None
    else:
        assert torch.equal(module.bias, bias0)
    assert torch.equal(module(x), y0)
    with pytest.raises(ValueError, match="not merged"):
        module.unmerge()


def test_merged_matches_materialised_increment():
    """merge adds exactly kk.kron_delta of each target to its rows and leaves the others alone."""
    case = CASES[0].values[0]
    module = KAdaptationLinear(make_base(*case[:3]), case[3], *case[4:])
    perturb(module, seed=4)
    weight0 = module.weight.detach().clone()
    module.merge()
    expected = weight0.clone()
    for name, (start, stop) in case[3].items():
        expected[start:stop] += ref.kron_delta(*module.factors(name), case[7])
    assert_rel_close(module.weight, expected, RTOL[torch.float64], "merged weight")
    assert torch.equal(module.weight[64:128], weight0[64:128])


def test_shared_A_is_borrowed_not_registered():
    d, n = 64, 8
    owner = make_shared({"q": None, "v": None}, n)
    slices = {"q": (0, d), "v": (2 * d, 3 * d)}
    layers = nn.ModuleList(KAdaptationLinear(make_base(d, 3 * d, True, seed=i), slices, n, shared=owner) for i in range(3))
    model = nn.ModuleDict({"shared": owner, "layers": layers})
    names = [k for k, _ in model.named_parameters()]
    assert names.count("shared.A_q") == 1 and not any(".A_" in k for k in names if k.startswith("layers"))
    assert not any("A_" in k for k in layers[0].state_dict())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * n**3 + 3 * 2 * (n * 8 + n * 8)
    for layer in layers:
        perturb(layer, seed=5)
    x = torch.randn(2, d, dtype=torch.float64)
    y = x
    for layer in layers:
        qkv = layer(y)
        y = qkv[:, :d] + qkv[:, 2 * d:]
    y.sum().backward()
    assert owner.A_q.grad.abs().max() > 0 and owner.A_v.grad.abs().max() > 0
    # replacing the owner's Parameter (load_state_dict(assign=True)) reaches every layer
    new_A = torch.zeros(n, n, n, dtype=torch.float64)
    model.load_state_dict({**model.state_dict(), "shared.A_q": new_A, "shared.A_v": new_A}, assign=True)
    assert torch.equal(layers[1](x), F.linear(x, layers[1].weight, layers[1].bias))


def test_extra_repr():
    case = CASES[1].values[0]
    module = KAdaptationLinear(make_base(*case[:3]), case[3], *case[4:])
    for part in ("in_features=64", "out_features=192", "q[0:64]", "k[64:128]", "v[128:192]", "n=8", "r=2",
                 "scale=0.5", "bias=True", "shared_A=False", "merged=False"):
        assert part in repr(module), part
    module.merge()
    assert "merged=True" in repr(module)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(dict(n=5), ValueError, r"n=5 must divide the layer's in_features=64", id="n-not-dividing-d"),
        pytest.param(dict(targets={"q": (0, 60)}, n=8), ValueError, "n=8 must divide the 60 rows", id="rows"),
        pytest.param(dict(targets={"q": (0, 64), "k": (32, 96)}), ValueError, "overlap", id="overlap"),
        pytest.param(dict(targets={"q": (128, 256)}), ValueError, "not inside", id="out-of-range"),
        pytest.param(dict(targets={}), ValueError, "at least one", id="no-targets"),
        pytest.param(dict(r=0), ValueError, "r must be a positive int", id="rank0"),
        pytest.param(dict(shared=nn.Module()), ValueError, "no tensor A_q", id="shared-without-A"),
        pytest.param(dict(base=nn.Conv1d(64, 192, 1)), TypeError, "nn.Linear", id="not-linear"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(base=make_base(64, 192, True), targets={"q": (0, 64)}, n=8)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        KAdaptationLinear(**args)


@pytest.mark.parametrize(
    "argument, value, error",
    cases(n="positive_int", r="positive_int", bias="bool", scale="finite")
    + [pytest.param("targets['q'] start", value, TypeError, id=f"start-{label}")
       for label, value in [("bool", False), ("float", 0.0), ("str", "0"), ("tensor", torch.tensor(0))]]
    + [pytest.param("targets['q'] stop", value, TypeError, id=f"stop-{label}")
       for label, value in [("float", 64.0), ("none", None), ("nan", float("nan"))]],
)
def test_hyperparameters_through_the_shared_validators(argument, value, error):
    """n, r, bias, scale and the targets' row bounds: a TypeError for a value of the wrong kind
    (a bool, a string, a tensor, None, a float as a count or a row; an int as the bias flag), a
    ValueError out of range or not finite; the message names the argument, no parameter is
    made and the base Linear and the shared owner are left as they were."""
    base, shared = make_base(64, 192, True), make_shared(["q"], 8)
    before = {k: v.clone() for k, v in (*base.state_dict().items(), *shared.state_dict().items())}
    kwargs = dict(base=base, targets={"q": (0, 64)}, n=8, r=2, bias=True, scale=1.0, shared=shared)
    if argument.startswith("targets"):
        kwargs["targets"] = {"q": (value, 64) if argument.endswith("start") else (0, value)}
    else:
        kwargs[argument] = value
    with pytest.raises(error, match=names_argument(argument)):
        KAdaptationLinear(**kwargs)
    after = {**base.state_dict(), **shared.state_dict()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(dict(targets=[("q", (0, 64))]), TypeError, "targets must be a mapping", id="targets-list"),
        pytest.param(dict(targets={"q": (0, 64, 1)}), TypeError, r"targets\['q'\] must be a \(start, stop\) pair",
                     id="triple"),
        pytest.param(dict(targets={3: (0, 64)}), TypeError, "target names must be str", id="name-int"),
        pytest.param(dict(shared=make_shared(["q"], 4)), ValueError, r"shared A_q must have shape \(8, 8, 8\)",
                     id="shared-A-shape"),
    ],
)
def test_bad_targets_and_shared(kwargs, error, match):
    args = dict(base=make_base(64, 192, True), targets={"q": (0, 64)}, n=8)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        KAdaptationLinear(**args)


# ----------------------------------------------------------------------------------------
# KAdaptationBank: every layer's increments built per target kind (kk.adapt's fused layers)
# ----------------------------------------------------------------------------------------
def banked_kadaptation(targets=("q", "v"), depth=3, dtype=torch.float64, seed=0, **config):
    """A tiny ViT adapted with KAdaptation (its bank), every adapter tensor nonzero."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, num_classes=5)
    model = kk.adapt(vit.to(dtype), "kadaptation", n=8, targets=targets, **config).train()
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():  # nonzero V (zero at init) and biases: every factor shows in the output
        for sub in model.modules():
            for name in getattr(sub, "kk_adapter_params", ()):
                p = getattr(sub, name)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return model


def kad_layers(model):
    return [m for m in model.modules() if isinstance(m, KAdaptationLinear)]


def unbanked_kadaptation(model):
    plain = copy.deepcopy(model)
    for layer in kad_layers(plain):
        layer._bank = None
    return plain


def model_step(model, x, autocast=None):
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.dtype)
    return {"out": out, **dict(zip(params, torch.autograd.grad(out, list(params.values()), cot)))}


@pytest.mark.parametrize("targets, config", [
    pytest.param(("q", "v"), {}, id="qv"),
    pytest.param(("q", "k", "v", "proj"), dict(bias=True, scale=0.5), id="qkv-proj-bias"),
])
def test_bank_matches_each_layer_applying_its_own(targets, config):
    """Under the dense backend the layers take their increments from the bank: output and
    every gradient as the layers' own kron_linear_slices (float64)."""
    model = banked_kadaptation(targets, **config)
    bank = kad_layers(model)[0]._bank[0]
    assert all(layer._bank[0] is bank for layer in kad_layers(model))
    assert len(bank) == 3 * len(targets) and len(bank._groups) == len(targets)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with kk.use_backend("dense"):
        got = model_step(model, x)
        assert bank._built == {}  # the backward consumed the built sets
        want = model_step(unbanked_kadaptation(model), x)
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float64], name)


def test_bank_low_precision_rule():
    """bf16 autocast on fp32: the banked increments are rounded to bf16 and W + delta once
    more as it is stored; the error against float64 stays within the low-precision rule of the
    layers' own dense composition (one rounding of W + delta)."""
    model = banked_kadaptation(dtype=torch.float32)
    exact = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 32, 32)
    with kk.use_backend("dense"):
        fused = model_step(model, x, autocast=torch.bfloat16)
        naive = model_step(unbanked_kadaptation(model), x, autocast=torch.bfloat16)
    want = model_step(exact, x.double())
    for name in want:
        assert_low_precision_error(name, fused[name], want[name], naive[name], want[name], torch.bfloat16)


def test_bank_serves_only_the_dense_composition():
    """On the CPU auto takes the structured torch path, which never forms an increment: the bank
    stays empty; under dense it builds."""
    model = banked_kadaptation()
    bank = kad_layers(model)[0]._bank[0]
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        assert bank._built == {}
        with kk.use_backend("dense"):
            model(x)
        assert len(bank._built) == 2  # q and v: one set each, kept in no_grad until a factor changes


def test_bank_accumulates_follows_updates_and_copies():
    model = banked_kadaptation()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    with kk.use_backend("dense"):
        single = torch.autograd.grad(model(x).square().sum(), params)
        for _ in range(2):
            model(x).square().sum().backward()
        for p, g in zip(params, single):
            assert_rel_close(p.grad, 2 * g, RTOL[torch.float64])
        torch.optim.SGD(params, lr=0.01).step()
        with torch.no_grad():
            assert_rel_close(model(x), unbanked_kadaptation(model)(x), RTOL[torch.float64])
            model.kk_shared.A_v.mul_(2.0)  # the shared A, in place
            assert_rel_close(model(x), unbanked_kadaptation(model)(x), RTOL[torch.float64])
            clone = copy.deepcopy(model)
            assert kad_layers(clone)[0]._bank[0] is not kad_layers(model)[0]._bank[0]
            kad_layers(clone)[1].U_q.add_(1.0)
            assert not torch.equal(clone(x), model(x))


def test_bank_and_increment_arguments():
    base = make_base(64, 192, True)
    bank = kk.nn.KAdaptationBank()
    with pytest.raises(TypeError, match="bank must be a KAdaptationBank"):
        KAdaptationLinear(base, {"q": (0, 64)}, n=8, bank="yes")
    layer = KAdaptationLinear(base, {"q": (0, 64)}, n=8, bank=bank)
    with pytest.raises(ValueError, match="registered with a KAdaptationBank already"):
        bank.add(layer)
    with pytest.raises(TypeError, match="holds KAdaptationLinear layers"):
        bank.add(base)
    x = torch.randn(3, 64, dtype=torch.float64)
    inc = torch.zeros(64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"increments\[0\] of shape \(64, 64\) at row 150 must lie within"):
        kk.ops.kron.linear_with_increments(x, base.weight, None, [(150, inc)])
    with pytest.raises(TypeError, match=r"increments\[0\] must have dtype in \(float64\)"):
        kk.ops.kron.linear_with_increments(x, base.weight, None, [(0, inc.float())])
    with pytest.raises(ValueError, match="in_features = 64"):
        kk.ops.kron.linear_with_increments(x[:, :8], base.weight, None, [(0, inc)])


def test_increments_linear_rounds_each_sum_once():
    """``linear_with_increments`` under bf16 autocast multiplies by ``bf16(W + delta)`` on the
    adapted rows (the sum in fp32, rounded once as it is stored) and ``bf16(W)`` elsewhere: read
    back exactly through the identity (one nonzero product per output)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 16, generator=gen)
    inc = (torch.randn(16, 16, generator=gen) * 1e-2).to(torch.bfloat16)
    eye = torch.eye(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kk.ops.kron.linear_with_increments(eye, W, None, [(32, inc)])
    want = W.clone()
    want[32:] += inc.float()
    assert torch.equal(y.t().float(), want.to(torch.bfloat16).float())
