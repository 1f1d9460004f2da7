"""kron_kernels.nn PHMLinear / CompacterAdapter / AdapterWrapper against the paper-style reference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kron_kernels as kk
from bad_hyperparameters import cases, names_argument
from kron_kernels.nn import AdapterWrapper, CompacterAdapter, PHMLinear
from kron_kernels.reference import compacter as ref
from utils import RTOL, TRITON_DEVICES, assert_low_precision_error, assert_rel_close

# (d, k, n): the paper's d/32 bottleneck, a non-power-of-two n, n = 1 (a plain rank-one layer)
ADAPTER_CASES = [
    pytest.param((64, 8, 4), id="d64-k8-n4"),
    pytest.param((96, 6, 6), id="d96-k6-n6"),
    pytest.param((40, 5, 1), id="d40-k5-n1"),
]


def perturb(module, seed):
    """Nonzero values for every adapter parameter (up.s is zero at init, hiding the branch)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name in getattr(sub, "kk_adapter_params", ()):
                p = getattr(sub, name)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)


def outputs_and_grads(module, x, seed=0, autocast=None):
    """{"out", "x", <trainable parameter names>} for a fixed random cotangent.

    With ``autocast`` (a dtype) the forward runs under CPU autocast and the backward outside it.
    """
    params = {k: p for k, p in module.named_parameters() if p.requires_grad}
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [x, *params.values()], g)
    return {"out": out, "x": grads[0], **dict(zip(params, grads[1:]))}


def assert_all_close(got, want, tol):
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], tol, name)


def kron_sum(A, s, t):
    """``sum_i kron(A_i, s_i t_i^T)`` with torch.kron, one term at a time (independent of both codes)."""
    return sum(torch.kron(A[i], s[i] @ t[i].T) for i in range(A.shape[0]))


