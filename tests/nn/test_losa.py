"""LoSA (kron_kernels.nn.LoSAModel / LoSAMixer, kk.adapt "losa"): the backbone never sees
autograd, the side network matches the plain reference, video mixing, merge refusal."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import kron_kernels as kk
from bad_hyperparameters import cases, names_argument
from kron_kernels.nn import LoSAMixer, LoSAModel
from kron_kernels.reference import losa as ref
from utils import MODEL_BACKENDS, RTOL, assert_rel_close, model_outputs_and_grads

D, R = 32, 6


def tiny_vit(depth=2, **kwargs):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=depth, num_heads=2, num_classes=5,
                             **kwargs).eval()


def images(batch=3, dtype=torch.float32):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def perturb(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in kk.adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.3)


def test_wrapper_layout():
    """adapt returns the wrapper; odd layers (1-based) mix channels, even layers tokens
    (T = 16 patches + cls = 17); W_up is zero and alpha one at init."""
    model = kk.adapt(tiny_vit(depth=4), "losa", r=R)
    assert isinstance(model, LoSAModel) and isinstance(model.backbone, VisionTransformer)
    kinds = [(m.kind, tuple(m.W_down.shape)) for m in model.side]
    assert kinds == [("channel", (D, R)), ("token", (17, R))] * 2
    assert all(torch.equal(m.W_up, torch.zeros_like(m.W_up)) and m.alpha.item() == 1.0 for m in model.side)
    assert model.embed_dim == D  # attributes fall through to the backbone


@pytest.mark.parametrize(
    "vit_kwargs",
    [pytest.param({}, id="cls-token"), pytest.param(dict(global_pool="avg", fc_norm=True), id="avg-fc-norm"),
     pytest.param(dict(class_token=False, global_pool="avg", reg_tokens=2), id="no-cls-2-reg")],
)
def test_identity_at_init_and_head_semantics(vit_kwargs):
    """At init h_L = z_L exactly, and the wrapper's norm + forward_head (pooling, fc_norm) give
    the original model's output bitwise, for the pooling variants timm has."""
    original = tiny_vit(**vit_kwargs)
    model = kk.adapt(copy.deepcopy(original), "losa", r=R)
    x = images()
    assert torch.equal(model(x), original(x))
    perturb(model)
    assert not torch.allclose(model(x), original(x))


def test_backbone_gets_no_graph_and_no_gradient():
    """The hooks' block outputs carry no autograd graph; after a training step only the side
    network and the head have gradients, and the backbone's saved state is untouched."""
    model = kk.adapt(tiny_vit(), "losa", r=R).train()
    perturb(model)
    zs = model.block_outputs(images())
    assert len(zs) == 2 and all(not z.requires_grad and z.grad_fn is None for z in zs)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loss = F.cross_entropy(model(images()), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith(("side.", "backbone.head."))
        assert p.requires_grad == trainable, name
        assert (p.grad is not None and p.grad.abs().max() > 0) == trainable, name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("head."))


def _saved_bytes(model, x, labels):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), labels)
    loss.backward()
    return total


def test_training_saves_less_than_full_backprop():
    """LoSA's central claim, on CPU: a training step keeps far fewer activations for the
    backward than an adapter that backpropagates through the backbone (FacT-TT here). The
    ratio grows with depth; at depth 4 it is measured at about 5x, 2x leaves a wide margin."""
    x, labels = images(batch=4), torch.tensor([0, 1, 2, 3])
    losa = _saved_bytes(kk.adapt(tiny_vit(depth=4), "losa", r=R).train(), x, labels)
    fact = _saved_bytes(kk.adapt(tiny_vit(depth=4), "fact_tt", r=4).train(), x, labels)
    assert 2 * losa < fact, f"LoSA saved {losa} bytes, FacT-TT {fact}"


@pytest.mark.parametrize(
    "kind, shape, features, frames, prefix",
    [
        pytest.param("channel", (2, 17, D), D, None, 0, id="channel"),
        pytest.param("token", (2, 17, D), 17, None, 0, id="token-T17"),
        pytest.param("video", (2, 1 + 3 * 4, D), 4, 3, 1, id="video-F3-P4-cls"),
    ],
)
def test_mixer_matches_reference_float64(kind, shape, features, frames, prefix):
    fused = LoSAMixer(kind, features, R, frames=frames, prefix=prefix, dtype=torch.float64)
    naive = ref.LoSAMixer(kind, features, R, frames=frames, prefix=prefix, dtype=torch.float64)
    perturb_module(fused)
    naive.load_state_dict(fused.state_dict())
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(shape, generator=gen, dtype=torch.float64)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for module in (fused, naive):
        hi = h.clone().requires_grad_()
        out = module(hi, z)
        params = [hi, *(getattr(module, n) for n in module.kk_adapter_params)]
        results.append([out, *torch.autograd.grad(out, params, torch.cos(out.detach()))])
    names = ["out", "h", *fused.kk_adapter_params]
    for name, got, want in zip(names, *results):
        assert_rel_close(got, want, RTOL[torch.float64], name)


def perturb_module(module, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in module.kk_adapter_params:
            p = getattr(module, name)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)


