"""kk.adapt on timm ViT variants with other prefix tokens than one class token (no downloads):
DeiT's distilled ViT (class + distillation token, two heads), a ViT without class token
(average pooling), register tokens with and without a class token.

Every method serves every variant: KAdaptation, Compacter, FacT and ARC act on each token alone
(their layers see no token layout), and LoSA's token mixers span the whole token axis,
``num_patches + num_prefix_tokens`` tokens, whatever the prefix. A ViT whose token count varies
(``dynamic_img_size``, patch dropout) is refused by LoSA before anything changes.
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import kron_kernels as kk
from test_adapt import TINY_CONFIG, assert_checkpoint_round_trip, perturb, trainable
from test_bad_input import MERGEABLE, assert_unchanged, snapshot
from utils import RTOL, assert_rel_close, rel_err

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
PATCHES = (32 // 8) ** 2

# variant: (how to build it, its number of prefix tokens)
VARIANTS = {
    # timm's VisionTransformerDistilled: cls + distillation token, (head, head_dist)
    "deit-distilled": (lambda **kw: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                                       **TINY, **kw), 2),
    "no-class-token": (lambda **kw: VisionTransformer(class_token=False, global_pool="avg", **TINY, **kw), 0),
    # timm's registered reg4-gap config: 4 registers, no class token, average pooling, no fc_norm
    "reg4-gap": (lambda **kw: timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False, **TINY, **kw), 4),
    "class-token-reg4": (lambda **kw: VisionTransformer(reg_tokens=4, **TINY, **kw), 5),
}
VARIANT_METHODS = [pytest.param(v, m, id=f"{v}-{m}") for v in VARIANTS for m in kk.METHODS]


def variant(name, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    model = VARIANTS[name][0](**kwargs).to(dtype).eval()
    assert model.num_prefix_tokens == VARIANTS[name][1]
    return model


def adapted(name, method, dtype=torch.float32, adapt_seed=1, impl="fused", **config):
    model = variant(name, dtype=dtype)
    torch.manual_seed(adapt_seed)
    return kk.adapt(model, method, impl=impl, **{**TINY_CONFIG[method], **config})


def images(dtype=torch.float32, seed=0, batch=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def head_names(name, method):
    prefix = "backbone." if method == "losa" else ""  # LoSA returns its wrapper
    heads = ("head", "head_dist") if name == "deit-distilled" else ("head",)
    return {f"{prefix}{h}.{p}" for h in heads for p in ("weight", "bias")}


# ---------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("name, method", VARIANT_METHODS)
def test_identity_at_init(name, method, impl):
    """Every increment is zero at init: the adapted model's features are the original's, bitwise.

    The logits too, bitwise, with one exception: LoSA's fused side network returns its last
    block output as a new, contiguous tensor, while without any prefix token timm's block outputs
    keep the channel-major strides of the patch embedding's transpose (no concatenation copies
    them); average pooling sums the same values in another order then (~1e-7 relative in fp32)."""
    original = variant(name)
    model = kk.adapt(copy.deepcopy(original), method, impl=impl, **TINY_CONFIG[method])
    x = images()
    assert torch.equal(model.forward_features(x), original.forward_features(x))
    got, want = model(x), original(x)
    if method == "losa" and VARIANTS[name][1] == 0:
        assert rel_err(got, want) <= 1e-6
    else:
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name, method", VARIANT_METHODS)
def test_gradients_reach_exactly_the_adapters(name, method):
    """The trainable tensors are the adapter's and the head(s)' (DeiT: both heads), exactly the
    adapter state dict; each gets a nonzero gradient, no backbone parameter gets one."""
    model = adapted(name, method, dtype=torch.float64)
    perturb(model, seed=2)
    params = trainable(model)
    assert set(params) == set(kk.adapter_state_dict(model))
    assert head_names(name, method) <= set(params)
    out = model(images(torch.float64))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * cotangent).sum().backward()
    for key, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, f"{key} got no gradient"
        else:
            assert p.grad is None, f"frozen {key} got a gradient"


@pytest.mark.parametrize("method", kk.METHODS)
def test_deit_distilled_training_trains_both_heads(method):
    """DeiT's distillation mode returns (class logits, distillation logits) in training: a loss on
    both reaches the adapters and both heads."""
    model = adapted("deit-distilled", method)
    model.set_distilled_training(True)
    model.train()
    out = model(images(batch=4))
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape == (4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    (F.cross_entropy(out[0], labels) + F.cross_entropy(out[1], labels)).backward()
    params = trainable(model)
    for key in head_names("deit-distilled", method):
        assert params[key].grad is not None and params[key].grad.abs().max() > 0, key
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ---------------------------------------------------------------------------- merge
@pytest.mark.parametrize("name, method", VARIANT_METHODS)
def test_merge_unmerge_round_trip(name, method):
    """Mergeable methods: merged output = adapted output, unmerge restores every weight bitwise.
    The others refuse to merge and leave the model as it was."""
    model = adapted(name, method, dtype=torch.float64)
    perturb(model, seed=4)
    x = images(torch.float64)
    if method not in MERGEABLE:
        before = snapshot(model)
        with pytest.raises(ValueError, match=f"{method} adapters cannot be merged"):
            kk.merge(model)
        assert_unchanged(model, before)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model(x)
    kk.merge(model)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    assert_rel_close(model(x), y0, RTOL[torch.float64], "merged output")
    kk.unmerge(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "unmerge did not restore the weights"
    assert torch.equal(model(x), y0)


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name, method", VARIANT_METHODS)
def test_adapter_state_dict_round_trip(name, method):
    """adapter_state_dict -> torch.save/load -> load_adapter_state_dict into a differently
    initialised twin: same outputs, same full state; DeiT's distillation head travels too."""
    model = adapted(name, method)
    perturb(model, seed=5)
    state = kk.adapter_state_dict(model)
    assert head_names(name, method) <= set(state)
    assert_checkpoint_round_trip(model, adapted(name, method, adapt_seed=9), images())


