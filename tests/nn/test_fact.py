"""FacT-TT / FacT-TK (kron_kernels.nn.FacTLinear, kk.adapt "fact_tt"/"fact_tk") against the
FacT-style reference: slot layout, per-layer agreement, dropout, merge, bad configs."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import kron_kernels as kk
from bad_hyperparameters import cases, names_argument
from kron_kernels.nn import FacTLinear
from kron_kernels.reference import fact as ref
from utils import RTOL, TRITON_DEVICES, assert_rel_close

D, R = 16, 3  # r = 3: a rank no kernel tile divides


def owner(fmt, n_slots, seed=0, r=R, d=D):
    """A SharedFactors-like module with random nonzero factors (V too: at init V = 0 hides everything)."""
    gen = torch.Generator().manual_seed(seed)
    m = nn.Module()

    def rand(*shape):
        return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5)

    m.U, m.V = rand(d, r), rand(d, r)
    if fmt == "tt":
        m.cores = rand(n_slots, r, r)
    else:
        m.C, m.P = rand(r, r, r), rand(n_slots, r)
    return m


def run(layer, shared, x, seed=1):
    """Output and the gradients of x and every shared factor for a fixed cotangent."""
    x = x.detach().clone().requires_grad_()
    params = dict(shared.named_parameters())
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(device=out.device, dtype=out.dtype)  # one cotangent for every dtype and device
    grads = torch.autograd.grad(out, [x, *params.values()], g)
    return {"out": out, "x": grads[0], **dict(zip(params, grads[1:]))}


LAYERS = [
    pytest.param("rows", (5, 6, 7), (3 * D, D), id="qkv-rows"),
    pytest.param("rows", (8,), (D, D), id="proj-rows"),
    pytest.param("cols", (0, 2, 4, 9), (D, 4 * D), id="fc2-cols"),
]


@pytest.mark.parametrize("fmt", ["tt", "tk"])
@pytest.mark.parametrize("mode, slots, shape", LAYERS)
def test_layer_matches_reference_float64(fmt, mode, slots, shape):
    """The fused layer (x @ U once for all slots) and the reference chain (x @ U per slot)
    agree on the output and on the gradients of x, U, V and the cores (float64: only the
    summation order differs)."""
    shared = owner(fmt, 12)
    base = nn.Linear(shape[1], shape[0], dtype=torch.float64)
    x = torch.randn(2, 7, shape[1], dtype=torch.float64)
    got = run(FacTLinear(base, slots, mode, fmt, shared, scale=0.7, dropout=0.1).eval(), shared, x)
    want = run(ref.FacTLinear(base, slots, mode, fmt, shared, scale=0.7, dropout=0.1).eval(), shared, x)
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float64], name)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mode, slots, shape", LAYERS)
def test_layer_on_triton_matches_reference(mode, slots, shape, device):
    """The layer's fused path on the Triton kernel (fp32 activations, ops.fact_linear) against
    the float64 reference chain; 1e-4 is the fp32 tolerance of tests/utils.RTOL."""
    shared, shared64 = owner("tt", 12).float().to(device), owner("tt", 12)
    base = nn.Linear(shape[1], shape[0]).to(device)
    base64 = copy.deepcopy(base).double().cpu()
    x = torch.randn(2, 7, shape[1], device=device)
    with kk.use_backend("triton"):
        got = run(FacTLinear(base, slots, mode, "tt", shared, scale=0.7).eval(), shared, x)
    want = run(ref.FacTLinear(base64, slots, mode, "tt", shared64, scale=0.7).eval(), shared64, x.double().cpu())
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float32], name)


@pytest.mark.parametrize("fmt", ["tt", "tk"])
@pytest.mark.parametrize("mode, slots, shape", LAYERS)
def test_layer_is_base_plus_materialised_increments(fmt, mode, slots, shape):
    """Independent check of the layout: the output equals the frozen Linear plus the
    Eq. (9)/(11) einsum increments placed as row blocks (rows mode) or column blocks (cols)."""
    shared = owner(fmt, 12, seed=3)
    base = nn.Linear(shape[1], shape[0], dtype=torch.float64)
    if fmt == "tt":
        deltas = ref.fact_tt_delta(shared.U, shared.V, shared.cores, 0.7)
    else:
        deltas = ref.fact_tk_delta(shared.U, shared.V, shared.C, shared.P, 0.7)
    blocks = [deltas[i] for i in slots]
    dense = torch.cat(blocks, dim=0 if mode == "rows" else 1)
    x = torch.randn(4, shape[1], dtype=torch.float64)
    layer = FacTLinear(base, slots, mode, fmt, shared, scale=0.7).eval()
    assert_rel_close(layer(x), base(x) + x @ dense.t(), RTOL[torch.float64])


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=2, num_heads=2, num_classes=5,
                             **kwargs).double().eval()


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_slot_order_layer_major(impl):
    """Slot i = 12 * layer + (q, k, v, o, fc1[0..3], fc2[0..3]): with only core i nonzero,
    merging changes exactly the weight block DESIGN.md 4.2 assigns to slot i, by delta_i."""
    model = kk.adapt(tiny_vit(), "fact_tt", impl=impl, r=R)
    shared = model.kk_shared
    assert shared.cores.shape == (24, R, R)
    with torch.no_grad():
        shared.V.normal_()
    blocks = {  # slot offset -> (module path, weight block)
        0: ("attn.qkv", (slice(0, D), slice(None))), 1: ("attn.qkv", (slice(D, 2 * D), slice(None))),
        2: ("attn.qkv", (slice(2 * D, 3 * D), slice(None))), 3: ("attn.proj", (slice(None), slice(None))),
        **{4 + j: ("mlp.fc1", (slice(j * D, (j + 1) * D), slice(None))) for j in range(4)},
        **{8 + j: ("mlp.fc2", (slice(None), slice(j * D, (j + 1) * D))) for j in range(4)},
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for slot in (1, 3, 6, 9, 12 + 0, 12 + 11):
        with torch.no_grad():
            shared.cores.zero_()
            shared.cores[slot].normal_()
        delta = kk.fact_tt_delta(shared.U, shared.V, shared.cores, scale=1.0)[slot]
        kk.merge(model)
        layer, (path, block) = slot // 12, blocks[slot % 12]
        key = f"blocks.{layer}.{path}.weight"
        for name, value in model.state_dict().items():
            if name == key:
                changed = value - before[name]
                assert_rel_close(changed[block], delta, 1e-12, f"slot {slot}")
                changed[block] = 0
                assert changed.abs().max() == 0, f"slot {slot} changed {name} outside its block"
            elif name.endswith("weight"):
                assert torch.equal(value, before[name]), f"slot {slot} changed {name}"
        kk.unmerge(model)


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_merge_unmerge(method, impl):
    model = kk.adapt(tiny_vit(), method, impl=impl, r=R, scale=0.3)
    with torch.no_grad():
        for t in kk.adapter_state_dict(model).values():
            t.normal_(0.0, 0.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x)
    kk.merge(model)
    assert not torch.equal(model.blocks[1].mlp.fc2.weight, before["blocks.1.mlp.fc2.weight"])
    assert_rel_close(model(x), y, RTOL[torch.float64], "merged output")
    kk.unmerge(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} not restored bitwise"
    assert torch.equal(model(x), y)


def test_dropout_only_in_training():
    """Eval is deterministic and dropout-free; training drops elements of the r-dim
    intermediate (the output changes from call to call), and dropout=0 in training equals eval."""
    model = kk.adapt(tiny_vit(), "fact_tt", r=R, dropout=0.5)
    no_drop = kk.adapt(tiny_vit(), "fact_tt", r=R, dropout=0.0)
    with torch.no_grad():
        model.kk_shared.V.normal_()
    no_drop.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y_eval = model(x)
    assert torch.equal(model(x), y_eval) and torch.equal(no_drop(x), y_eval)
    no_drop.train()
    assert_rel_close(no_drop(x), y_eval, RTOL[torch.float64], "dropout=0 in training")
    model.train()
    torch.manual_seed(0)
    y1, y2 = model(x), model(x)
    assert not torch.allclose(y1, y_eval) and not torch.allclose(y1, y2)


def test_fused_computes_x_at_U_once_per_linear():
    """The fused qkv layer multiplies by U once (the reference three times): count matmuls
    whose right operand is U with a dispatch-level counter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shared = owner("tt", 12)

    class CountU(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.matmul.default):
                if args[1].shape[-2:] == (D, R):
                    CountU.count += 1
            return func(*args, **(kwargs or {}))

    base = nn.Linear(D, 3 * D, dtype=torch.float64)
    x = torch.randn(5, D, dtype=torch.float64)
    counts = {}
    for name, cls in (("fused", FacTLinear), ("reference", ref.FacTLinear)):
        CountU.count = 0
        with torch.no_grad(), CountU():
            cls(base, (0, 1, 2), "rows", "tt", shared).eval()(x)
        counts[name] = CountU.count
    assert counts == {"fused": 1, "reference": 3}