def test_video_mixers_follow_the_frame_major_layout():
    """Independent check of the video layout (prefix, then frame-major patches): with only the
    temporal mixer active, changing the input of (frame 0, patch 2) changes exactly patch 2 of
    every frame; with only the spatial mixer active, exactly the patches of frame 0; prefix
    tokens never change in a token layer."""
    frames, patches = 3, 4
    mixer = LoSAMixer("video", patches, R, frames=frames, prefix=1, dtype=torch.float64)
    perturb_module(mixer)
    h = torch.zeros(1, 1 + frames * patches, D, dtype=torch.float64)
    z = torch.randn(h.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z2 = z.clone()
    z2[0, 1 + 0 * patches + 2] += 1.0  # frame 0, patch 2
    for active, expected in (("temporal", {1 + f * patches + 2 for f in range(frames)}),
                             ("spatial", {1 + p for p in range(patches)})):
        other = "spatial" if active == "temporal" else "temporal"
        with torch.no_grad():
            getattr(mixer, f"W_up_{other}").zero_()
            changed = (mixer(h, z2) - mixer(h, z)).abs().amax(-1)[0]
        assert {i for i in range(changed.numel()) if changed[i] > 0} == expected, active
        perturb_module(mixer)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_video_model_agrees_across_impls(impl):
    """frames=2 on a 16-patch model: 8 patches per frame; fused and reference agree (float64)."""
    models = {i: kk.adapt(tiny_vit().double(), "losa", impl=i, r=R, frames=2) for i in ("fused", "reference")}
    assert [m.kind for m in models[impl].side] == ["channel", "video"]
    assert tuple(models[impl].side[1].W_down_spatial.shape) == (8, R)
    assert tuple(models[impl].side[1].W_down_temporal.shape) == (2, R)
    perturb(models["fused"])
    kk.load_adapter_state_dict(models["reference"], kk.adapter_state_dict(models["fused"]))
    x = images(dtype=torch.float64)
    assert_rel_close(models["fused"](x), models["reference"](x), RTOL[torch.float64])


def test_merge_refuses_and_checkpoint_keys():
    model = kk.adapt(tiny_vit(), "losa", r=R)
    with pytest.raises(ValueError, match="losa adapters cannot be merged: the side network is nonlinear"):
        kk.merge(model)
    with pytest.raises(ValueError, match="losa adapters cannot be merged or unmerged"):
        kk.unmerge(model)
    assert set(kk.adapter_state_dict(model)) == {
        "backbone.head.weight", "backbone.head.bias",
        *(f"side.{i}.{p}" for i in range(2) for p in ("W_down", "W_up", "alpha")),
    }


@pytest.mark.parametrize(
    "config, match",
    [
        pytest.param(dict(r=0), "r must be a positive int, got 0", id="r0"),
        pytest.param(dict(frames=3), "frames=3 must divide the model's 16 patch tokens", id="frames"),
        pytest.param(dict(frames=0), r"frames must be a positive int or None \(None: an image\), got 0", id="frames0"),
    ],
)
def test_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        kk.adapt(tiny_vit(), "losa", **config)


@pytest.mark.parametrize("method", ["losa", "arc"])
def test_adapting_the_wrapper_again_raises(method):
    with pytest.raises(ValueError, match=r"already adapted \(losa\)"):
        kk.adapt(kk.adapt(tiny_vit(), "losa", r=R), method)


def test_deepcopy_rebinds_the_hooks():
    """A deep copy of the wrapper collects into itself (its hooks are bound to the copy)."""
    model = kk.adapt(tiny_vit(), "losa", r=R)
    clone = copy.deepcopy(model)
    x = images()
    assert torch.equal(clone(x), model(x))
    perturb(clone)
    assert not torch.allclose(clone(x), model(x))
    assert torch.equal(model(x), tiny_vit()(x))


@pytest.mark.parametrize("impl, device", MODEL_BACKENDS)
@pytest.mark.parametrize("frames", [None, 2], ids=["image", "video-F2"])
def test_model_matches_reference_modules(frames, impl, device):
    """The side network's fused mixers in fp32 (on backend ``impl``) against the model built from
    the reference modules (kron_kernels/reference, ``impl="reference"``) in float64 with the same
    adapter tensors and backbone: output and every trainable gradient, 1e-4."""
    model = kk.adapt(tiny_vit(), "losa", r=R, frames=frames).to(device)
    perturb(model)
    reference = kk.adapt(tiny_vit().double(), "losa", impl="reference", r=R, frames=frames)
    kk.load_adapter_state_dict(reference, kk.adapter_state_dict(model))
    x = images(dtype=torch.float64)
    cotangent = torch.cos(reference(x).detach())
    want = model_outputs_and_grads(reference, x, cotangent)
    with kk.use_backend(impl):
        got = model_outputs_and_grads(model, x.float().to(device), cotangent)
    assert got.keys() == want.keys() and len(want) > 2
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float32], name)


@pytest.mark.parametrize(
    "kind, argument, value, error",
    [pytest.param("channel", *case.values, id=f"channel-{case.id}")
     for case in cases(features="positive_int", r="positive_int", frames=("positive_int", ("none",)),
                       prefix="non_negative_int")]
    + [pytest.param("video", *case.values, id=f"video-{case.id}")
       for case in cases(features="positive_int", r="positive_int", frames="positive_int",
                         prefix="non_negative_int")],
)
def test_mixer_hyperparameters_through_the_shared_validators(kind, argument, value, error):
    """LoSAMixer's features, r, frames (None only outside video) and prefix: a TypeError for a
    value of the wrong kind (a bool, a string, a tensor, None, a float as a size), a ValueError
    out of range; the message names the argument."""
    kwargs = dict(kind=kind, features=4, r=R, frames=3 if kind == "video" else None, prefix=1)
    kwargs[argument] = value
    with pytest.raises(error, match=names_argument(argument)):
        LoSAMixer(**kwargs)
