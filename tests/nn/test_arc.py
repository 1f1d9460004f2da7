"""ARC (kron_kernels.nn.ARCAdapter, kk.adapt "arc") against the two-matmul reference:
placement, agreement, dropout, merge into qkv / fc1, bad configs."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import kron_kernels as kk
from bad_hyperparameters import cases, names_argument
from kron_kernels.nn import AdapterWrapper, ARCAdapter
from kron_kernels.reference import arc as ref
from utils import MODEL_BACKENDS, RTOL, assert_rel_close, model_outputs_and_grads

D, R = 24, 5


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=2, num_heads=2, num_classes=5,
                             **kwargs).double().eval()


def perturbed(impl="fused", **kwargs):
    model = kk.adapt(tiny_vit(**kwargs), "arc", impl=impl, r=R)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in kk.adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.3)
    return model


def test_placement_and_sharing():
    """One adapter on each norm1/norm2 output, U shared per position, lam/bias per layer."""
    model = kk.adapt(tiny_vit(), "arc", r=R)
    seen = {}
    for blk in model.blocks:
        for norm, position in (("norm1", "attn"), ("norm2", "mlp")):
            wrapper = getattr(blk, norm)
            assert isinstance(wrapper, AdapterWrapper) and isinstance(wrapper.base, nn.LayerNorm)
            adapter = wrapper.adapter
            assert isinstance(adapter, ARCAdapter) and adapter.U is getattr(model.kk_shared, f"U_{position}")
            assert torch.equal(adapter.lam, torch.zeros(R, dtype=torch.float64))
            seen.setdefault(position, set()).add(id(adapter.lam))
    assert {k: len(v) for k, v in seen.items()} == {"attn": 2, "mlp": 2}
    assert set(kk.adapter_state_dict(model)) == {
        "kk_shared.U_attn", "kk_shared.U_mlp", "head.weight", "head.bias",
        *(f"blocks.{i}.{n}.adapter.{p}" for i in range(2) for n in ("norm1", "norm2") for p in ("lam", "bias")),
    }


@pytest.mark.parametrize("shape", [(7, D), (2, 17, D)], ids=["N7", "B2-T17"])
def test_adapter_matches_reference_and_formula(shape):
    """Fused module vs reference module (float64) on outputs and every gradient, and both
    against the dense formula x (I + U diag(lam) U^T) + b written out here."""
    shared = nn.Module()
    shared.U_attn = nn.Parameter(torch.randn(D, R, dtype=torch.float64))
    fused = ARCAdapter(D, R, shared, "attn", dtype=torch.float64).eval()
    naive = ref.ARCAdapter(D, R, shared, "attn", dtype=torch.float64).eval()
    with torch.no_grad():
        fused.lam.normal_(), fused.bias.normal_()
    naive.load_state_dict(fused.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    dense = torch.eye(D, dtype=torch.float64) + shared.U_attn @ torch.diag(fused.lam) @ shared.U_attn.t()
    assert_rel_close(fused(x), x @ dense.t() + fused.bias, RTOL[torch.float64], "formula")
    results = []
    for module in (fused, naive):
        xi = x.clone().requires_grad_()
        out = module(xi)
        params = [xi, shared.U_attn, module.lam, module.bias]
        results.append([out, *torch.autograd.grad(out, params, torch.ones_like(out) * 0.5 + out.detach())])
    for name, got, want in zip(("out", "x", "U", "lam", "bias"), *results):
        assert_rel_close(got, want, RTOL[torch.float64], name)


def test_dropout_only_in_training():
    model = kk.adapt(tiny_vit(), "arc", r=R, dropout=0.5)
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm1.adapter.lam.normal_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    assert torch.equal(model(x), y)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), y) and not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv-bias", "no-qkv-bias"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_merge_unmerge(impl, qkv_bias):
    """Merge folds ARC into attn.qkv and mlp.fc1 (W' = W (I + U diag(lam) U^T), c' = c + W b):
    same output, adapters inactive; unmerge restores every tensor bitwise (and removes the qkv
    bias merge had to add when the model had none)."""
    model = perturbed(impl, qkv_bias=qkv_bias)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x)
    blk = model.blocks[1]
    U, lam, b = model.kk_shared.U_mlp, blk.norm2.adapter.lam, blk.norm2.adapter.bias
    W, c = before["blocks.1.mlp.fc1.weight"], before["blocks.1.mlp.fc1.bias"]
    kk.merge(model)
    want_w = W @ (torch.eye(D, dtype=torch.float64) + U @ torch.diag(lam) @ U.t())
    assert_rel_close(blk.mlp.fc1.weight, want_w, RTOL[torch.float64], "fc1 weight")
    assert_rel_close(blk.mlp.fc1.bias, c + W @ b, RTOL[torch.float64], "fc1 bias")
    assert (blk.attn.qkv.bias is not None)
    assert_rel_close(model(x), y, RTOL[torch.float64], "merged output")
    with pytest.raises(ValueError, match="already merged"):
        kk.merge(model)
    kk.unmerge(model)
    assert (blk.attn.qkv.bias is not None) == qkv_bias
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), f"{key} not restored bitwise"
    assert torch.equal(model(x), y)


@pytest.mark.parametrize(
    "config, error, match",
    [
        pytest.param(dict(r=0), ValueError, "r must be a positive int, got 0", id="r0"),
        pytest.param(dict(r=2.5), TypeError, "r must be a positive int, got float 2.5", id="r-float"),
        pytest.param(dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1", id="dropout"),
    ],
)
def test_bad_config(config, error, match):
    model = tiny_vit()
    before = repr(model)
    with pytest.raises(error, match=match):
        kk.adapt(model, "arc", **config)
    assert repr(model) == before


@pytest.mark.parametrize("impl, device", MODEL_BACKENDS)
def test_model_matches_reference_modules(impl, device):
    """The whole adapted model with the fused ARC adapters in fp32 (on backend ``impl``) against
    the model built from the reference modules (kron_kernels/reference, ``impl="reference"``) in
    float64 with the same adapter tensors: output and every trainable gradient, 1e-4."""
    model = perturbed().float().to(device)
    reference = kk.adapt(tiny_vit(), "arc", impl="reference", r=R)
    kk.load_adapter_state_dict(reference, kk.adapter_state_dict(model))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cotangent = torch.cos(reference(x.double()).detach())
    want = model_outputs_and_grads(reference, x.double(), cotangent)
    with kk.use_backend(impl):
        got = model_outputs_and_grads(model, x.to(device), cotangent)
    assert got.keys() == want.keys() and len(want) > 2
    for name in want:
        assert_rel_close(got[name], want[name], RTOL[torch.float32], name)


@pytest.mark.parametrize("argument, value, error", cases(d="positive_int", r="positive_int", dropout="dropout"))
def test_adapter_hyperparameters_through_the_shared_validators(argument, value, error):
    """ARCAdapter's d, r and dropout: a TypeError for a value of the wrong kind (a bool, a
    string, a tensor, None, a float as a size), a ValueError out of range or not finite; the
    message names the argument, and the shared U is left alone."""
    shared = nn.Module()
    shared.U_attn = nn.Parameter(torch.randn(D, R, dtype=torch.float64))
    U = shared.U_attn.detach().clone()
    kwargs = dict(d=D, r=R, shared=shared, position="attn", dropout=0.1)
    kwargs[argument] = value
    with pytest.raises(error, match=names_argument(argument)):
        ARCAdapter(**kwargs)
    assert torch.equal(shared.U_attn, U) and [n for n, _ in shared.named_parameters()] == ["U_attn"]