# ---------------------------------------------------------------------------- LoSA's token axis
@pytest.mark.parametrize("name", list(VARIANTS))
def test_losa_token_mixers_span_every_token(name):
    """The token mixers are sized to num_patches + num_prefix_tokens, the token count of every
    block output (a prefix count off by one would fail in the forward)."""
    model = adapted(name, "losa")
    tokens = PATCHES + VARIANTS[name][1]
    assert [m.kind for m in model.side] == ["channel", "token"]
    assert model.side[1].W_down.shape == (tokens, 6) and model.side[1].W_up.shape == (6, tokens)
    assert all(z.shape == (3, tokens, 64) for z in model.block_outputs(images()))


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_losa_video_layout_after_the_prefix_tokens(name, impl):
    """frames=F: the patch tokens after the prefix are F frames; the video token layer mixes the
    patches only and leaves the prefix tokens (0, 2, 4 or 5 of them) exactly as they were."""
    model = adapted(name, "losa", impl=impl, frames=2)
    perturb(model, seed=6)
    prefix = VARIANTS[name][1]
    mixer = model.side[1]
    assert mixer.kind == "video" and mixer.prefix == prefix and mixer.features == PATCHES // 2
    zs = model.block_outputs(images())
    h = model.side[0](zs[-1], zs[0])
    out = mixer(h, zs[1])
    assert out.shape == h.shape
    assert torch.equal(out[:, :prefix], h[:, :prefix])
    assert not torch.equal(out[:, prefix:], h[:, prefix:])


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        pytest.param(dict(dynamic_img_size=True), "dynamic_img_size=True", id="dynamic-img-size"),
        pytest.param(dict(patch_drop_rate=0.25), "patch dropout", id="patch-dropout"),
    ],
)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_losa_refuses_a_varying_token_count_unchanged(name, kwargs, reason):
    """LoSA's token mixers are fixed T x r matrices: a model whose token count varies is refused
    with a ValueError naming the model class and why, before anything is changed."""
    model = variant(name, **kwargs)
    before = snapshot(model)
    cls = type(model).__name__
    with pytest.raises(ValueError, match=rf"losa needs a fixed token count T = 16 patches .*{cls} has {reason}"):
        kk.adapt(model, "losa", **TINY_CONFIG["losa"])
    assert_unchanged(model, before)
