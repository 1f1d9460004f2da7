"""Bad input never corrupts: odd operand layouts, empty batches, and refusals that leave the
caller's model exactly as it was (issue "Bad input never corrupts").

* Operand layout: the Triton kernels index biases and factors through bare pointers, so the
  ops hand them over contiguous (``ops._common.as_kernel_operand``); expanded (stride-0),
  strided and transposed operands must give the dense float64 result, outputs and gradients.
* Empty batches: every Kronecker op and every adapted ViT accept 0 tokens / 0 images.
* Refusals: ``kk.adapt``, ``merge``, ``unmerge`` and ``load_adapter_state_dict`` check before
  they change anything; :func:`snapshot` / :func:`assert_unchanged` compare everything a
  failed call could have touched.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, NamedTuple, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import kron_kernels as kk
from test_adapt import TINY_CONFIG, tiny_vit

BACKENDS = ["torch", "triton"]  # triton: the kernels under TRITON_INTERPRET=1 on CPU
FP32_TOL = 1e-4  # max-abs error over the reference's max-abs, fp32 against float64


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _dense_delta(A, U, V, scale):
    """``scale * sum_i kron(A_i, U_i V_i^T)`` with torch.kron: the definition, materialised
    (torch.kron views its operands, so a transposed ``A_i`` is copied first)."""
    return scale * sum(torch.kron(A[i].contiguous(), U[i] @ V[i].T) for i in range(A.shape[0]))


# Operand layouts. Each builds, from contiguous leaf tensors, the operand the op receives:
# the gradient must reach the leaf through the view (expand sums, a slice scatters).
def _expanded(shape):
    """A stride-0 view: the leaf has size 1 in the first dim (a 1-D bias: one element)."""
    return (1, *shape[1:]), lambda leaf: leaf.expand(*shape)


def _strided(shape):
    """Every other element of a twice-as-long last dim."""
    return (*shape[:-1], 2 * shape[-1]), lambda leaf: leaf[..., ::2]


def _transposed(shape):
    """The last two dims swapped (a 1-D operand: a column of an (n, 2) matrix, stride 2)."""
    if len(shape) == 1:
        return (shape[0], 2), lambda leaf: leaf[:, 0]
    return (*shape[:-2], shape[-1], shape[-2]), lambda leaf: leaf.transpose(-1, -2)


def _contiguous(shape):
    return tuple(shape), lambda leaf: leaf


LAYOUTS = {"expanded": _expanded, "strided": _strided, "transposed": _transposed}


class _Case(NamedTuple):
    leaves: List[torch.Tensor]  # float64 leaves
    views: List[Callable]  # leaf -> operand


def _case(shapes: Dict[str, Tuple[int, ...]], odd: Dict[str, str], seed: int = 0) -> Tuple[List[str], _Case]:
    gen = torch.Generator().manual_seed(seed)
    names, leaves, views = [], [], []
    for name, shape in shapes.items():
        leaf_shape, view = (LAYOUTS[odd[name]] if name in odd else _contiguous)(shape)
        names.append(name)
        leaves.append(torch.randn(leaf_shape, generator=gen, dtype=torch.float64))
        views.append(view)
    return names, _Case(leaves, views)


def _run(fn, case: _Case, dtype, backend):
    """``fn(*operands)`` in ``dtype`` on ``backend``, backpropagating a fixed cotangent;
    returns ``[out, grad of every leaf]``."""
    leaves = [leaf.detach().to(dtype).requires_grad_() for leaf in case.leaves]
    with kk.use_backend(backend):
        out = fn(*[view(leaf) for view, leaf in zip(case.views, leaves)])
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(out, leaves, cotangent.to(dtype))
    return [out, *grads]


def _compare_layouts(fn, ref, names, case, backend, tol=FP32_TOL):
    got = _run(fn, case, torch.float32, backend)
    want = _run(ref, case, torch.float64, "torch")
    for label, g, w in zip(["out", *(f"grad {n}" for n in names)], got, want):
        assert g.shape == w.shape, f"{label}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = _rel_err(g, w)
        assert err <= tol, f"{label}: relative max error {err:.3e} > {tol:.0e}"


# ----------------------------------------------------------------------------------------
# 1. operand layouts: the dense float64 formula is the reference
# ----------------------------------------------------------------------------------------
M, A_OUT, A_IN, P, Q, R, N = 2, 2, 3, 4, 5, 2, 7
D_IN, ROWS = A_IN * Q, A_OUT * P
SCALE = 0.7

# which operands get an odd layout; "bias-*" are the reports (the Triton forward
# read the bias as contiguous: wrong output, out of bounds on a GPU)
ODD_OPERANDS = [
    pytest.param({"bias": "expanded"}, id="bias-expanded"),
    pytest.param({"bias": "strided"}, id="bias-strided"),
    pytest.param({"bias": "transposed"}, id="bias-column"),
    *(
        pytest.param({name: layout for name in ("weight", "bias", "A", "U", "V")}, id=f"all-{layout}")
        for layout in LAYOUTS
    ),
]


@pytest.mark.parametrize("odd", ODD_OPERANDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_linear_any_operand_layout(backend, odd):
    shapes = dict(x=(N, D_IN), weight=(ROWS, D_IN), bias=(ROWS,), A=(M, A_OUT, A_IN), U=(M, P, R), V=(M, Q, R))
    names, case = _case(shapes, odd)

    def ref(x, weight, bias, A, U, V):
        return x @ (weight + _dense_delta(A, U, V, SCALE)).T + bias

    def fused(x, weight, bias, A, U, V):
        return kk.kron_linear(x, weight, bias, A, U, V, scale=SCALE)

    _compare_layouts(fused, ref, names, case, backend)


@pytest.mark.parametrize("odd", ODD_OPERANDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_linear_slices_any_operand_layout(backend, odd):
    """Two targets on the first and last thirds of a qkv-like output: the middle third is a
    gap that the Triton launcher fills with the bias, the targets' rows get their bias
    slices inside the kernel; both must read the operand's real elements."""
    d_out = 3 * ROWS
    shapes = dict(x=(2, N, D_IN), weight=(d_out, D_IN), bias=(d_out,), A=(M, A_OUT, A_IN), U=(M, P, R),
                  V=(M, Q, R), A2=(M, A_OUT, A_IN), U2=(M, P, R), V2=(M, Q, R))
    names, case = _case(shapes, {**odd, **{f"{k}2": v for k, v in odd.items() if k in "AUV"}})

    def ref(x, weight, bias, A, U, V, A2, U2, V2):
        zeros = weight.new_zeros(ROWS, D_IN)
        delta = torch.cat([_dense_delta(A, U, V, SCALE), zeros, _dense_delta(A2, U2, V2, SCALE)])
        return x @ (weight + delta).T + bias

    def fused(x, weight, bias, A, U, V, A2, U2, V2):
        return kk.kron_linear_slices(x, weight, bias, [(0, A, U, V), (2 * ROWS, A2, U2, V2)], scale=SCALE)

    _compare_layouts(fused, ref, names, case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_matmul_and_delta_any_factor_layout(backend):
    for layout in LAYOUTS:
        odd = dict(A=layout, U=layout, V=layout)
        names, case = _case(dict(x=(N, D_IN), A=(M, A_OUT, A_IN), U=(M, P, R), V=(M, Q, R)), odd)
        _compare_layouts(lambda x, A, U, V: kk.kron_matmul(x, A, U, V, scale=SCALE),
                         lambda x, A, U, V: x @ _dense_delta(A, U, V, SCALE).T, names, case, backend)
        names, case = _case(dict(A=(M, A_OUT, A_IN), U=(M, P, R), V=(M, Q, R)), odd)
        _compare_layouts(lambda A, U, V: kk.kron_delta(A, U, V, scale=SCALE),
                         lambda A, U, V: _dense_delta(A, U, V, SCALE), names, case, backend)


def test_kron_linear_grad_reaches_expanded_bias_leaf():
    """The contiguous copy the op makes is part of the graph: an expanded bias's leaf gets
    the sum of the output gradient over tokens and rows."""
    x, W = torch.randn(5, D_IN), torch.randn(ROWS, D_IN)
    A, U, V = torch.randn(M, A_OUT, A_IN), torch.randn(M, P, R), torch.randn(M, Q, R)
    for backend in BACKENDS:
        b0 = torch.randn(1, requires_grad=True)
        with kk.use_backend(backend):
            kk.kron_linear(x, W, b0.expand(ROWS), A, U, V).sum().backward()
        assert b0.grad is not None and float(b0.grad) == pytest.approx(5 * ROWS)


# The other ops that take 1-D or parameter operands (their launchers pad or copy them):
# the Triton kernels against the torch backend on the same odd-layout operands.
def _bottleneck_adapter_case():
    d, k = 12, 4
    return dict(h=(N, d), w_down=(k, d), b_down=(k,), w_up=(d, k), b_up=(d,)), \
        lambda h, w_down, b_down, w_up, b_up: kk.ops.bottleneck_adapter(h, w_down, b_down, w_up, b_up)


def _arc_case():
    d, r = 12, 3
    return dict(x=(N, d), U=(d, r), lam=(r,), bias=(d,)), \
        lambda x, U, lam, bias: kk.ops.arc(x, U, lam, bias, dropout=0.0)


def _fact_linear_case():
    d, r, k = 8, 3, 3
    return dict(x=(N, d), weight=(k * d, d), bias=(k * d,), U=(d, r), V=(d, r), cores=(k, r, r)), \
        lambda x, weight, bias, U, V, cores: kk.ops.fact_linear(x, weight, bias, U, V, cores, scale=0.5, dropout=0.0)


def _losa_mixer_case():
    c, r = 12, 3
    return dict(h=(N, c), z=(N, c), W_down=(c, r), W_up=(r, c)), \
        lambda h, z, W_down, W_up: kk.ops.losa_mixer(h, z, W_down, W_up, 0.5)


@pytest.mark.parametrize("make", [_bottleneck_adapter_case, _arc_case, _fact_linear_case, _losa_mixer_case],
                         ids=["bottleneck_adapter", "arc", "fact_linear", "losa_mixer"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_ops_triton_any_parameter_layout(make, layout):
    shapes, fn = make()
    activations = {"x", "h", "z"}
    names, case = _case(shapes, {name: layout for name in shapes if name not in activations})
    want = _run(fn, case, torch.float32, "torch")
    got = _run(fn, case, torch.float32, "triton")
    for label, g, w in zip(["out", *(f"grad {n}" for n in names)], got, want):
        err = _rel_err(g, w)
        assert err <= FP32_TOL, f"{label}: relative max error {err:.3e} > {FP32_TOL:.0e}"


# ----------------------------------------------------------------------------------------
# 2. empty batches
# ----------------------------------------------------------------------------------------
def _kron_op_calls():
    d_out = 3 * ROWS
    return {
        "kron_matmul": (ROWS, lambda x, W, b, A, U, V: kk.kron_matmul(x, A, U, V)),
        "kron_linear": (ROWS, lambda x, W, b, A, U, V: kk.kron_linear(x, W[:ROWS], b[:ROWS], A, U, V)),
        "kron_linear_slices": (
            d_out, lambda x, W, b, A, U, V: kk.kron_linear_slices(x, W, b, [(0, A, U, V), (2 * ROWS, A, U, V)])
        ),
    }


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["N0", "B2-T0"])
@pytest.mark.parametrize("op", list(_kron_op_calls()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_ops_accept_zero_tokens(backend, op, lead):
    """Torch backend before the fix: ``cannot reshape tensor of 0 elements`` (a view with -1)."""
    d_out, call = _kron_op_calls()[op]
    x = torch.randn(*lead, D_IN, requires_grad=True)
    W = torch.randn(3 * ROWS, D_IN, requires_grad=True)
    b = torch.randn(3 * ROWS, requires_grad=True)
    A, U, V = (torch.randn(s, requires_grad=True) for s in ((M, A_OUT, A_IN), (M, P, R), (M, Q, R)))
    with kk.use_backend(backend):
        y = call(x, W, b, A, U, V)
        assert y.shape == (*lead, d_out) and y.dtype == x.dtype
        y.sum().backward()
    assert x.grad.shape == x.shape
    for name, t in (("A", A), ("U", U), ("V", V)):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), f"d{name} of 0 tokens must be zero"
    if op != "kron_matmul":
        assert torch.equal(W.grad, torch.zeros_like(W)) and torch.equal(b.grad, torch.zeros_like(b))


METHOD_IMPLS = [pytest.param(m, i, id=f"{m}-{i}") for m in kk.METHODS for i in ("fused", "reference")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, impl", METHOD_IMPLS)
def test_adapted_vit_runs_an_empty_batch(method, impl, backend):
    """Forward and backward on 0 images, in training mode: a (0, classes) output and zero (not
    missing) gradients for every trainable tensor. kadaptation-fused on the torch backend
    raised ``cannot reshape tensor of 0 elements`` before the fix."""
    model = kk.adapt(tiny_vit(), method, impl=impl, **TINY_CONFIG[method]).train()
    with kk.use_backend(backend):
        out = model(torch.randn(0, 3, 32, 32))
        assert out.shape == (0, 5)
        out.sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


# ----------------------------------------------------------------------------------------
# 3. refusals leave the model as it was
# ----------------------------------------------------------------------------------------
class Snapshot(NamedTuple):
    state: Dict[str, torch.Tensor]
    requires_grad: Dict[str, bool]
    modules: List[Tuple[str, type, bool]]  # (name, type, training) of every submodule
    hooks: int  # forward hooks on every submodule (LoSA's wrapper adds some)


def snapshot(module: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: v.detach().clone() for k, v in module.state_dict().items()},
        requires_grad={name: p.requires_grad for name, p in module.named_parameters()},
        modules=[(name, type(m), m.training) for name, m in module.named_modules()],
        hooks=sum(len(m._forward_hooks) for m in module.modules()),
    )


def assert_unchanged(module: nn.Module, before: Snapshot) -> None:
    after = snapshot(module)
    assert after.modules == before.modules, "the module tree (names, types or training flags) changed"
    assert after.requires_grad == before.requires_grad, "requires_grad flags changed"
    assert after.state.keys() == before.state.keys(), "state_dict keys changed"
    changed = [k for k, v in before.state.items()
               if after.state[k].dtype != v.dtype or not torch.equal(after.state[k], v)]
    assert not changed, f"state_dict values changed: {changed}"
    assert after.hooks == before.hooks, "forward hooks were added or removed"


def _refused(model, call, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, before)


def distilled_deit():
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=16, num_classes=5
    ).eval()


def _with_block1(attr_path: str):
    """A tiny ViT whose second block lacks a layer the methods need (the first is fine, so a
    method that changed block 0 before looking at block 1 would be caught)."""

    def make():
        model = tiny_vit()
        owner, attr = attr_path.rsplit(".", 1)
        setattr(model.blocks[1].get_submodule(owner), attr, nn.Identity())
        return model

    return make


def _adapted(method):
    return lambda: kk.adapt(tiny_vit(), method, **TINY_CONFIG[method])


class _OddHeadViT(VisionTransformer):
    """A ViT whose get_classifier() returns something that is not a head module beside the head."""

    def get_classifier(self):
        return self.head, "head_dist"


def _odd_head_vit():
    torch.manual_seed(0)
    return _OddHeadViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5).eval()


def _adapt_cases():
    cases = [
        ("not-a-vit", lambda: nn.Sequential(nn.Linear(4, 4)), "kadaptation", {}, TypeError, "VisionTransformer"),
        ("unknown-method", tiny_vit, "lora", {}, ValueError, "unknown method 'lora'"),
        ("method-not-a-string", tiny_vit, ["kadaptation"], {}, ValueError, "unknown method"),
        ("bad-impl", tiny_vit, "kadaptation", dict(n=8, impl="triton"), ValueError, "impl must be one of"),
        ("unknown-config", tiny_vit, "kadaptation", dict(n=8, rank=2), TypeError, r"unknown config \['rank'\]"),
        ("kadaptation-n-divides", tiny_vit, "kadaptation", dict(n=12), ValueError, "n=12 must divide"),
        ("compacter-k-divides", tiny_vit, "compacter", dict(n=4, k=6), ValueError, "n=4 must divide"),
        ("losa-frames", tiny_vit, "losa", dict(r=4, frames=3), ValueError, "frames=3 must divide"),
        ("kadaptation-block1-qkv", _with_block1("attn.qkv"), "kadaptation", dict(n=8), TypeError,
         "blocks.1.attn.qkv to be an nn.Linear"),
        ("fact_tt-block1-fc2", _with_block1("mlp.fc2"), "fact_tt", dict(r=2), TypeError,
         "blocks.1.mlp.fc2 to be an nn.Linear"),
        ("arc-block1-fc1", _with_block1("mlp.fc1"), "arc", dict(r=2), TypeError, "blocks.1.mlp.fc1 to be an nn.Linear"),
        ("classifier-not-a-module", _odd_head_vit, "arc", dict(r=2), TypeError,
         r"_OddHeadViT.get_classifier\(\) to return the classifier module"),
    ]
    for method in kk.METHODS:
        # adapting twice (or stacking a second method) is refused
        cases.append((f"adapted-{method}", _adapted(method), "kadaptation", TINY_CONFIG["kadaptation"], ValueError,
                      rf"model is already adapted \({method}\)"))
    # LoSA's wrapped backbone: it runs without autograd inside the wrapper, adapters there
    # would never train (before the fix this was accepted)
    cases.append(("losa-backbone", lambda: _adapted("losa")().backbone, "kadaptation", TINY_CONFIG["kadaptation"],
                  ValueError, "backbone of a LoSA wrapper"))
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("make_model, method, config, error, match", _adapt_cases())
def test_adapt_refusal_leaves_model_unchanged(make_model, method, config, error, match):
    config = dict(config)
    impl = config.pop("impl", "fused")
    _refused(make_model(), lambda model: kk.adapt(model, method, impl=impl, **config), error, match)


# Bad values of every hyperparameter of every method (the names in the method's defaults):
# TypeError for a value of the wrong kind, ValueError for one out of range or not finite; the
# message starts with the method and the argument; the model is untouched.
_NAN, _INF = float("nan"), float("inf")
_BAD_COUNT = [(True, TypeError), ("4", TypeError), (1.5, TypeError), (4.0, TypeError), (_NAN, TypeError),
              (_INF, TypeError), (torch.tensor(4), TypeError), (0, ValueError), (-1, ValueError)]
BAD_HYPERPARAMETERS = {
    "n": _BAD_COUNT + [(None, TypeError)],
    "r": _BAD_COUNT + [(None, TypeError)],
    "k": _BAD_COUNT,  # None is the default (d // 32)
    "frames": _BAD_COUNT,  # None: an image
    "scale": [(True, TypeError), ("1", TypeError), (None, TypeError), (torch.tensor(1.0), TypeError),
              (1j, TypeError), (_NAN, ValueError), (_INF, ValueError), (-_INF, ValueError)],
    "dropout": [(False, TypeError), ("0.1", TypeError), (None, TypeError), (torch.tensor(0.1), TypeError),
                (_NAN, ValueError), (_INF, ValueError), (-0.1, ValueError), (1.0, ValueError), (1.5, ValueError)],
    "bias": [("yes", TypeError), (1, TypeError), (0.0, TypeError), (None, TypeError)],
    "targets": [(None, TypeError), (3, TypeError), (("q", 3), TypeError), ({"q"}, TypeError),
                ((), ValueError), (("q", "q"), ValueError), ("o", ValueError), (("q", "o"), ValueError)],
}


def _method_defaults(method):
    return importlib.import_module("kron_kernels.adapt")._REGISTRY[method].defaults


def _hyperparameter_cases():
    cases = []
    for method in kk.METHODS:
        assert set(_method_defaults(method)) <= set(BAD_HYPERPARAMETERS), f"{method}: a hyperparameter without cases"
        for arg in _method_defaults(method):
            for value, error in BAD_HYPERPARAMETERS[arg]:
                label = f"tensor({value.item()})" if isinstance(value, torch.Tensor) else repr(value)
                cases.append(pytest.param(method, arg, value, error, id=f"{method}-{arg}={label}"))
    return cases


@pytest.mark.parametrize("method, arg, value, error", _hyperparameter_cases())
def test_bad_hyperparameter_refused_by_name_unchanged(method, arg, value, error):
    config = {**TINY_CONFIG[method], arg: value}
    _refused(tiny_vit(), lambda model: kk.adapt(model, method, **config), error, rf"^{method}: {arg} must be ")


@pytest.mark.parametrize(
    "method, config, recorded",
    [
        pytest.param("kadaptation", dict(n=np.int64(8), r=np.int32(2), scale=2, targets="k"),
                     dict(n=8, r=2, scale=2.0, targets=("k",)), id="kadaptation-numpy-ints-int-scale"),
        pytest.param("kadaptation", dict(n=8, scale=0.0, targets=["q", "proj"]),
                     dict(scale=0.0, targets=("q", "proj")), id="kadaptation-zero-scale-list"),
        pytest.param("fact_tt", dict(r=2, scale=-1.5, dropout=0), dict(r=2, scale=-1.5, dropout=0.0),
                     id="fact_tt-negative-scale-no-dropout"),
        pytest.param("arc", dict(r=1, dropout=np.float32(0.5)), dict(r=1, dropout=0.5), id="arc-numpy-dropout"),
        pytest.param("compacter", dict(n=4, k=np.int64(8)), dict(n=4, k=8), id="compacter-numpy-k"),
        pytest.param("losa", dict(r=2, frames=2), dict(r=2, frames=2), id="losa-frames"),
    ],
)
def test_valid_hyperparameters_recorded_as_python_values(method, config, recorded):
    """Edge values that are valid pass, and the config adapt records holds plain Python values
    (what an adapter file's JSON metadata stores): ints for counts, floats for scale/dropout."""
    model = kk.adapt(tiny_vit(), method, **config)
    for key, want in recorded.items():
        got = model.kk_shared.config[key]
        assert got == want and type(got) is type(want), f"{key}: {got!r} ({type(got).__name__})"


def _perturbed(method, impl="fused"):
    """An adapted tiny ViT with nonzero increments (at init they are zero and merging changes nothing)."""
    model = kk.adapt(tiny_vit(), method, impl=impl, **TINY_CONFIG[method])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in kk.adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.2)
    return model


