"""kk.adapt on timm Swin Transformers: the methods that carry over, and clean refusals (no downloads)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import kron_kernels as kk
from test_adapt import perturb, trainable
from test_bad_input import assert_unchanged, snapshot
from utils import RTOL, assert_rel_close

# tiny Swin: stages of width 16 and 32, two blocks each (the second of stage 0 uses shifted
# windows: a 14 x 14 map, 7 x 7 windows); n divides both widths, and k for Compacter
SWIN_METHODS = ("kadaptation", "compacter", "fact_tt", "fact_tk", "arc")
TINY_CONFIG = {
    "kadaptation": dict(n=8),
    "compacter": dict(n=4, k=8),
    "fact_tt": dict(r=4, scale=0.5),
    "fact_tk": dict(r=5, scale=2.0),
    "arc": dict(r=6),
}
MERGEABLE = ("kadaptation", "fact_tt", "fact_tk", "arc")
WIDTHS, DEPTHS = (16, 32), (2, 2)


def tiny_swin(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=WIDTHS[0], depths=DEPTHS,
        num_heads=(1, 2), img_size=56, window_size=7, num_classes=5,
        drop_path_rate=0.0,  # timm's Swin default (0.1) drops whole samples' branches in training mode
    )
    return model.to(dtype).eval()


def adapted(method, impl="fused", seed=0, dtype=torch.float32, adapt_seed=1, **config):
    model = tiny_swin(seed, dtype)
    torch.manual_seed(adapt_seed)
    return kk.adapt(model, method, impl=impl, **{**TINY_CONFIG[method], **config})


def images(dtype=torch.float32, seed=0, batch=2):
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def adapter_count(model):
    return sum(p.numel() for n, p in trainable(model).items() if not n.startswith("head."))


def expected_count(method, widths, depths, **config):
    """The parameter budget of each method on a Swin with these stage widths and depths."""
    blocks = sum(depths)
    sum_ld = sum(L * d for L, d in zip(depths, widths))
    if method == "kadaptation":  # one global A per target; u, v: (n, r * d / n) per target and layer
        n, r = config.get("n", 32), config.get("r", 1)
        return 2 * n**3 + 2 * 2 * r * sum_ld
    if method == "compacter":  # one global A; per adapter: rank-1 PHM down (d + k) + bias k, up (k + d) + bias d
        n, k = config.get("n", 4), config.get("k")
        total = n**3
        for L, d in zip(depths, widths):
            k_i = k if k is not None else n * max(1, -(-(d // 32) // n))
            total += 2 * L * ((d + k_i) + k_i + (k_i + d) + d)
        return total
    if method == "fact_tt":  # per stage: U, V (d, r), cores (12 L, r, r)
        r = config["r"]
        return sum(2 * d * r + 12 * L * r * r for L, d in zip(depths, widths))
    if method == "fact_tk":  # per stage: U, V (d, r), C (r, r, r), P (12 L, r)
        r = config["r"]
        return sum(2 * d * r + r**3 + 12 * L * r for L, d in zip(depths, widths))
    if method == "arc":  # per stage U_attn, U_mlp (d, r); per adapter lam (r), bias (d)
        r = config.get("r", 50)
        return sum(2 * d * r for d in widths) + 2 * (blocks * r + sum_ld)
    raise AssertionError(method)


# ---------------------------------------------------------------------------- counts
@pytest.mark.parametrize("method", SWIN_METHODS)
def test_parameter_count_tiny(method):
    model = adapted(method)
    assert adapter_count(model) == expected_count(method, WIDTHS, DEPTHS, **TINY_CONFIG[method])


# Swin-B (widths 128..1024, depths 2, 2, 18, 2) with default configs, computed by the code on
# the meta device; FacT-TT at r=16 is the paper's 0.135M (FacT Table 2)
SWIN_B = {
    ("kadaptation", ()): 113_664,
    ("compacter", ()): 74_512,
    ("fact_tt", ()): 19_968,
    ("fact_tt", (("r", 16),)): 135_168,
    ("fact_tk", ()): 35_072,
    ("arc", ()): 218_464,
}


@pytest.mark.parametrize("method, config", [pytest.param(m, dict(c), id=f"{m}{dict(c)}") for m, c in SWIN_B])
def test_parameter_count_swin_base(method, config):
    model = timm.create_model("swin_base_patch4_window7_224", pretrained=False, device="meta")
    model = kk.adapt(model, method, **config)
    assert all(p.is_meta for p in model.parameters())
    count = adapter_count(model)
    full = {**kk.adapt.__globals__["_REGISTRY"][method].defaults, **config}
    assert count == expected_count(method, (128, 256, 512, 1024), (2, 2, 18, 2), **full)
    assert count == SWIN_B[(method, tuple(sorted(config.items())))]


def test_shared_factor_layout():
    assert {n: tuple(p.shape) for n, p in adapted("kadaptation").kk_shared.named_parameters()} == {
        "A_q": (8, 8, 8), "A_v": (8, 8, 8)
    }
    assert {n: tuple(p.shape) for n, p in adapted("arc").kk_shared.named_parameters()} == {
        "stage0.U_attn": (16, 6), "stage0.U_mlp": (16, 6), "stage1.U_attn": (32, 6), "stage1.U_mlp": (32, 6)
    }
    assert {n: tuple(p.shape) for n, p in adapted("fact_tt").kk_shared.named_parameters()} == {
        "stage0.U": (16, 4), "stage0.V": (16, 4), "stage0.cores": (24, 4, 4),
        "stage1.U": (32, 4), "stage1.V": (32, 4), "stage1.cores": (24, 4, 4),
    }


# ---------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("method", SWIN_METHODS)
def test_identity_at_init(method, impl):
    original = tiny_swin()
    model = kk.adapt(copy.deepcopy(original), method, impl=impl, **TINY_CONFIG[method])
    x = images()
    assert torch.equal(model(x), original(x))


@pytest.mark.parametrize("method", SWIN_METHODS)
def test_training_changes_only_adapters_and_head(method):
    model = adapted(method, dtype=torch.float64).train()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = trainable(model)
    assert set(params) == set(kk.adapter_state_dict(model))
    assert {"head.fc.weight", "head.fc.bias"} <= set(params)
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
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, frozen_before[name]), name


@pytest.mark.parametrize("method", SWIN_METHODS)
def test_reference_and_fused_agree(method):
    fused = adapted(method, "fused", dtype=torch.float64)
    reference = adapted(method, "reference", dtype=torch.float64, adapt_seed=7)
    perturb(fused, seed=3)
    reference.load_state_dict(fused.state_dict())
    x = images(torch.float64)
    params_f, params_r = trainable(fused), trainable(reference)
    assert params_f.keys() == params_r.keys()
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out_f, out_r = fused(x), reference(x)
    assert_rel_close(out_f, out_r, RTOL[torch.float64], "out")
    grads_f = torch.autograd.grad(out_f, list(params_f.values()), g)
    grads_r = torch.autograd.grad(out_r, list(params_r.values()), g)
    for name, a, b in zip(params_f, grads_f, grads_r):
        assert_rel_close(a, b, RTOL[torch.float64], name)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_unmerge_round_trip(method, impl):
    model = adapted(method, impl, dtype=torch.float64)
    perturb(model, seed=4)
    x = images(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model(x)
    assert kk.merge(model) is model
    assert_rel_close(model(x), y0, RTOL[torch.float64], "merged output")
    assert kk.unmerge(model) is model
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), f"{key} not restored bitwise"
    assert torch.equal(model(x), y0)


def test_compacter_refuses_merge():
    model = adapted("compacter")
    before = snapshot(model)
    with pytest.raises(ValueError, match="nonlinear"):
        kk.merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", SWIN_METHODS)
def test_adapter_state_dict_round_trip(method):
    source = adapted(method, dtype=torch.float64)
    perturb(source, seed=5)
    state = {k: v.clone() for k, v in kk.adapter_state_dict(source).items()}
    assert not any(k.startswith(("patch_embed", "layers.0.downsample", "norm.")) for k in state)
    target = adapted(method, dtype=torch.float64, adapt_seed=9)
    result = kk.load_adapter_state_dict(target, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = images(torch.float64)
    assert torch.equal(target(x), source(x))
    # a state from the other width layout does not load into a model of other widths
    other = kk.adapt(
        timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32, depths=DEPTHS,
                          num_heads=(1, 2), img_size=56, window_size=7, num_classes=5),
        method, **TINY_CONFIG[method],
    )
    before = snapshot(other)
    with pytest.raises(ValueError, match="shape mismatch"):
        kk.load_adapter_state_dict(other, state)
    assert_unchanged(other, before)


@pytest.mark.parametrize("method", SWIN_METHODS)
def test_adapter_file_round_trip(tmp_path, method):
    """kk.save_adapter / kk.load_adapter on Swin: a bitwise round trip into either impl, the
    metadata naming the Swin class; the file refused, unchanged, by a ViT adapted the same way."""
    from test_adapt import tiny_vit

    source = adapted(method)
    perturb(source, seed=5)
    path = tmp_path / "swin.safetensors"
    kk.save_adapter(source, path)
    info = kk.adapter_file_info(path)
    assert info.method == method and "SwinTransformer" in info.model_class
    x = images()
    for impl in ("fused", "reference"):
        target = adapted(method, impl=impl, adapt_seed=9)
        kk.load_adapter(target, path)
        for key, value in kk.adapter_state_dict(source).items():
            assert torch.equal(kk.adapter_state_dict(target)[key], value), (impl, key)
        if impl == "fused":
            assert torch.equal(target(x), source(x))
    vit = kk.adapt(tiny_vit(), method, **TINY_CONFIG[method])
    before = snapshot(vit)
    with pytest.raises(ValueError, match="model"):
        kk.load_adapter(vit, path)
    assert_unchanged(vit, before)


def test_compacter_default_k_per_stage():
    """k=None: d_i // 32 rounded up to a multiple of n per stage (Swin-T's d=96 gets 4 at n=4)."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, device="meta")
    model = kk.adapt(model, "compacter")
    ks = [model.layers[i].blocks[0].attn.adapter.k for i in range(4)]
    assert ks == [4, 8, 12, 24]
    assert model.kk_shared.config["k"] is None


# ---------------------------------------------------------------------------- refusals
def test_losa_refuses_swin_unchanged():
    model = tiny_swin()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"losa does not support .*SwinTransformer.*side network"):
        kk.adapt(model, "losa")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "method, config, match",
    [
        pytest.param("kadaptation", dict(n=32), "n=32 must divide the hidden size d=16", id="kadaptation-n"),
        pytest.param("compacter", dict(n=4, k=6), "n=4 must divide .* k=6", id="compacter-k"),
        pytest.param("fact_tt", dict(r=0), "r must be a positive int", id="fact-r"),
        pytest.param("arc", dict(r=4, dropout=1.0), "dropout", id="arc-dropout"),
    ],
)
def test_bad_config_leaves_swin_unchanged(method, config, match):
    model = tiny_swin()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        kk.adapt(model, method, **config)
    assert_unchanged(model, before)


def test_adapted_swin_refuses_second_adapt():
    model = adapted("arc")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already adapted"):
        kk.adapt(model, "kadaptation", n=8)
    assert_unchanged(model, before)