# ---------------------------------------------------------------------------- PHMLinear
@pytest.mark.parametrize("shape", [(64, 8, 4), (8, 64, 4), (30, 12, 6)], ids=["down64-8", "up8-64", "30-12-n6"])
def test_phm_weight_is_sum_of_krons(shape):
    d_in, d_out, n = shape
    layer = PHMLinear(d_in, d_out, n, dtype=torch.float64)
    assert layer.s.shape == (n, d_out // n, 1) and layer.t.shape == (n, d_in // n, 1)
    assert layer.weight.shape == (d_out, d_in)
    assert_rel_close(layer.weight, kron_sum(layer.A, layer.s, layer.t), RTOL[torch.float64], "weight")
    x = torch.randn(3, d_in, dtype=torch.float64)
    assert_rel_close(layer(x), F.linear(x, layer.weight, layer.bias), RTOL[torch.float64], "forward")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_phm_linear_matches_reference(bias):
    fused = PHMLinear(64, 8, 4, bias=bias, dtype=torch.float64)
    reference = ref.PHMLinear(64, 8, 4, bias=bias, dtype=torch.float64)
    perturb(fused, seed=1)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    assert_all_close(outputs_and_grads(fused, x), outputs_and_grads(reference, x), RTOL[torch.float64])


def test_phm_linear_shared_A_forms():
    """A owned, a shared Parameter, or the module owning it: same weight, A registered once."""
    own = PHMLinear(16, 8, 4, dtype=torch.float64)
    owner = nn.Module()
    owner.A = nn.Parameter(own.A.detach().clone())
    by_param = PHMLinear(16, 8, 4, A=owner.A, dtype=torch.float64)
    by_owner = PHMLinear(16, 8, 4, A=owner, dtype=torch.float64)
    for layer in (by_param, by_owner):
        layer.load_state_dict(own.state_dict(), strict=False)
        assert "A" not in dict(layer.named_parameters())
        assert torch.equal(layer.weight, own.weight)
    with torch.no_grad():
        owner.A.mul_(2.0)
    assert not torch.equal(by_param.weight, own.weight) and torch.equal(by_param.weight, by_owner.weight)


# ---------------------------------------------------------------------------- CompacterAdapter
class FirstOf(nn.Module):
    """Calls the first module of a ModuleList; its parameters include the others' (a shared A)."""

    def __init__(self, modules):
        super().__init__()
        self.inner = modules

    def forward(self, x):
        return self.inner[0](x)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-A", "own-A"])
@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_matches_reference_float64(case, shared):
    d, k, n = case
    owner = None
    if shared:
        owner = nn.Module()
        owner.A = nn.Parameter(torch.randn(n, n, n, dtype=torch.float64))
    fused = CompacterAdapter(d, k, n, A=owner, dtype=torch.float64)
    reference = ref.CompacterAdapter(d, k, n, A=owner, dtype=torch.float64)
    perturb(fused, seed=2)
    reference.load_state_dict(fused.state_dict())
    holder_f, holder_r = nn.ModuleList([fused]), nn.ModuleList([reference])
    if owner is not None:  # so that the shared A's gradient is compared too
        holder_f.append(owner)
        holder_r.append(owner)
    h = torch.randn(2, 7, d, dtype=torch.float64)
    got = outputs_and_grads(FirstOf(holder_f), h)
    want = outputs_and_grads(FirstOf(holder_r), h)
    assert_all_close(got, want, RTOL[torch.float64])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_adapter_matches_reference_triton_fp32(device):
    """The adapter on the Triton kernels (interpreted on the CPU, or on CUDA), fp32, against the
    reference in float64."""
    d, k, n = 64, 8, 4
    fused = CompacterAdapter(d, k, n)
    reference = ref.CompacterAdapter(d, k, n, dtype=torch.float64)
    perturb(fused, seed=3)
    reference.load_state_dict(fused.state_dict())
    fused.to(device)
    h = torch.randn(5, 3, d, dtype=torch.float64)
    want = outputs_and_grads(reference, h)
    with kk.use_backend("triton"):
        got = outputs_and_grads(fused, h.float().to(device))
    assert_all_close(got, want, RTOL[torch.float32])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_autocast_bf16_low_precision_rule(case, seed):
    """fp32 factors, fp32 activations, bf16 autocast: every output and gradient obeys the
    low-precision rule (utils.assert_low_precision_error, DESIGN.md 6) against the float64
    reference, with the naive reference under the same autocast as the budget."""
    d, k, n = case
    fused = CompacterAdapter(d, k, n)
    perturb(fused, seed=seed)
    naive = ref.CompacterAdapter(d, k, n)
    exact = ref.CompacterAdapter(d, k, n, dtype=torch.float64)
    for module in (naive, exact):
        module.load_state_dict(fused.state_dict())
    h = torch.randn(50, d, generator=torch.Generator().manual_seed(seed))
    want = outputs_and_grads(exact, h.double())
    got = outputs_and_grads(fused, h, autocast=torch.bfloat16)
    base = outputs_and_grads(naive, h, autocast=torch.bfloat16)
    assert got["out"].dtype == torch.float32  # the residual keeps h's dtype
    for name in want:
        assert_low_precision_error(name, got[name], want[name], base[name], want[name], torch.bfloat16)


@pytest.mark.parametrize("cls", [CompacterAdapter, ref.CompacterAdapter], ids=["fused", "reference"])
@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_is_exactly_the_identity_at_init(case, cls):
    d, k, n = case
    adapter = cls(d, k, n)
    h = torch.randn(3, 5, d)
    assert torch.equal(adapter(h), h)
    assert not adapter.up.s.any() and not adapter.up.bias.any()


@pytest.mark.parametrize("cls", [CompacterAdapter, ref.CompacterAdapter], ids=["fused", "reference"])
def test_every_factor_learns_from_the_second_step(cls):
    torch.manual_seed(0)
    d = 64
    adapter = cls(d, 8, 4, dtype=torch.float64)
    params = dict(adapter.named_parameters())
    initial = {k: p.detach().clone() for k, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    h, target = torch.randn(16, d, dtype=torch.float64), torch.randn(16, d, dtype=torch.float64)
    for step in range(2):
        optimizer.zero_grad()
        F.mse_loss(adapter(h), target).backward()
        if step == 0:  # only the up layer's s and bias can move while its weight is zero
            assert adapter.up.s.grad.abs().max() > 0 and adapter.up.bias.grad.abs().max() > 0
        optimizer.step()
    for name, p in params.items():
        assert p.grad.abs().max() > 0, f"{name} got no gradient in step 2"
        assert not torch.equal(p, initial[name]), f"{name} did not change"


def test_adapter_parameter_count_vit_base():
    adapter = CompacterAdapter(768, n=4)  # k = 768 // 32 = 24
    assert adapter.k == 24
    counts = {name: p.numel() for name, p in adapter.named_parameters()}
    assert counts == {"A": 64, "down.s": 24, "down.t": 768, "down.bias": 24, "up.s": 768, "up.t": 24, "up.bias": 768}


@pytest.mark.parametrize("cls", [CompacterAdapter, ref.CompacterAdapter], ids=["fused", "reference"])
def test_adapter_cannot_merge(cls):
    with pytest.raises(ValueError, match="cannot be merged.*GELU"):
        cls(64, 8, 4).merge()


def test_extra_repr():
    text = repr(CompacterAdapter(64, 8, 4))
    assert "d=64, k=8, n=4, shared_A=False" in text
    assert "PHMLinear(in_features=64, out_features=8, n=4, bias=True, shared_A=True)" in text


@pytest.mark.parametrize(
    "build, error, match",
    [
        pytest.param(lambda: CompacterAdapter(64, 6, 4), ValueError, "n=4 must divide k=6", id="k"),
        pytest.param(lambda: CompacterAdapter(66, 8, 4), ValueError, "n=4 must divide d=66", id="d"),
        pytest.param(lambda: CompacterAdapter(16, None, 4), ValueError, "k must be a positive int", id="k0"),
        pytest.param(lambda: PHMLinear(64, 8, 0), ValueError, "n must be a positive int", id="n0"),
        pytest.param(lambda: PHMLinear(64, 8, 4, A=nn.Parameter(torch.zeros(2, 2, 2))), ValueError,
                     r"shape \(4, 4, 4\)", id="A-shape"),
        pytest.param(lambda: PHMLinear(64, 8, 4, A=[1.0]), TypeError, "A must be None", id="A-type"),
        pytest.param(lambda: PHMLinear(64, 8, 4, A=nn.Module()), TypeError, "A must be None", id="A-owner"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


# ---------------------------------------------------------------------------- AdapterWrapper
class Recorder(nn.Module):
    """Returns its input scaled and shifted by keyword arguments; remembers what it got."""

    def __init__(self):
        super().__init__()
        self.label = "recorder"

    def forward(self, x, scale=1.0, *, shift=0.0):
        self.seen = (scale, shift)
        return x * scale + shift


def test_wrapper_forwards_args_and_kwargs():
    wrapper = AdapterWrapper(Recorder(), nn.Identity())
    x = torch.randn(2, 3)
    assert torch.equal(wrapper(x, 2.0, shift=1.0), x * 2.0 + 1.0)
    assert wrapper.seen == (2.0, 1.0)
    assert wrapper.label == "recorder"  # attributes the wrapper lacks are the base module's
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute


def test_wrapper_on_timm_attention_forwards_attn_mask():
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).double()
    adapter = CompacterAdapter(32, 8, 4, dtype=torch.float64)
    perturb(adapter, seed=4)
    wrapper = AdapterWrapper(attn, adapter)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = torch.zeros(5, 5, dtype=torch.bool).fill_diagonal_(True)  # each token sees only itself
    assert torch.equal(wrapper(x, attn_mask=None), adapter(attn(x)))
    masked = wrapper(x, attn_mask=mask, is_causal=False)
    assert torch.equal(masked, adapter(attn(x, attn_mask=mask)))
    assert not torch.allclose(masked, wrapper(x))  # the mask reached the attention
    assert wrapper.num_heads == 4


@pytest.mark.parametrize(
    "cls, argument, value, error",
    [pytest.param(PHMLinear, *case.values, id=f"phm-{case.id}")
     for case in cases(in_features="positive_int", out_features="positive_int", n="positive_int", bias="bool")]
    + [pytest.param(CompacterAdapter, *case.values, id=f"adapter-{case.id}")
       # k=None is valid (d // 32)
       for case in cases(d="positive_int", k=("positive_int", ("none",)), n="positive_int")],
)
def test_hyperparameters_through_the_shared_validators(cls, argument, value, error):
    """PHMLinear's in_features, out_features, n, bias and CompacterAdapter's d, k, n: a
    TypeError for a value of the wrong kind (a bool, a string, a tensor, None, 2.0 or 2.5 as
    a size; an int as the bias flag), a ValueError out of range; the message names the argument."""
    kwargs = dict(in_features=64, out_features=8, n=4, bias=True) if cls is PHMLinear else dict(d=64, k=8, n=4)
    kwargs[argument] = value
    with pytest.raises(error, match=names_argument(argument)):
        cls(**kwargs)


def test_default_bottleneck_too_small_names_k():
    with pytest.raises(ValueError, match=r"^k must be a positive int or None \(None: d // 32\), got None"):
        CompacterAdapter(16, n=4)
    assert CompacterAdapter(64, n=2).k == 2


# ----------------------------------------------------------------------------------------
# PHMBank: every adapter's PHM weights built together (kk.adapt's Compacter)
# ----------------------------------------------------------------------------------------
def banked_vit(depth=3, dtype=torch.float64, seed=0):
    """A tiny ViT adapted with Compacter (its PHMBank), every adapter tensor nonzero."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, num_classes=5)
    model = kk.adapt(vit.to(dtype), "compacter", n=4, k=8).train()
    perturb(model, seed + 7)
    return model


def bank_of(model):
    return model.blocks[0].attn.adapter.down._bank[0]


def without_bank(model):
    """The same model with every PHM layer building its own weight (kron_delta)."""
    import copy

    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, PHMLinear):
            module._bank = None
    return plain


def test_adapt_gives_one_bank_for_every_phm_layer():
    model = banked_vit(depth=3)
    bank = bank_of(model)
    layers = [m for m in model.modules() if isinstance(m, PHMLinear)]
    assert len(layers) == 12 and len(bank) == 12 and all(m._bank[0] is bank for m in layers)
    assert repr(bank) == "PHMBank(12 layers in 2 shape groups)"  # the down (8, 64) and up (64, 8) weights
    assert not any("bank" in key for key in model.state_dict())


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp64", "bf16-autocast"])
def test_bank_matches_each_layer_building_its_own(autocast):
    """Output and every gradient: the banked model against the same model without a bank
    (float64: to rounding). Under bf16 autocast on fp32 the output is bit for bit the same (both
    round the same fp32 weights once); the gradients agree to fp32 rounding (1e-5 relative: the
    shared A's gradient sums the layers' contributions in another order, in fp32)."""
    dtype = torch.float64 if autocast is None else torch.float32
    model = banked_vit(dtype=dtype)
    plain = without_bank(model)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    got, want = outputs_and_grads(model, x, autocast=autocast), outputs_and_grads(plain, x, autocast=autocast)
    assert got.keys() == want.keys()
    for name in want:
        if autocast is None:
            assert_rel_close(got[name], want[name], RTOL[torch.float64], name)
        elif name == "out":
            assert torch.equal(got[name], want[name]), name
        else:
            assert_rel_close(got[name], want[name], 1e-5, name)


def test_bank_builds_once_per_forward_and_is_dropped_by_the_backward():
    """Gradient accumulation (no parameter changes between two backwards) and two forwards
    before one backward both work, and give the sums of the single steps' gradients."""
    model = banked_vit()
    bank = bank_of(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    single = torch.autograd.grad(model(x).square().sum(), params)
    assert not bank._built  # the backward consumed the graph: nothing reusable is left
    for _ in range(2):  # accumulation: the second forward builds again
        model(x).square().sum().backward()
    for p, g in zip(params, single):
        assert_rel_close(p.grad, 2 * g, RTOL[torch.float64])
        p.grad = None
    loss = model(x).square().sum()
    assert len(bank._built) == 2  # one set per shape group, shared by the next forward
    built = dict(bank._built)
    loss = loss + model(x).square().sum()
    assert all(bank._built[key] is built[key] for key in built)
    for got, g in zip(torch.autograd.grad(loss, params), single):
        assert_rel_close(got, 2 * g, RTOL[torch.float64])


def test_bank_follows_parameter_updates():
    """An optimizer step, and an in-place change of one layer's factors, are seen by the next
    forward (the stamps of A, s and t), in and out of no_grad."""
    model = banked_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        assert_rel_close(model(x), without_bank(model)(x), RTOL[torch.float64])
        model.blocks[1].mlp.adapter.up.s.mul_(3.0)  # one layer, in place, no optimizer
        assert_rel_close(model(x), without_bank(model)(x), RTOL[torch.float64])
    with torch.no_grad():
        model.blocks[0].attn.adapter.down.t.add_(1.0)
    assert_rel_close(model(x), without_bank(model)(x), RTOL[torch.float64])


def test_bank_survives_copies_and_pickles():
    import copy
    import io

    model = banked_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).sum()  # a built set with its graph: copies must not carry it
    clone = copy.deepcopy(model)
    assert bank_of(clone) is not bank_of(model) and not bank_of(clone)._built
    assert all(m._bank[0] is bank_of(clone) for m in clone.modules() if isinstance(m, PHMLinear))
    with torch.no_grad():
        clone.blocks[0].attn.adapter.down.s.add_(1.0)
        assert not torch.equal(clone(x), model(x))  # the copy's layers are its own
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bank_is_bypassed_where_its_op_does_not_serve(monkeypatch):
    """Explicit triton or cuda: every layer keeps its own kron_delta (those kernels stay
    measurable); auto, torch and dense: the bank."""
    model = banked_vit()
    calls = []
    real = kk.ops.kron_deltas
    monkeypatch.setattr(kk.ops, "kron_deltas", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name, used in (("auto", True), ("torch", True), ("dense", True), ("triton", False), ("cuda", False)):
        calls.clear()
        bank_of(model)._built.clear()  # nothing cached: a bank that serves must build
        with kk.use_backend(name), torch.no_grad():
            for module in model.modules():
                if isinstance(module, PHMLinear):
                    module.phm_weight(torch.float32) if used else None
        assert bool(calls) == used, name
    # the reference Compacter and a standalone adapter have no bank
    assert all(m._bank is None for m in CompacterAdapter(64, 8, 4).modules() if isinstance(m, PHMLinear))


def test_bank_arguments():
    shared = nn.Module()
    shared.A = nn.Parameter(torch.randn(4, 4, 4))
    with pytest.raises(TypeError, match="bank must be a PHMBank"):
        CompacterAdapter(64, 8, 4, A=shared, bank="yes")
    with pytest.raises(ValueError, match="share one A: pass A"):
        CompacterAdapter(64, 8, 4, bank=kk.nn.PHMBank())
    bank = kk.nn.PHMBank()
    adapter = CompacterAdapter(64, 8, 4, A=shared, bank=bank)
    with pytest.raises(ValueError, match="registered with a PHMBank already"):
        bank.add(adapter.down)
    other = nn.Module()
    other.A = nn.Parameter(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="share one A"):
        CompacterAdapter(64, 16, 4, A=other, bank=bank)  # a new shape group: still refused, nothing joins
    assert len(bank) == 2 and repr(bank) == "PHMBank(2 layers in 2 shape groups)"
    with pytest.raises(TypeError, match="holds PHMLinear layers"):
        bank.add(nn.Linear(2, 2))