MERGEABLE = ("kadaptation", "fact_tt", "fact_tk", "arc")


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("method", MERGEABLE)
@pytest.mark.parametrize("step", ["merge", "unmerge"])
def test_merge_failing_midway_rolls_back(step, method, impl, monkeypatch):
    """A layer whose merge (unmerge) raises after the others have run: the layers already
    done are restored, bitwise. Before the fix the model was left half merged."""
    model = _perturbed(method, impl)
    if step == "unmerge":
        kk.merge(model)
    layers = [m for m in model.modules() if hasattr(m, "kk_adapter_params") and hasattr(m, step)]
    assert len(layers) > 1

    def fail():
        raise RuntimeError("planted failure")

    monkeypatch.setattr(layers[-1], step, fail)
    _refused(model, getattr(kk, step), RuntimeError, "planted failure")


@pytest.mark.parametrize(
    "prepare, call, error, match",
    [
        pytest.param(None, kk.merge, ValueError, "no kron_kernels adapters", id="merge-not-adapted"),
        pytest.param(None, kk.unmerge, ValueError, "no kron_kernels adapters", id="unmerge-not-adapted"),
        pytest.param("compacter", kk.merge, ValueError, "compacter adapters cannot be merged", id="merge-compacter"),
        pytest.param("losa", kk.merge, ValueError, "losa adapters cannot be merged", id="merge-losa"),
        pytest.param("kadaptation", kk.unmerge, ValueError, "not merged", id="unmerge-unmerged"),
        pytest.param("kadaptation+merged", kk.merge, ValueError, "already merged", id="merge-merged"),
        pytest.param("arc+merged", kk.merge, ValueError, "already merged", id="merge-merged-arc"),
    ],
)
def test_merge_refusal_leaves_model_unchanged(prepare, call, error, match):
    if prepare is None:
        model = tiny_vit()
    else:
        method, _, merged = prepare.partition("+")
        model = _perturbed(method)
        if merged:
            kk.merge(model)
    _refused(model, call, error, match)