@pytest.mark.parametrize(
    "model_kwargs, config, error, match",
    [
        pytest.param({}, dict(r=0), ValueError, "r must be a positive int, got 0", id="r0"),
        pytest.param({}, dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0", id="dropout"),
        pytest.param({}, dict(scale=float("inf")), ValueError, "scale must be a finite number, got inf", id="scale"),
        pytest.param(dict(mlp_ratio=2.0), {}, ValueError,
                     r"fact_tt needs blocks.0.mlp.fc1 to have an \(out, in\) = \(64, 16\) weight", id="mlp-ratio"),
    ],
)
def test_bad_config(model_kwargs, config, error, match):
    model = tiny_vit(**model_kwargs)
    before = repr(model)
    with pytest.raises(error, match=match):
        kk.adapt(model, "fact_tt", **config)
    assert repr(model) == before


@pytest.mark.parametrize(
    "argument, value, error",
    cases(scale="finite", dropout="dropout")
    + [pytest.param("slots[1]", *case.values[1:], id=f"slot-{case.id}")
       for case in cases(slot=("non_negative_int", ("none",)))]
    + [pytest.param("slots[1]", None, TypeError, id="slot-none")],
)
@pytest.mark.parametrize("fmt", ["tt", "tk"])
def test_layer_hyperparameters_through_the_shared_validators(fmt, argument, value, error):
    """FacTLinear's scale, dropout and slot indices: a TypeError for a value of the wrong kind
    (a bool, a string, a tensor, None, a float as an index), a ValueError out of range or not
    finite; the message names the argument, and the base Linear is left as it was."""
    shared = owner(fmt, 12)
    base = nn.Linear(D, 3 * D, dtype=torch.float64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    kwargs = dict(slots=[5, 6, 7], scale=0.7, dropout=0.1)
    if argument.startswith("slots"):
        kwargs["slots"] = [5, value, 7]
    else:
        kwargs[argument] = value
    with pytest.raises(error, match=names_argument(argument)):
        FacTLinear(base, mode="rows", fmt=fmt, shared=shared, **kwargs)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "slots, shared, error, match",
    [
        pytest.param([], owner("tt", 12), ValueError, "slots must name at least one", id="no-slots"),
        pytest.param(5, owner("tt", 12), TypeError, "slots must be a sequence", id="int-slots"),
        pytest.param([5], owner("tt", 4), ValueError, "must index the shared module's 4 slots", id="slot-out"),
        pytest.param([5], nn.Module(), ValueError, "needs tensors U and V", id="no-U"),
    ],
)
def test_layer_semantic_refusals(slots, shared, error, match):
    with pytest.raises(error, match=match):
        FacTLinear(nn.Linear(D, D, dtype=torch.float64), slots, "rows", "tt", shared)


# ----------------------------------------------------------------------------------------
# FacTCoreBank: every layer's cores from one split per forward pass (kk.adapt's fused FacT)
# ----------------------------------------------------------------------------------------
def banked_fact(fmt, depth=2, seed=0):
    """A tiny float64 ViT adapted with FacT (its core bank), every factor nonzero (V too)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=depth, num_heads=2, num_classes=5)
    model = kk.adapt(vit.double(), f"fact_{fmt}", r=R, dropout=0.0).train()
    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in model.kk_shared.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def fact_layers(model):
    return [m for m in model.modules() if isinstance(m, FacTLinear)]


def unbanked(model):
    plain = copy.deepcopy(model)
    for layer in fact_layers(plain):
        layer._bank = None
    return plain


def step_outputs(model, x):
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = model(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return {"out": out, **dict(zip(params, torch.autograd.grad(out, list(params.values()), cot)))}


@pytest.mark.parametrize("fmt", ["tt", "tk"])
def test_core_bank_serves_every_layer_and_matches_indexing(fmt):
    model = banked_fact(fmt)
    layers = fact_layers(model)
    bank = layers[0]._bank
    assert len(layers) == 8 and all(layer._bank is bank for layer in layers)
    assert repr(bank) == f"FacTCoreBank({fmt!r}, 8 layers)" and bank._partition()
    assert not any("bank" in key for key in model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got, want = step_outputs(model, x), step_outputs(unbanked(model), x)
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float64], name)


@pytest.mark.parametrize("fmt", ["tt", "tk"])
def test_core_bank_accumulates_and_follows_updates(fmt):
    """Two backwards without a parameter change in between (TK's product is built again after
    the first consumed it), then an optimizer step and an in-place change the next forward sees."""
    model = banked_fact(fmt)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    single = torch.autograd.grad(model(x).square().sum(), params)
    for _ in range(2):
        model(x).square().sum().backward()
    for p, g in zip(params, single):
        assert_rel_close(p.grad, 2 * g, RTOL[torch.float64])
    torch.optim.SGD(params, lr=0.01).step()
    with torch.no_grad():
        assert_rel_close(model(x), unbanked(model)(x), RTOL[torch.float64])
        (model.kk_shared.cores if fmt == "tt" else model.kk_shared.P).mul_(2.0)
        assert_rel_close(model(x), unbanked(model)(x), RTOL[torch.float64])


def test_core_bank_survives_copies_and_pickles():
    import io

    model = banked_fact("tk")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    model(x).sum()  # a built product with its graph: copies must not carry it
    clone = copy.deepcopy(model)
    bank = fact_layers(clone)[0]._bank
    assert bank is not fact_layers(model)[0]._bank and not bank._built and bank._shared[0] is clone.kk_shared
    with torch.no_grad():
        clone.kk_shared.C.add_(1.0)
        assert not torch.equal(clone(x), model(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))


def test_core_bank_steps_aside_when_the_slots_do_not_tile():
    """Layers whose slots leave a gap (or skip one) index their own cores: same numbers."""
    shared = owner("tt", 6)
    bank = kk.nn.FacTCoreBank(shared, "tt")
    layer = FacTLinear(nn.Linear(D, 3 * D).double(), [0, 1, 2], "rows", "tt", shared, dropout=0.0, bank=bank)
    other = FacTLinear(nn.Linear(D, 2 * D).double(), [4, 5], "rows", "tt", shared, dropout=0.0, bank=bank)
    assert not bank._partition() and bank.cores(layer) is None and bank.cores(other) is None
    x = torch.randn(5, D, dtype=torch.float64)
    plain = copy.deepcopy(layer)
    plain._bank = None
    assert torch.equal(layer(x), plain(x))


def test_core_bank_arguments():
    shared = owner("tt", 3)
    with pytest.raises(ValueError, match="fmt must be one of"):
        kk.nn.FacTCoreBank(shared, "cp")
    with pytest.raises(TypeError, match="bank must be a FacTCoreBank"):
        FacTLinear(nn.Linear(D, 3 * D).double(), [0, 1, 2], "rows", "tt", shared, bank="yes")
    with pytest.raises(ValueError, match="its own shared module and format"):
        FacTLinear(nn.Linear(D, 3 * D).double(), [0, 1, 2], "rows", "tt", owner("tt", 3),
                   bank=kk.nn.FacTCoreBank(shared, "tt"))
