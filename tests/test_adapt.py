"""kk.adapt / merge / unmerge / adapter state dicts on timm VisionTransformers (no downloads)."""
import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import kron_kernels as kk
from utils import RTOL, assert_rel_close, rel_err

# configs that fit the tiny ViT (d = 64): n divides d, and k for Compacter
TINY_CONFIG = {
    "kadaptation": dict(n=8),
    "compacter": dict(n=4, k=8),
    "fact_tt": dict(r=4, scale=0.5),
    "fact_tk": dict(r=5, scale=2.0),  # an odd rank
    "arc": dict(r=6),
    "losa": dict(r=6),
}
METHOD_IMPLS = [
    pytest.param(method, impl, id=f"{method}-{impl}") for method in kk.METHODS for impl in ("fused", "reference")
]


def tiny_vit(seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5, **kwargs
    )
    return model.to(dtype).eval()


def adapted(method, impl="fused", seed=0, dtype=torch.float32, adapt_seed=1, **config):
    model = tiny_vit(seed, dtype)
    torch.manual_seed(adapt_seed)
    return kk.adapt(model, method, impl=impl, **{**TINY_CONFIG[method], **config})


def images(dtype=torch.float32, seed=0, batch=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def perturb(model, seed):
    """Random nonzero adapter and head values (at init the increments are exactly zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in kk.adapter_state_dict(model).items():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.2)


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def outputs_and_grads(model, x, seed=0):
    params = trainable(model)
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(device=out.device, dtype=out.dtype)
    return {"out": out, **dict(zip(params, torch.autograd.grad(out, list(params.values()), g)))}


def test_methods_registry():
    assert kk.METHODS == ("kadaptation", "compacter", "fact_tt", "fact_tk", "arc", "losa")


# ---------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("method, impl", METHOD_IMPLS)
def test_parameter_count_vit_base(method, impl):
    """The papers' budgets on ViT-B/16 with default configs: 2*32^3 + 12*2*(32*24 + 32*24) = 102,400
    for KAdaptation; 4^3 + 24 adapters * (792 + 24 + 792 + 768) = 57,088 for Compacter; FacT-TT
    r=4: 2*768*4 + 144*4^2 = 8,448; FacT-TK r=8: 2*768*8 + 144*8 + 8^3 = 13,952; ARC r=50:
    2*768*50 + 24*(50 + 768) = 96,432; LoSA r=64, 197 tokens: 6 channel mixers 2*768*64, 6 token
    mixers 2*197*64 and 12 alphas = 741,132."""
    # counting needs no memory and no weights. (device= rather than `with torch.device("meta")`:
    # that context misses torch.empty while conftest's NaN-poison fixture has patched it)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, device="meta")
    model = kk.adapt(model, method, impl=impl)  # LoSA returns its wrapper
    assert all(p.is_meta for p in model.parameters())
    head = sum(p.numel() for p in model.get_classifier().parameters())
    count = sum(p.numel() for p in model.parameters() if p.requires_grad) - head
    assert count == {
        "kadaptation": 102_400, "compacter": 57_088, "fact_tt": 8_448, "fact_tk": 13_952, "arc": 96_432, "losa": 741_132
    }[method]
    shared = {name: tuple(p.shape) for name, p in model.kk_shared.named_parameters()}
    assert shared == {
        "kadaptation": {"A_q": (32, 32, 32), "A_v": (32, 32, 32)},
        "compacter": {"A": (4, 4, 4)},
        "fact_tt": {"U": (768, 4), "V": (768, 4), "cores": (144, 4, 4)},
        "fact_tk": {"U": (768, 8), "V": (768, 8), "C": (8, 8, 8), "P": (144, 8)},
        "arc": {"U_attn": (768, 50), "U_mlp": (768, 50)},
        "losa": {},
    }[method]


@pytest.mark.parametrize(
    "targets, per_layer",
    [
        pytest.param(("q", "v"), 2 * (8 * 8 + 8 * 8), id="qv"),
        pytest.param(("k",), 8 * 8 + 8 * 8, id="k"),
        pytest.param(("q", "k", "v", "proj"), 4 * (8 * 8 + 8 * 8), id="qkv-proj"),
    ],
)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_kadaptation_targets(targets, per_layer, impl):
    original = tiny_vit()
    model = kk.adapt(copy.deepcopy(original), "kadaptation", impl=impl, n=8, targets=targets)
    count = sum(p.numel() for n, p in trainable(model).items() if not n.startswith("head."))
    assert count == len(targets) * 8**3 + 2 * per_layer
    assert torch.equal(model(images()), original(images()))
    assert ("proj" in targets) == hasattr(model.blocks[0].attn.proj, "kk_adapter_params")


# ---------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("method, impl", METHOD_IMPLS)
def test_identity_at_init(method, impl):
    """At init every increment is exactly zero, so the adapted model computes the original's
    output bitwise (the same GEMMs on the same weights, plus exact zeros)."""
    original = tiny_vit()
    model = kk.adapt(copy.deepcopy(original), method, impl=impl, **TINY_CONFIG[method])
    x = images()
    assert torch.equal(model(x), original(x))
    assert torch.equal(model.forward_features(x), original.forward_features(x))


@pytest.mark.parametrize("method", kk.METHODS)
def test_freezes_backbone_keeps_head_trainable(method):
    model = adapted(method)
    names = set(trainable(model))
    assert names == set(kk.adapter_state_dict(model))
    head = "backbone.head" if method == "losa" else "head"  # LoSA returns a wrapper (its ViT is .backbone)
    assert {f"{head}.weight", f"{head}.bias"} <= names
    names = {n.removeprefix("backbone.") for n in names}
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token", "norm.")) for n in names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen = [n.removeprefix("backbone.") for n in frozen]
    assert any(n.startswith("blocks.0.norm1.") for n in frozen)
    assert len(frozen) == len(list(tiny_vit().parameters())) - 2  # all but head


def test_kadaptation_keeps_backbone_state_dict_names():
    keys = set(adapted("kadaptation").state_dict())
    assert set(tiny_vit().state_dict()) <= keys


@pytest.mark.parametrize("method, impl", METHOD_IMPLS)
def test_training_moves_every_factor(method, impl):
    """Two SGD steps: every adapter tensor gets a nonzero gradient and changes; the backbone none.

    float64, so that "changed" means "got a gradient": in fp32 the step-2 update of the down
    projection (its gradient flows through the up weight, one small step away from zero) can
    round away.
    """
    model = adapted(method, impl, dtype=torch.float64).train()
    params = trainable(model)
    initial = {k: p.detach().clone() for k, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.05)
    x, labels = images(torch.float64, batch=4), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient in step 2"
        assert not torch.equal(p, initial[name]), f"{name} did not change"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", kk.METHODS)
def test_same_seed_same_init_across_impls(method):
    """Both impls draw their factors in the same order: one seed gives one initial state."""
    fused, reference = adapted(method, "fused"), adapted(method, "reference")
    want = reference.state_dict()
    assert fused.state_dict().keys() == want.keys()
    assert all(torch.equal(t, want[k]) for k, t in fused.state_dict().items())


@pytest.mark.parametrize("method", kk.METHODS)
def test_reference_and_fused_agree(method):
    """Same backbone, same adapter state: outputs and every trainable gradient agree (float64)."""
    fused = adapted(method, "fused", dtype=torch.float64)
    reference = adapted(method, "reference", dtype=torch.float64, adapt_seed=7)
    perturb(fused, seed=3)
    reference.load_state_dict(fused.state_dict())  # same names and shapes: strict full load
    kk.load_adapter_state_dict(reference, kk.adapter_state_dict(fused))
    x = images(torch.float64)
    got, want = outputs_and_grads(fused, x), outputs_and_grads(reference, x)
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float64], name)


@pytest.mark.parametrize("method", kk.METHODS)
def test_autocast_bf16(method):
    """A bf16-autocast forward (frozen fp32 model, fp32 factors; backward outside autocast, as
    recommended) trains, and its output's error against the float64 reference is at most twice
    the naive reference's own bf16 error (DESIGN.md 6). Gradients are held to that rule per
    module (tests/nn): through a whole network the bf16 rounding of the shared backbone ops
    (LayerNorm, attention) differs run to run, so per-tensor gradient errors are too noisy
    for a factor-of-two comparison (measured: up to 2.5x either way over 40 seeds)."""
    fused = adapted(method, "fused")
    perturb(fused, seed=8)
    state = fused.state_dict()
    naive = adapted(method, "reference")
    naive.load_state_dict(state)
    exact = adapted(method, "reference", dtype=torch.float64)
    exact.load_state_dict(state)
    x = images(batch=2)
    want = exact(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, base = fused(x), naive(x)
    e_fused, e_naive = rel_err(got, want), rel_err(base, want)
    assert e_fused <= 2 * e_naive + 1e-3, f"output: fused {e_fused:.2e} vs naive bf16 {e_naive:.2e}"
    got.float().logsumexp(-1).sum().backward()
    for name, p in trainable(fused).items():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------- merge
@pytest.mark.parametrize(
    "config",
    [pytest.param({}, id="qv"), pytest.param(dict(targets=("k", "proj"), bias=True, r=2, scale=0.5), id="k-proj-bias")],
)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_merge_unmerge_round_trip(impl, config):
    model = adapted("kadaptation", impl, dtype=torch.float64, **config)
    perturb(model, seed=4)
    x = images(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model(x)
    assert kk.merge(model) is model
    qkv_weight = model.blocks[0].attn.qkv.weight
    assert not torch.equal(qkv_weight, before["blocks.0.attn.qkv.weight"])
    # merged forwards are plain Linears on the merged weights: same output, increment not added twice
    assert_rel_close(model(x), y0, RTOL[torch.float64], "merged output")
    with pytest.raises(ValueError, match="already merged"):
        kk.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        kk.load_adapter_state_dict(model, kk.adapter_state_dict(model))
    assert kk.unmerge(model) is model
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), f"{key} not restored bitwise"
    assert torch.equal(model(x), y0)
    with pytest.raises(ValueError, match="not merged"):
        kk.unmerge(model)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_compacter_cannot_merge(impl):
    model = adapted("compacter", impl)
    with pytest.raises(ValueError, match="compacter adapters cannot be merged.*GELU"):
        kk.merge(model)
    with pytest.raises(ValueError, match="compacter"):
        kk.unmerge(model)


def test_merge_needs_an_adapted_model():
    for fn in (kk.merge, kk.unmerge, kk.adapter_state_dict):
        with pytest.raises(ValueError, match="kk.adapt"):
            fn(tiny_vit())


# ---------------------------------------------------------------------------- checkpoints
def assert_checkpoint_round_trip(model, fresh, x):
    """``model``'s adapter_state_dict through torch.save/load into ``fresh`` (the same backbone,
    other adapter init): same outputs on ``x``, the same full state."""
    buffer = io.BytesIO()
    torch.save(kk.adapter_state_dict(model), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert not torch.equal(fresh(x), model(x))
    result = kk.load_adapter_state_dict(fresh, loaded)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(fresh(x), model(x))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", kk.METHODS)
def test_checkpoint_round_trip(method):
    model = adapted(method)
    perturb(model, seed=5)
    state = kk.adapter_state_dict(model)
    trainable_numel = sum(p.numel() for p in trainable(model).values())
    assert sum(t.numel() for t in state.values()) == trainable_numel
    assert_checkpoint_round_trip(model, adapted(method, adapt_seed=9), images())


def test_state_dict_shares_storage_and_adapter_keys():
    model = adapted("kadaptation")
    state = kk.adapter_state_dict(model)
    expected = {"kk_shared.A_q", "kk_shared.A_v", "head.weight", "head.bias"}
    expected |= {f"blocks.{i}.attn.qkv.{p}_{t}" for i in range(2) for p in "UV" for t in "qv"}
    assert set(state) == expected
    assert state["kk_shared.A_q"].data_ptr() == model.kk_shared.A_q.data_ptr()


def _drop(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    "make_state, match",
    [
        pytest.param(lambda s: _drop(s, "blocks.1.attn.qkv.V_v"), "missing keys: blocks.1.attn.qkv.V_v", id="missing"),
        pytest.param(lambda s: {**s, "blocks.0.attn.qkv.U_k": s["blocks.0.attn.qkv.U_q"]},
                     "unexpected keys: blocks.0.attn.qkv.U_k", id="unexpected"),
        pytest.param(lambda s: {**s, "kk_shared.A_q": torch.zeros(4, 4, 4)},
                     r"shape mismatch for kk_shared.A_q: checkpoint \(4, 4, 4\) vs model \(8, 8, 8\)", id="shape"),
        pytest.param(lambda s: kk.adapter_state_dict(adapted("kadaptation", r=2)), "shape mismatch", id="other-rank"),
        pytest.param(lambda s: kk.adapter_state_dict(adapted("compacter")), "missing keys.*unexpected keys",
                     id="other-method"),
    ],
)
def test_load_mismatched_state_raises(make_state, match):
    model = adapted("kadaptation")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        kk.load_adapter_state_dict(model, make_state(kk.adapter_state_dict(adapted("kadaptation", adapt_seed=3))))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed load changed the model"


def test_load_non_strict_reports_and_loads_the_rest():
    model, source = adapted("kadaptation"), adapted("kadaptation", adapt_seed=3)
    perturb(source, seed=6)
    state = {**_drop(kk.adapter_state_dict(source), "head.bias"), "extra": torch.zeros(1)}
    result = kk.load_adapter_state_dict(model, state, strict=False)
    assert result.missing_keys == ["head.bias"] and result.unexpected_keys == ["extra"]
    assert torch.equal(model.blocks[1].attn.qkv.V_v, source.blocks[1].attn.qkv.V_v)
    with pytest.raises(ValueError, match="shape mismatch"):  # never ignored
        kk.load_adapter_state_dict(model, {"kk_shared.A_q": torch.zeros(2, 2, 2)}, strict=False)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda: kk.adapt(nn.Sequential(nn.Linear(4, 4)), "kadaptation"), TypeError,
                     "timm.models.vision_transformer.VisionTransformer.*got torch.nn.modules.container.Sequential",
                     id="not-a-vit"),
        pytest.param(lambda: kk.adapt(tiny_vit(), "lora"), ValueError,
                     r"unknown method 'lora'; kk.METHODS = "
                     r"\('kadaptation', 'compacter', 'fact_tt', 'fact_tk', 'arc', 'losa'\)", id="unknown-method"),
        pytest.param(lambda: kk.adapt(tiny_vit(), "kadaptation", n=8, rank=2), TypeError,
                     r"kadaptation got unknown config \['rank'\]", id="unknown-config"),
        pytest.param(lambda: kk.adapt(tiny_vit(), "compacter", impl="triton", k=8), ValueError,
                     "impl must be one of", id="bad-impl"),
        pytest.param(lambda: kk.adapt(tiny_vit(), "kadaptation", n=12), ValueError,
                     "blocks.0.attn.qkv: n=12 must divide the hidden size d=64", id="kadaptation-n"),
        pytest.param(lambda: kk.adapt(tiny_vit(), "compacter", n=3, k=9), ValueError,
                     "n=3 must divide the hidden size d=64", id="compacter-n"),
        pytest.param(lambda: kk.adapt(tiny_vit(), "compacter"), ValueError,
                     "n=4 must divide the hidden size d=64 and the bottleneck size k=2", id="compacter-k"),
        pytest.param(lambda: kk.adapt(tiny_vit(), "kadaptation", n=8, targets=("q", "o")), ValueError,
                     "targets must be distinct names among", id="kadaptation-targets"),
        pytest.param(lambda: kk.adapt(adapted("compacter"), "kadaptation", n=8), ValueError,
                     r"already adapted \(compacter\)", id="adapt-twice"),
    ],
)
def test_bad_input_raises_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_failed_adapt_leaves_model_untouched():
    model = tiny_vit()
    before = repr(model)
    with pytest.raises(ValueError):
        kk.adapt(model, "kadaptation", n=5)
    assert repr(model) == before and all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "kk_shared")


# ---------------------------------------------------------------------------- wrappers
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_wrapped_attention_forwards_kwargs(impl):
    model = adapted("compacter", impl, dtype=torch.float64)
    perturb(model, seed=7)
    blk = model.blocks[0]
    tokens = torch.randn(2, 5, 64, dtype=torch.float64)
    out = blk.attn(tokens, attn_mask=None)
    assert torch.equal(out, blk.attn.adapter(blk.attn.base(tokens)))
    mask = torch.zeros(5, 5, dtype=torch.bool).fill_diagonal_(True)
    masked = blk.attn(tokens, attn_mask=mask, is_causal=False)
    assert torch.equal(masked, blk.attn.adapter(blk.attn.base(tokens, attn_mask=mask)))
    assert not torch.allclose(masked, out)
    assert blk(tokens, attn_mask=mask).shape == tokens.shape  # timm's Block passes attn_mask through


# ---------------------------------------------------------------------------- GPU, real size
@pytest.mark.gpu
@pytest.mark.parametrize("method", kk.METHODS)
def test_vit_base_fused_on_cuda_matches_float64_reference(method):
    """ViT-B/16 at 224 on CUDA: the fused model in fp32 (Triton kernels) against the reference in
    float64, outputs and every trainable gradient. TF32 is off so that the frozen backbone's
    cuBLAS/cuDNN calls are true fp32 (the Triton kernels use IEEE fp32 dots for fp32 inputs).

    Tolerance: ``RTOL[fp32]``, or twice the error of the *reference* model run in fp32 on the
    same GPU where that is larger (DESIGN.md 6's rule, here for fp32). Some gradients are sums
    with heavy cancellation that no fp32 computation gets to 1e-4: LoSA's ``side.0.alpha`` is
    a sum over ~300k products of a random cotangent, and the fp32 errors of the backbone and of
    the eleven side layers behind it reach it amplified by that cancellation (the H200 measured
    2.7e-4 for the fused model). The op alone is not the cause: ``losa_mixer``'s alpha gradient
    at ViT-B size (2 x 197 x 768, r = 64, Triton under the interpreter) is within 4.7e-7 of
    float64, as accurate as the fp32 torch path (1.1e-6). A fused model worse than twice the
    fp32 reference still fails."""
    torch.manual_seed(0)
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    fused = kk.adapt(copy.deepcopy(backbone), method).cuda()
    perturb(fused, seed=1)
    naive = kk.adapt(copy.deepcopy(backbone), method, impl="reference").cuda()
    naive.load_state_dict(fused.state_dict())
    exact = kk.adapt(backbone.double(), method, impl="reference").cuda()
    exact.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)).cuda()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            got, fp32, want = (outputs_and_grads(fused, x), outputs_and_grads(naive, x),
                               outputs_and_grads(exact, x.double()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert got.keys() == want.keys() == fp32.keys()
    for name in want:
        tol = max(RTOL[torch.float32], 2 * rel_err(fp32[name], want[name]))
        assert_rel_close(got[name], want[name], tol, name)