def _drop(state, key):
    return {k: v for k, v in state.items() if k != key}


def _last_key_replaced(value):
    """The state with its last key's value replaced: a load that copied key by key would have
    written every other key before failing on this one."""

    def make(state):
        last = list(state)[-1]
        return {**state, last: value(state[last])}

    return make


@pytest.mark.parametrize(
    "make_state, strict, error, match",
    [
        pytest.param(lambda s: _drop(s, "blocks.1.attn.qkv.V_v"), True, ValueError, "missing keys", id="missing"),
        pytest.param(lambda s: {**s, "blocks.0.attn.qkv.U_k": s["blocks.0.attn.qkv.U_q"]}, True, ValueError,
                     "unexpected keys", id="unexpected"),
        pytest.param(lambda s: {**s, "kk_shared.A_v": torch.zeros(4, 4, 4)}, True, ValueError, "shape mismatch",
                     id="shape"),
        pytest.param(lambda s: {**s, "kk_shared.A_v": torch.zeros(4, 4, 4)}, False, ValueError, "shape mismatch",
                     id="shape-non-strict"),
        pytest.param(lambda s: kk.adapter_state_dict(_perturbed("compacter")), True, ValueError,
                     "missing keys.*unexpected keys", id="other-method"),
        pytest.param(lambda s: kk.adapter_state_dict(_perturbed("fact_tt")), True, ValueError,
                     "missing keys.*unexpected keys", id="other-method-fact"),
        pytest.param(lambda s: {**s, "head.bias": [0.0] * 5}, True, TypeError, "must be tensors", id="not-a-tensor"),
        pytest.param(lambda s: [], True, TypeError, "state must be a mapping", id="not-a-mapping"),
        pytest.param(_last_key_replaced(lambda t: torch.empty(t.shape, device="meta")), True, ValueError,
                     "cannot be loaded", id="meta-tensor-last"),
        pytest.param(_last_key_replaced(lambda t: torch.complex(t, t)), True, TypeError, "is complex",
                     id="complex-last"),
    ],
)
def test_load_refusal_leaves_model_unchanged(make_state, strict, error, match):
    model = _perturbed("kadaptation")
    source = _perturbed("kadaptation")
    with torch.no_grad():  # different values, so a partial load would show
        for t in kk.adapter_state_dict(source).values():
            t.mul_(-1.0).add_(1.0)
    state = make_state({k: v.clone() for k, v in kk.adapter_state_dict(source).items()})
    _refused(model, lambda m: kk.load_adapter_state_dict(m, state, strict=strict), error, match)


def test_load_into_merged_model_is_refused_unchanged():
    model = _perturbed("kadaptation")
    state = {k: v.clone() for k, v in kk.adapter_state_dict(_perturbed("kadaptation")).items()}
    kk.merge(model)
    _refused(model, lambda m: kk.load_adapter_state_dict(m, state), ValueError, "unmerge")


# ----------------------------------------------------------------------------------------
# 4. FastfoodSubspace checks everything before it reparameterises the module
# ----------------------------------------------------------------------------------------
def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _int_net():
    net = _small_net()
    net.register_parameter("steps", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
    return net


def _hooked_net():
    net = _small_net()
    net[0].register_forward_hook(lambda m, i, o: None)
    nn.utils.parametrize.register_parametrization(net[2], "weight", nn.Identity())
    return net


def _wrapped_net():
    net = _small_net()
    kk.nn.FastfoodSubspace(net, 4, include="0")  # wraps the first layer; net[2] stays a parameter
    return net


_BIG_D = 1 << 40  # a projection beyond kk.fastfood's 32-bit counters

FASTFOOD_REFUSALS = {
    # id: (make module, call, error, match)
    "d0": (_small_net, dict(d=0), ValueError, "d must be a positive int"),
    "d-neg": (_small_net, dict(d=-1), ValueError, "d must be a positive int"),
    "d-float": (_small_net, dict(d=1.5), TypeError, "d must be a positive int"),
    "d-integral-float": (_small_net, dict(d=8.0), TypeError, "d must be a positive int"),
    "d-bool": (_small_net, dict(d=True), TypeError, "d must be a positive int"),
    "d-str": (_small_net, dict(d="8"), TypeError, "d must be a positive int"),
    "d-tensor": (_small_net, dict(d=torch.tensor(8)), TypeError, "d must be a positive int"),
    "d-too-big": (_small_net, dict(d=_BIG_D), ValueError, "block size Lb"),
    "mode": (_small_net, dict(d=4, mode="blocks"), ValueError, "mode must be one of"),
    "mode-type": (_small_net, dict(d=4, mode=["stacked"]), ValueError, "mode must be one of"),
    "seed-neg": (_small_net, dict(d=4, seed=-3), ValueError, "seed must be an int in"),
    "seed-2^64": (_small_net, dict(d=4, seed=1 << 64), ValueError, "seed must be an int in"),
    "seed-float": (_small_net, dict(d=4, seed=0.5), TypeError, "seed must be an int in"),
    "seed-bool": (_small_net, dict(d=4, seed=False), TypeError, "seed must be an int in"),
    "per-tensor-str": (_small_net, dict(d=4, per_tensor="yes"), TypeError, "per_tensor must be a bool"),
    "per-tensor-int": (_small_net, dict(d=4, per_tensor=1), TypeError, "per_tensor must be a bool"),
    "said-none": (_small_net, dict(d=4, said=None), TypeError, "said must be a bool"),
    "include-unknown": (_small_net, dict(d=4, include="5"), ValueError, "include: no parameter"),
    "include-empty": (_small_net, dict(d=4, include=lambda n: False), ValueError, "include chose no parameter"),
    "include-type": (_small_net, dict(d=4, include=[3]), TypeError, "include must be None, a name"),
    "no-parameters": (lambda: nn.Sequential(nn.ReLU(), nn.Flatten()), dict(d=4), ValueError,
                      "no parameters to reparameterise"),
    "not-floating": (_int_net, dict(d=4), TypeError, "must be floating point"),
    "wrapped": (_wrapped_net, dict(d=4), ValueError, "already wrapped by FastfoodSubspace"),
    "wrapped-part": (lambda: _wrapped_net()[2], dict(d=4), ValueError, "already wrapped by FastfoodSubspace"),
    "wrapper": (lambda: kk.nn.FastfoodSubspace(_small_net(), 4), dict(d=4), ValueError,
                "contains a FastfoodSubspace"),
    "contains-wrapper": (lambda: nn.Sequential(kk.nn.FastfoodSubspace(_small_net(), 4)), dict(d=4), ValueError,
                         "contains a FastfoodSubspace"),
    "hooked-bad-seed": (_hooked_net, dict(d=4, seed=-1), ValueError, "seed must be an int in"),
}


def _parametrizations(module: nn.Module):
    return [(name, list(m.parametrizations.keys())) for name, m in module.named_modules()
            if nn.utils.parametrize.is_parametrized(m)]


@pytest.mark.parametrize("case", list(FASTFOOD_REFUSALS), ids=list(FASTFOOD_REFUSALS))
def test_fastfood_subspace_refusal_leaves_module_unchanged(case):
    make, kwargs, error, match = FASTFOOD_REFUSALS[case]
    module = make()
    before, params = snapshot(module), _parametrizations(module)
    buffers = sorted(name for name, _ in module.named_buffers())
    with pytest.raises(error, match=match):
        kk.nn.FastfoodSubspace(module, **kwargs)
    assert_unchanged(module, before)
    assert _parametrizations(module) == params, "parametrizations changed"
    assert sorted(name for name, _ in module.named_buffers()) == buffers, "parameters were turned into buffers"


def test_fastfood_subspace_wraps_after_a_refusal():
    """A refused call leaves the module wrappable: the next, valid call succeeds and is exact."""
    module = _small_net()
    x = torch.randn(5, 4)
    want = module(x)
    with pytest.raises(TypeError):
        kk.nn.FastfoodSubspace(module, 4, said="no")
    sub = kk.nn.FastfoodSubspace(module, 4, said=True, per_tensor=True)
    assert torch.equal(sub(x), want)
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["theta", "lambdas"]


# ----------------------------------------------------------------------------------------
# 5. intrinsic_dimension checks its arguments and its data before any training
# ----------------------------------------------------------------------------------------
def _batches():
    return [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))]


def _exhausted():
    it = iter(_batches())
    list(it)
    return it


def _empty_generator():
    return (b for b in [])


INTRINSIC_REFUSALS = {
    "data-empty-list": (dict(data=[]), ValueError, r"data yielded no batches \(an empty"),
    "data-exhausted-iterator": (dict(data=_exhausted), ValueError,
                                r"data yielded no batches \(an iterator that was already exhausted\?\)"),
    "data-exhausted-generator": (dict(data=_empty_generator), ValueError,
                                 r"data yielded no batches \(an iterator that was already exhausted\?\)"),
    "data-not-iterable": (dict(data=3), TypeError, "data must be an iterable"),
    "dims-empty": (dict(dims=[]), ValueError, "dims must be a non-empty list of positive ints"),
    "dims-zero": (dict(dims=[0, 4]), ValueError, "dims must be a non-empty list of positive ints"),
    "dims-bool": (dict(dims=[True, 4]), TypeError, "dims must be a non-empty list of positive ints"),
    "dims-float": (dict(dims=[1.5]), TypeError, "dims must be a non-empty list of positive ints"),
    "dims-str": (dict(dims="8"), TypeError, "dims must be a non-empty list of positive ints"),
    "dims-int": (dict(dims=8), TypeError, "dims must be a non-empty list of positive ints"),
    "dims-too-big": (dict(dims=[4, _BIG_D]), ValueError, "block size Lb"),
    "threshold-high": (dict(threshold=1.5), ValueError, "threshold must be in"),
    "threshold-zero": (dict(threshold=0), ValueError, "threshold must be in"),
    "threshold-nan": (dict(threshold=float("nan")), ValueError, "threshold must be in"),
    "threshold-str": (dict(threshold="0.9"), TypeError, "threshold must be in"),
    "steps-zero": (dict(steps=0), ValueError, "steps must be a positive int"),
    "steps-float": (dict(steps=2.5), TypeError, "steps must be a positive int"),
    "steps-bool": (dict(steps=True), TypeError, "steps must be a positive int"),
    "lr-zero": (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
    "lr-inf": (dict(lr=float("inf")), ValueError, "lr must be a finite number"),
    "lr-tensor": (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a finite number"),
    "full-lr-neg": (dict(full_lr=-1e-3), ValueError, "full_lr must be a finite number > 0"),
    "full-metric-nan": (dict(full_metric=float("nan")), ValueError, "full_metric must be a finite number"),
    "full-metric-str": (dict(full_metric="1"), TypeError, "full_metric must be a finite number"),
    "seed": (dict(seed=-1), ValueError, "seed must be an int in"),
    "mode": (dict(mode="blocks"), ValueError, "mode must be one of"),
    "per-tensor": (dict(per_tensor="yes"), TypeError, "per_tensor must be a bool"),
    "said": (dict(said=1), TypeError, "said must be a bool"),
    "stop-early": (dict(stop_early=None), TypeError, "stop_early must be a bool"),
    "include": (dict(include="nope"), ValueError, "include: no parameter"),
    "loss-fn": (dict(loss_fn=None), TypeError, "loss_fn must be callable"),
    "eval-fn": (dict(eval_fn=0.5), TypeError, "eval_fn must be callable"),
}


@pytest.mark.parametrize("case", list(INTRINSIC_REFUSALS), ids=list(INTRINSIC_REFUSALS))
def test_intrinsic_dimension_refusal_before_training(case):
    overrides, error, match = INTRINSIC_REFUSALS[case]
    model = _small_net()
    calls = []

    def loss_fn(out, y):
        calls.append("loss")
        return F.cross_entropy(out, y)

    def eval_fn(m):
        calls.append("eval")
        return 1.0

    kwargs = dict(data=_batches(), loss_fn=loss_fn, eval_fn=eval_fn, dims=[4], steps=2, progress=False)
    kwargs.update(overrides)
    if callable(kwargs["data"]) and not isinstance(kwargs["data"], list):
        kwargs["data"] = kwargs["data"]()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        kk.intrinsic_dimension(model, **kwargs)
    assert calls == [], "training or evaluation ran before the refusal"
    assert_unchanged(model, before)


def test_intrinsic_dimension_refuses_a_wrapped_model():
    sub = kk.nn.FastfoodSubspace(_small_net(), 4)
    before = snapshot(sub)
    with pytest.raises(ValueError, match="contains a FastfoodSubspace"):
        kk.intrinsic_dimension(sub, _batches(), F.cross_entropy, lambda m: 1.0, [4], steps=1, progress=False)
    assert_unchanged(sub, before)


def test_intrinsic_dimension_one_shot_iterators():
    """A generator is peeked, not lost: an endless one serves every run; one that runs dry
    after the baseline is refused by name (and the caller's model is untouched)."""
    model = _small_net()
    before = snapshot(model)

    def endless():
        while True:
            yield torch.randn(2, 4), torch.zeros(2, dtype=torch.long)

    result = kk.intrinsic_dimension(model, endless(), F.cross_entropy, lambda m: 1.0, [2, 4], steps=2,
                                    progress=False)
    assert list(result.metrics) == [2, 4] and all(v == v for v in result.losses.values())
    with pytest.raises(ValueError, match="an iterator that was already exhausted"):
        kk.intrinsic_dimension(model, iter(_batches() * 2), F.cross_entropy, lambda m: 1.0, [4], steps=2,
                               progress=False)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# 6. the shared numeric validators
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,error", [
    (True, TypeError), ("3", TypeError), (3.0, TypeError), (torch.tensor(3), TypeError), (None, TypeError),
    (0, ValueError), (-2, ValueError), (8, ValueError),
])
def test_check_int_refuses_by_name(value, error):
    from kron_kernels.ops._common import check_int

    with pytest.raises(error, match="rank must be an int in"):
        check_int("rank", value, min=1, max=7)
    assert check_int("rank", 7, min=1, max=7) == 7


@pytest.mark.parametrize("value,error", [
    (False, TypeError), ("0.1", TypeError), (torch.tensor(0.1), TypeError), (None, TypeError), (1j, TypeError),
    (float("nan"), ValueError), (float("inf"), ValueError), (-0.1, ValueError), (1.0, ValueError),
])
def test_check_probability_refuses_by_name(value, error):
    from kron_kernels.ops._common import check_float, check_probability

    with pytest.raises(error, match=r"dropout must be in \[0, 1\)"):
        check_probability("dropout", value, max_open=True)
    assert check_probability("p", 1) == 1.0 and check_probability("dropout", 0, max_open=True) == 0.0
    assert check_float("alpha", float("inf"), finite=False) == float("inf")
    with pytest.raises(ValueError, match="alpha must be a number"):
        check_float("alpha", float("nan"), finite=False)
