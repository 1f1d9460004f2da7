"""timm model surgery: ``adapt``, ``merge``/``unmerge`` and adapter-only state dicts (DESIGN.md 3).

``adapt(model, method, impl="fused", **config)`` freezes a timm ``VisionTransformer``,
inserts the method's modules (``impl="fused"``: :mod:`kron_kernels.nn`; ``impl="reference"``:
the naive classes of :mod:`kron_kernels.reference`, with the same parameter names and
shapes), leaves the classifier head trainable and returns the model, changed in place.

Parameters shared across layers (KAdaptation's ``A_q``/``A_v``, Compacter's ``A``) are
registered once, on a :class:`SharedFactors` module attached as ``model.kk_shared``, which
also records the method, impl and config. The layers look them up there on every call
without registering them, so ``model.parameters()`` and state dicts hold each exactly once.

Methods are registered with ``_register`` below; ``METHODS`` lists them in registration order:
kadaptation, compacter, fact_tt, fact_tk (FacT's global ``U``, ``V`` and cores on
``kk_shared``; :class:`~kron_kernels.nn.FacTLinear` in place of qkv, proj, fc1, fc2), arc
(:class:`~kron_kernels.nn.ARCAdapter` on norm1/norm2 outputs, ``U_attn``/``U_mlp`` shared) and
losa (``adapt`` returns a :class:`~kron_kernels.nn.LoSAModel` wrapper; ``kk_shared`` is on it).

Backbones: timm ``VisionTransformer`` (every method), whatever its prefix tokens -- a class
token or none (``class_token=False, global_pool="avg"``), register tokens (``reg_tokens=``), and
DeiT's ``VisionTransformerDistilled`` (class + distillation token; both heads stay trainable and
are saved with the adapter): the methods act per token or, LoSA's token mixers, over all
``num_patches + num_prefix_tokens`` tokens of the grid -- and timm ``SwinTransformer`` (kadaptation,
compacter, fact_tt, fact_tk, arc; blocks ``layers.<i>.blocks.<j>``, width ``d_i`` per stage).
Factors whose shape depends on the width are kept per stage on Swin, as ``kk_shared.stage<i>``
(FacT's U, V and cores: the paper's partitioned tensorization; ARC's U per position and stage);
width-free factors (KAdaptation's and Compacter's ``A``) stay global. Each method's registration
lists the backbones it serves and, for the others, why not (LoSA refuses Swin with a TypeError).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .nn import arc as nn_arc
from .nn import compacter as nn_compacter
from .nn import fact as nn_fact
from .nn import kadaptation as nn_kadaptation
from .nn import losa as nn_losa
from .ops._common import check_bool, check_float, check_int, check_probability
from .reference import arc as ref_arc
from .reference import compacter as ref_compacter
from .reference import fact as ref_fact
from .reference import kadaptation as ref_kadaptation
from .reference import losa as ref_losa

__all__ = [
    "METHODS",
    "IMPLS",
    "SharedFactors",
    "adapt",
    "merge",
    "unmerge",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "LoadResult",
]

IMPLS = ("fused", "reference")
SHARED_ATTR = "kk_shared"


@dataclass(frozen=True)
class _Method:
    name: str
    defaults: Mapping[str, Any]
    build: Callable[..., List[Tuple[nn.Module, str, nn.Module]]]
    merge_error: Optional[str]  # None when the method merges; else why it cannot
    wrap: Optional[Callable[..., nn.Module]] = None  # (model, replacements) -> the model adapt returns
    # backbone -> None (served) or the reason it is refused; a backbone not listed is refused
    backbones: Mapping[str, Optional[str]] = field(default_factory=lambda: MappingProxyType({"vit": None}))


_REGISTRY: Dict[str, _Method] = {}


# ----------------------------------------------------------------------------------------
# hyperparameters: one check per name, the same for every method that takes it (the shared
# validators of ops._common: a TypeError for a value of the wrong kind -- a bool, a string,
# 1.5 or 2.0 as a count --, a ValueError for one out of range or not finite; both name it)
# ----------------------------------------------------------------------------------------
_KADAPTATION_TARGETS = ("q", "k", "v", "proj")


def _positive_int(name: str, value) -> int:
    return check_int(name, value, min=1)


def _optional_positive_int(default: str):
    def check(name: str, value) -> Optional[int]:
        if value is None:
            return None
        return check_int(name, value, min=1, desc=f"a positive int or None (None: {default})")

    return check


def _scale(name: str, value) -> float:
    return check_float(name, value)  # any finite number: FacT sweeps s over {0.01 .. 100}


def _dropout(name: str, value) -> float:
    return check_probability(name, value, max_open=True)


def _kadaptation_targets(name: str, value) -> Tuple[str, ...]:
    """A name or a sequence of distinct names among :data:`_KADAPTATION_TARGETS`, as a tuple."""
    expected = f"{name} must be distinct names among {_KADAPTATION_TARGETS} (one name, or a tuple or list)"
    targets = (value,) if isinstance(value, str) else value
    if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"{expected}, got {type(value).__name__} {value!r}")
    targets = tuple(targets)
    if not targets or len(set(targets)) != len(targets) or any(t not in _KADAPTATION_TARGETS for t in targets):
        raise ValueError(f"{expected}, got {value!r}")
    return targets


_HYPERPARAMETERS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType({
    "n": _positive_int,  # KAdaptation's / Compacter's number of Kronecker products
    "r": _positive_int,  # rank
    "k": _optional_positive_int("d // 32"),  # Compacter's bottleneck size
    "frames": _optional_positive_int("an image"),  # LoSA's video frames
    "scale": _scale,
    "dropout": _dropout,
    "bias": check_bool,
    "targets": _kadaptation_targets,
})


def _checked_config(method: str, config: Mapping[str, Any]) -> Dict[str, Any]:
    """Every value of ``config`` through its check in :data:`_HYPERPARAMETERS` (converted: an
    int scale becomes a float, a numpy int an int); the error names the method and the argument."""
    checked = {}
    for name, value in config.items():
        try:
            checked[name] = _HYPERPARAMETERS[name](name, value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{method}: {exc}") from None
    return checked


def _register(name: str, defaults: Mapping[str, Any], merge_error: Optional[str] = None, wrap=None,
              backbones: Optional[Mapping[str, Optional[str]]] = None):
    """Register ``build(model, impl, config, shared) -> [(parent, attribute, new_module), ...]``.

    ``defaults`` names every hyperparameter the method takes; each is checked by its entry in
    :data:`_HYPERPARAMETERS` before ``build`` runs, so ``build`` gets valid values of the right
    type (and checks only what depends on the model: divisibility by d, the token count).
    ``build`` validates the rest and creates the new modules and the shared parameters
    (on ``shared``) but changes nothing on ``model``: ``adapt`` applies the returned
    replacements only once every block has been built, so a bad config leaves the model as it was.
    ``wrap(model, replacements)``, when given, returns the module ``adapt`` returns instead of
    ``model`` (LoSA's wrapper); ``adapt`` then attaches ``shared`` to that module.
    """

    def decorator(build):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        unchecked = sorted(set(defaults) - set(_HYPERPARAMETERS))
        if unchecked:
            raise ValueError(f"method {name!r}: no check in _HYPERPARAMETERS for {unchecked}")
        served = MappingProxyType(dict(backbones if backbones is not None else {"vit": None}))
        _REGISTRY[name] = _Method(name, MappingProxyType(dict(defaults)), build, merge_error, wrap, served)
        return build

    return decorator


class SharedFactors(nn.Module):
    """Owns the parameters shared across layers and records what ``adapt`` did."""

    def __init__(self, method: str, impl: str, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.method, self.impl, self.config = method, impl, dict(config)

    def extra_repr(self) -> str:
        config = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        return f"method={self.method!r}, impl={self.impl!r}, {config}"


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
BACKBONES = {
    "vit": "timm.models.vision_transformer.VisionTransformer",
    "swin": "timm.models.swin_transformer.SwinTransformer",
}


def _backbone(model) -> str:
    """``"vit"`` or ``"swin"``; a TypeError for anything else."""
    supported = " or ".join(BACKBONES.values())
    try:
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # without timm nothing can be a timm model
        raise TypeError(f"kk.adapt supports {supported} models, and timm is not installed") from None
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    raise TypeError(f"kk.adapt supports {supported} models, got {type(model).__module__}.{type(model).__name__}")


def _heads(model) -> Tuple[nn.Module, ...]:
    """The model's classifier head(s), which ``adapt`` leaves trainable and the adapter state
    dicts carry: ``get_classifier()``'s module, or each module of the tuple it returns -- DeiT's
    ``VisionTransformerDistilled`` gives ``(head, head_dist)``, the class and the distillation
    token's heads. A TypeError naming the model for anything else.

    Everything adapt needs from the model is asked here or in the method's ``build``, before
    anything is changed: a refusal must leave the caller's model as it was."""
    _backbone(model)
    heads = model.get_classifier()
    heads = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,)
    if not heads or not all(isinstance(head, nn.Module) for head in heads):
        name = f"{type(model).__module__}.{type(model).__name__}"
        raise TypeError(
            f"model: kk.adapt needs {name}.get_classifier() to return the classifier module (or a tuple "
            f"of them, as DeiT's (head, head_dist)), got {[type(h).__name__ for h in heads]}"
        )
    return heads


def _check_method_backbone(model, spec: "_Method") -> None:
    """Refuse a method its paper does not define on this backbone (or that is not built for it)."""
    backbone = _backbone(model)
    if backbone in spec.backbones and spec.backbones[backbone] is None:
        return
    reason = spec.backbones.get(backbone) or "it is not implemented for this backbone"
    served = [b for b, why in spec.backbones.items() if why is None]
    raise TypeError(
        f"{spec.name} does not support {BACKBONES[backbone]} ({backbone}) models: {reason}. "
        f"{spec.name} serves: {', '.join(BACKBONES[b] for b in served)}; "
        f"methods serving {backbone}: {[m for m, s in _REGISTRY.items() if s.backbones.get(backbone, 1) is None]}"
    )


class _StageFactors(nn.Module):
    """The factors of one Swin stage (``model.layers[i]``), as ``kk_shared.stage<i>``: the
    layers of that stage look their factors up here by name, exactly as they do on
    ``kk_shared`` for a plain ViT."""


class _Stage(NamedTuple):
    index: int
    d: int  # the width of every block of the stage
    blocks: List[Tuple[str, nn.Module]]


def _stages(model) -> List[_Stage]:
    """The blocks grouped by width: one stage (``d = embed_dim``) for a ViT; Swin's
    ``model.layers[i].blocks`` with their per-stage width (``embed_dim * 2**i`` in timm's configs)."""
    if _backbone(model) == "vit":
        return [_Stage(0, model.embed_dim, _named_blocks(model))]
    stages = []
    for i, layer in enumerate(model.layers):
        blocks = getattr(layer, "blocks", None)
        if not isinstance(blocks, nn.Module):
            raise TypeError(f"layers.{i} ({type(layer).__name__}) has no 'blocks' to adapt")
        named = [(f"layers.{i}.blocks.{j}", blk) for j, blk in enumerate(blocks.children())]
        widths = {getattr(blk, "dim", None) for _, blk in named}
        if len(widths) != 1 or not isinstance(next(iter(widths)), int):
            raise TypeError(f"layers.{i}: the blocks of a stage must share one integer width 'dim', got {widths}")
        stages.append(_Stage(i, next(iter(widths)), named))
    return stages


def _stage_owner(model, shared: "SharedFactors", stage: _Stage) -> nn.Module:
    """Where a stage's width-dependent factors live: ``kk_shared`` itself on a ViT (one width,
    the names of DESIGN.md 3), a new ``kk_shared.stage<i>`` on Swin."""
    if _backbone(model) == "vit":
        return shared
    owner = _StageFactors()
    shared.add_module(f"stage{stage.index}", owner)
    return owner


def _check_fresh(model: nn.Module) -> None:
    """Refuse a model that already carries adapters: methods do not stack (each freezes the
    backbone and owns ``kk_shared``), and a second adapt would wrap the first's layers."""
    if any(isinstance(m, SharedFactors) for m in model.modules()):
        previous = _find_shared(model)  # also a LoSA wrapper, which is no ViT itself
        raise ValueError(
            f"model is already adapted ({previous.method}); kk.adapt takes a fresh model "
            f"(adapting twice or stacking methods is not supported)"
        )
    if _adapter_layers(model) or isinstance(model, nn_losa.LoSAModel):
        raise ValueError("model already holds kron_kernels adapter layers; kk.adapt takes a fresh model")
    # a LoSA wrapper hooks its backbone's blocks (and holds kk_shared itself, not the backbone)
    blocks = getattr(model, "blocks", None)
    blocks = list(blocks.children()) if isinstance(blocks, nn.Module) else []
    hook_owners = [getattr(hook, "__self__", None) for blk in blocks for hook in blk._forward_hooks.values()]
    if any(isinstance(owner, nn_losa.LoSAModel) for owner in hook_owners):
        raise ValueError(
            "model is the backbone of a LoSA wrapper (it runs without autograd there); "
            "kk.adapt takes a fresh model"
        )


def _factory(model: nn.Module) -> Dict[str, Any]:
    """Device and dtype of new factors: the backbone's device; float32 (float64 next to float64)."""
    weight = model.patch_embed.proj.weight if hasattr(model, "patch_embed") else next(model.parameters())
    return dict(device=weight.device, dtype=nn_kadaptation.factor_dtype(weight))


def _named_blocks(model) -> List[Tuple[str, nn.Module]]:
    return [(f"blocks.{i}", blk) for i, blk in enumerate(model.blocks)]


def _all_blocks(model) -> List[Tuple[str, nn.Module]]:
    """Every block of the model, in order (Swin: every stage's)."""
    return [named for stage in _stages(model) for named in stage.blocks]


def _submodule(blk: nn.Module, block_name: str, attr: str, method: str) -> nn.Module:
    module = getattr(blk, attr, None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{method} needs every block to have an '{attr}' submodule; {block_name} "
            f"({type(blk).__name__}) has none"
        )
    return module


def _built(name: str, build):
    """Run a module constructor, prefixing a ValueError with the submodule it was for."""
    try:
        return build()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _find_shared(model: nn.Module) -> SharedFactors:
    shared = getattr(model, SHARED_ATTR, None)
    if not isinstance(shared, SharedFactors):
        shared = next((m for m in model.modules() if isinstance(m, SharedFactors)), None)
    if shared is None:
        raise ValueError("this model has no kron_kernels adapters: call kk.adapt(model, method) first")
    return shared


def _adapter_layers(model: nn.Module) -> List[nn.Module]:
    """Modules that own adapter parameters (they declare them in ``kk_adapter_params``)."""
    return [m for m in model.modules() if hasattr(m, "kk_adapter_params")]


# ----------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------

_VIT_SWIN = {"vit": None, "swin": None}


@_register(
    "kadaptation", defaults=dict(n=32, r=1, targets=("q", "v"), bias=False, scale=1.0), backbones=_VIT_SWIN
)
def _build_kadaptation(model, impl: str, config: Dict[str, Any], shared: SharedFactors):
    """KAdaptation on the q/k/v row slices of each block's fused ``attn.qkv`` and/or ``attn.proj``.

    Swin: the same targets on every block of every stage (``WindowAttention``'s fused ``qkv``
    and ``proj``). ``A_<target>: (n, n, n)`` stays ONE tensor shared by every layer of every
    stage, as the paper shares its slow weights across all layers: ``A_i`` is ``n x n`` whatever
    the layer's width (only the per-layer ``B_i = u_i v_i^T``, ``(d/n) x (d/n)``, follows d), so a
    per-width ``A`` would be a choice the paper does not make, and would cost ``n^3`` per stage
    and target (4 x 65,536 more on Swin-B at n=32). n must divide every stage's width.
    """
    targets, n = config["targets"], config["n"]  # checked by adapt (_HYPERPARAMETERS)
    factory = _factory(model)
    for kind in targets:
        shared.register_parameter(f"A_{kind}", nn.Parameter(torch.empty(n, n, n, **factory)))
        nn_kadaptation.init_shared_factor(getattr(shared, f"A_{kind}"))
    layer_cls = nn_kadaptation.KAdaptationLinear if impl == "fused" else ref_kadaptation.KAdaptationLinear
    options = dict(n=n, r=config["r"], bias=config["bias"], scale=config["scale"], shared=shared)
    if impl == "fused":  # one bank builds every layer's increments together (nn.KAdaptationBank)
        options["bank"] = nn_kadaptation.KAdaptationBank()
    qkv_kinds = [t for t in ("q", "k", "v") if t in targets]
    replacements = []
    for block_name, blk in _all_blocks(model):
        attn = _submodule(blk, block_name, "attn", "kadaptation")
        for attr, kinds in (("qkv", qkv_kinds), ("proj", ["proj"] if "proj" in targets else [])):
            if not kinds:
                continue
            name = f"{block_name}.attn.{attr}"
            linear = getattr(attn, attr, None)
            if not isinstance(linear, nn.Linear):
                raise TypeError(
                    f"kadaptation needs {name} to be an nn.Linear (timm's fused-qkv Attention), "
                    f"got {type(linear).__name__}"
                )
            if attr == "qkv":
                if linear.out_features % 3:
                    raise TypeError(f"{name} has {linear.out_features} outputs, not 3 equal q, k, v slices")
                rows = linear.out_features // 3
                slices = {kind: ("qkv".index(kind) * rows, ("qkv".index(kind) + 1) * rows) for kind in kinds}
            else:
                slices = {"proj": (0, linear.out_features)}
            if linear.in_features % n:
                raise ValueError(f"{name}: n={n} must divide the hidden size d={linear.in_features}")
            new = _built(name, lambda: layer_cls(linear, slices, **options))
            replacements.append((attn, attr, new))
    return replacements


@_register(
    "compacter",
    defaults=dict(n=4, k=None),
    merge_error="the GELU between the down and up projections makes the adapter nonlinear",
    backbones=_VIT_SWIN,
)
def _build_compacter(model, impl: str, config: Dict[str, Any], shared: SharedFactors):
    """A Compacter adapter on the output of every block's ``attn`` and ``mlp`` (before the residual).

    Swin: the same on every block of every stage (after the window attention, on the windowed
    tokens -- token-wise, so the same as after the window reverse -- and after the MLP), each
    adapter ``d_i -> k_i -> d_i`` at its stage's width. The PHM ``A: (n, n, n)`` is one tensor
    for the whole model (its size does not depend on d). ``k=None`` gives each stage
    ``k_i = d_i // 32`` rounded up to a multiple of n (``d // 32`` itself when n divides it: the
    ViT default; Swin-T's first stage, d=96, gets k=4 at n=4, not 3); an int k is used at every
    stage. The recorded config keeps ``k=None`` on Swin. n must divide every d_i and k_i.
    """
    n = config["n"]
    stages = _stages(model)
    swin = _backbone(model) == "swin"
    if config["k"] is None:
        if swin:
            ks = [n * max(1, -(-(s.d // 32) // n)) for s in stages]
        else:
            ks = [model.embed_dim // 32]
            config["k"] = ks[0]
    else:
        ks = [config["k"]] * len(stages)
    for stage, k in zip(stages, ks):
        d = stage.d
        if k < 1:  # only the default can be: a given k is checked by adapt
            raise ValueError(f"the bottleneck size k must be a positive int, got {k!r} (default d // 32 = {d // 32})")
        if d % n or k % n:
            where = f" (stage layers.{stage.index})" if swin else ""
            raise ValueError(f"n={n} must divide the hidden size d={d} and the bottleneck size k={k}{where}")
    factory = _factory(model)
    shared.A = nn.Parameter(nn_kadaptation.init_shared_factor(torch.empty(n, n, n, **factory)))
    if impl == "fused":  # one bank builds every adapter's PHM weights together (nn.PHMBank)
        bank = nn_compacter.PHMBank()
        adapter_cls = functools.partial(nn_compacter.CompacterAdapter, bank=bank)
    else:
        adapter_cls = ref_compacter.CompacterAdapter
    replacements = []
    for stage, k in zip(stages, ks):
        for block_name, blk in stage.blocks:
            for attr in ("attn", "mlp"):
                module = _submodule(blk, block_name, attr, "compacter")
                name = f"{block_name}.{attr}"
                adapter = _built(name, lambda: adapter_cls(stage.d, k, n, A=shared, **factory))
                replacements.append((blk, attr, nn_compacter.AdapterWrapper(module, adapter)))
    return replacements


def _linear(parent: nn.Module, name: str, attr: str, method: str, shape) -> nn.Linear:
    linear = getattr(parent, attr, None)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{method} needs {name} to be an nn.Linear, got {type(linear).__name__}")
    if shape is not None and (linear.out_features, linear.in_features) != shape:
        raise ValueError(
            f"{method} needs {name} to have an (out, in) = {shape} weight, got "
            f"{(linear.out_features, linear.in_features)}"
        )
    return linear


# FacT slots of one block, in DESIGN.md 4.2's order: (module, Linear, slot offsets, mode, weight shape in d)
_FACT_LAYERS = (
    ("attn", "qkv", (0, 1, 2), "rows", (3, 1)),
    ("attn", "proj", (3,), "rows", (1, 1)),
    ("mlp", "fc1", (4, 5, 6, 7), "rows", (4, 1)),
    ("mlp", "fc2", (8, 9, 10, 11), "cols", (1, 4)),
)
FACT_SLOTS_PER_BLOCK = 12


def _build_fact(fmt: str):
    method = f"fact_{fmt}"

    def build(model, impl: str, config: Dict[str, Any], shared: SharedFactors):
        """FacT on every block's q, k, v, o, fc1 (4 row blocks) and fc2 (4 column blocks).

        Swin: FacT's own Swin setting, the paper's *partitioned tensorization* (section 4.3):
        each stage (``model.layers[i]``, width d_i, L_i blocks) is its own ``12 L_i x d_i x d_i``
        tensor, decomposed individually, so each stage has its own ``U, V: (d_i, r)`` and its
        own cores (TT: ``cores: (12 L_i, r, r)``; TK: ``C: (r, r, r)``, ``P: (12 L_i, r)``), on
        ``kk_shared.stage<i>``; slot indices count from 0 within the stage. On Swin-B, FacT-TT
        at r=16 gives the paper's 0.135M (Table 2).
        """
        r = config["r"]
        factory = _factory(model)
        layer_cls = nn_fact.FacTLinear if impl == "fused" else ref_fact.FacTLinear
        replacements = []
        for stage in _stages(model):
            d = stage.d
            n_slots = FACT_SLOTS_PER_BLOCK * len(stage.blocks)
            owner = _stage_owner(model, shared, stage)
            # U ~ N(0, 1/d) keeps x @ U at x's scale; V = 0 makes every increment zero at step 0
            owner.U = nn.Parameter(torch.empty(d, r, **factory).normal_(0.0, d**-0.5))
            owner.V = nn.Parameter(torch.zeros(d, r, **factory))
            if fmt == "tt":
                owner.cores = nn.Parameter(torch.empty(n_slots, r, r, **factory).normal_(0.0, r**-0.5))
            else:  # Σ_i = sum_t P[i, t] C[t] has variance r * (1/r) * (1/r) = 1/r, as TT's cores
                owner.C = nn.Parameter(torch.empty(r, r, r, **factory).normal_(0.0, r**-0.5))
                owner.P = nn.Parameter(torch.empty(n_slots, r, **factory).normal_(0.0, r**-0.5))
            # the fused layers take their cores from one bank per shared module (nn.FacTCoreBank)
            bank = dict(bank=nn_fact.FacTCoreBank(owner, fmt)) if impl == "fused" else {}
            for i, (block_name, blk) in enumerate(stage.blocks):
                for parent_attr, attr, offsets, mode, (rows, cols) in _FACT_LAYERS:
                    parent = _submodule(blk, block_name, parent_attr, method)
                    name = f"{block_name}.{parent_attr}.{attr}"
                    linear = _linear(parent, name, attr, method, (rows * d, cols * d))
                    slots = [FACT_SLOTS_PER_BLOCK * i + o for o in offsets]
                    options = dict(scale=config["scale"], dropout=config["dropout"], **bank)
                    new = _built(name, lambda: layer_cls(linear, slots, mode, fmt, owner, **options))
                    replacements.append((parent, attr, new))
        return replacements

    return build


_register("fact_tt", defaults=dict(r=4, scale=1.0, dropout=0.1), backbones=_VIT_SWIN)(_build_fact("tt"))
_register("fact_tk", defaults=dict(r=8, scale=1.0, dropout=0.1), backbones=_VIT_SWIN)(_build_fact("tk"))


@_register("arc", defaults=dict(r=50, dropout=0.1), backbones=_VIT_SWIN)
def _build_arc(model, impl: str, config: Dict[str, Any], shared: SharedFactors):
    """ARC on the outputs of every block's norm1 and norm2; merges into attn.qkv and mlp.fc1.

    Swin: the same two positions in every block of every stage (norm1's output is the
    ``(B, H, W, C)`` map the window attention partitions; norm2's the ``(B, HW, C)`` tokens).
    ``U_attn``, ``U_mlp: (d, r)`` depend on the width, so each is shared per position AND per
    stage: ``kk_shared.stage<i>.U_attn`` / ``.U_mlp`` with ``d = d_i`` (every block of a stage).
    Merging is exact when no window padding occurs (every stage's resolution divisible by the
    window size, as in timm's 224-pixel Swin configs): padded positions are zeros after the
    adapter, and a merged ARC bias would add ``W b`` there.
    """
    r = config["r"]
    factory = _factory(model)
    adapter_cls = nn_arc.ARCAdapter if impl == "fused" else ref_arc.ARCAdapter
    replacements = []
    for stage in _stages(model):
        d = stage.d
        owner = _stage_owner(model, shared, stage)
        for position in ("attn", "mlp"):
            U = nn.Parameter(torch.empty(d, r, **factory))
            with torch.no_grad():
                nn.init.xavier_uniform_(U)
            owner.register_parameter(f"U_{position}", U)
        for block_name, blk in stage.blocks:
            for norm_attr, position, target in (("norm1", "attn", "qkv"), ("norm2", "mlp", "fc1")):
                norm = _submodule(blk, block_name, norm_attr, "arc")
                parent = _submodule(blk, block_name, position, "arc")
                linear = _linear(parent, f"{block_name}.{position}.{target}", target, "arc", None)
                if linear.in_features != d:
                    raise ValueError(f"arc needs {block_name}.{position}.{target} to read d={d} features")
                adapter = adapter_cls(d, r, owner, position, dropout=config["dropout"], **factory)
                adapter.fold_into(linear)
                replacements.append((blk, norm_attr, nn_compacter.AdapterWrapper(norm, adapter)))
    return replacements


@_register(
    "losa",
    defaults=dict(r=64, frames=None),
    merge_error="the side network is nonlinear (GELU) and runs beside the backbone, not inside it",
    wrap=lambda model, new: nn_losa.LoSAModel(model, new["side"]),
    backbones={
        "vit": None,
        "swin": (
            "LoSA's side network mixes a plain ViT's fixed token grid (the same T tokens and width d "
            "at every layer, read from each block's output); Swin's stages change both (patch "
            "merging halves the grid and doubles d) and the paper defines no side network for that"
        ),
    },
)
def _build_losa(model, impl: str, config: Dict[str, Any], shared: SharedFactors):
    """The LoSA side network (one mixer per block); adapt returns the LoSAModel wrapper.

    A token mixer is a ``T x r`` / ``r x T`` pair over the whole token axis, ``T = num_patches +
    num_prefix_tokens``: every prefix layout timm's ViT has (class token or none, register
    tokens, DeiT's class + distillation tokens) is a fixed T and is served -- the prefix tokens
    are mixed with the patches as the paper's side network mixes its class token, and the
    backbone's own ``forward_head`` then reads them (or pools the patches) as it always does.
    A model whose token count varies (``dynamic_img_size``, patch dropout) is refused.
    """
    r, frames = config["r"], config["frames"]
    d = model.embed_dim
    patches, prefix = model.patch_embed.num_patches, model.num_prefix_tokens
    varying = []
    if getattr(model, "dynamic_img_size", False):
        varying.append("dynamic_img_size=True (the token count follows the input's size)")
    if not isinstance(getattr(model, "patch_drop", None), (nn.Identity, type(None))):
        varying.append(f"patch dropout ({type(model.patch_drop).__name__}: training drops tokens)")
    if varying:
        raise ValueError(
            f"losa needs a fixed token count T = {patches} patches + {prefix} prefix tokens (its token "
            f"mixers are T x r matrices); this {type(model).__module__}.{type(model).__name__} has "
            + " and ".join(varying)
        )
    if frames is not None:
        if patches % frames:
            raise ValueError(
                f"frames={frames} must divide the model's {patches} patch tokens (frames x patches layout)"
            )
    factory = _factory(model)
    mixer_cls = nn_losa.LoSAMixer if impl == "fused" else ref_losa.LoSAMixer
    mixers = []
    for l in range(1, len(model.blocks) + 1):
        if l % 2:  # odd l: channel mixing
            mixer = mixer_cls("channel", d, r, **factory)
        elif frames is None:  # even l: token mixing over all T tokens (prefix included)
            mixer = mixer_cls("token", patches + prefix, r, **factory)
        else:
            mixer = mixer_cls("video", patches // frames, r, frames=frames, prefix=prefix, **factory)
        # one initialisation, in parameter-name order, for both impls (the reference mixer has the
        # same parameter names), so that a seed gives both the same starting state
        nn_losa.LoSAMixer.reset_parameters(mixer)
        mixers.append(mixer)
    return [(None, "side", nn.ModuleList(mixers))]


METHODS = tuple(_REGISTRY)


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------
def adapt(model: nn.Module, method: str, impl: str = "fused", **config) -> nn.Module:
    """Adapt a timm VisionTransformer or SwinTransformer in place with ``method`` (one of :data:`METHODS`).

    On Swin every block of every stage is adapted (see each method's build for what is
    shared per stage); a method that does not serve Swin (LoSA) raises a TypeError saying why.

    Freezes every backbone parameter, inserts the method's trainable modules, leaves the
    classifier head (each of ``get_classifier()``'s heads: DeiT's distilled ViT has two)
    trainable and returns ``model``. At init the adapted model computes
    what the original computes. ``impl="reference"`` builds the naive modules of
    :mod:`kron_kernels.reference` with the same parameter names, for comparisons.

    Config (defaults): kadaptation ``n=32, r=1, targets=("q", "v"), bias=False, scale=1.0``
    (targets among ``"q", "k", "v", "proj"``); compacter ``n=4, k=d // 32``;
    fact_tt ``r=4, scale=1.0, dropout=0.1``; fact_tk ``r=8, scale=1.0, dropout=0.1`` (FacT's
    ``s`` is a per-task hyper-parameter swept over {0.01, 0.1, 1, 10, 100} in the paper; 1.0,
    the middle of that sweep, is the default); arc ``r=50, dropout=0.1``; losa ``r=64,
    frames=None``.

    LoSA returns a :class:`kron_kernels.nn.LoSAModel` wrapping ``model`` (its ``backbone``):
    use the returned module. Its ``forward`` runs the backbone without autograd. With
    ``frames=F`` the patch tokens are read as F frames of ``num_patches / F`` patches,
    frame-major after the prefix (cls/register) tokens -- e.g. F frames stacked along the image
    height -- and each token-mixing layer sums a spatial and a temporal mixer
    (:mod:`kron_kernels.nn.losa`).

    Every hyperparameter is checked by name (:data:`_HYPERPARAMETERS`): a TypeError for a value of
    the wrong kind (a bool, a string, ``1.5`` as a rank), a ValueError for one out of range or
    not finite. Every check (the model, the method, impl and config, every block's layers) runs before
    the model is touched: when adapt raises, the model is exactly as it was. An adapted model
    is refused (methods do not stack).
    """
    if isinstance(model, nn.Module):
        _check_fresh(model)
    heads = _heads(model)
    if not isinstance(method, str) or method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; kk.METHODS = {METHODS}")
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    spec = _REGISTRY[method]
    _check_method_backbone(model, spec)
    unknown = sorted(set(config) - set(spec.defaults))
    if unknown:
        raise TypeError(f"{method} got unknown config {unknown}; it accepts {sorted(spec.defaults)}")
    config = _checked_config(method, {**spec.defaults, **config})
    shared = SharedFactors(method, impl, {})
    replacements = spec.build(model, impl, config, shared)
    shared.config = config  # as resolved by build (defaults filled in)
    # everything is built and checked: only now change the model (nothing below can refuse)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, new in replacements:
        new.train(model.training if parent is None else parent.training)
        if parent is not None:
            setattr(parent, attr, new)
    result = model
    if spec.wrap is not None:
        result = spec.wrap(model, {attr: new for parent, attr, new in replacements if parent is None})
        result.train(model.training)
    shared.train(model.training)
    setattr(result, SHARED_ATTR, shared)
    for head in heads:
        head.requires_grad_(True)
    return result


def merge(model: nn.Module) -> nn.Module:
    """Fold every increment into the frozen weights (zero-latency inference); returns ``model``.

    Methods with a nonlinear adapter (Compacter) raise a ValueError saying why.
    """
    shared = _find_shared(model)
    error = _REGISTRY[shared.method].merge_error
    if error is not None:
        raise ValueError(f"{shared.method} adapters cannot be merged: {error}")
    layers = [m for m in _adapter_layers(model) if hasattr(m, "merge")]
    if any(m.merged for m in layers):
        raise ValueError("the model is already merged; call kk.unmerge(model) first")
    _all_or_none(layers, "merge", "unmerge")
    return model


def _all_or_none(layers: List[nn.Module], step: str, undo: str) -> None:
    """Run ``layer.<step>()`` on every layer; if one raises, ``<undo>`` the layers already done
    (merge and unmerge restore each other bitwise) and re-raise: the model is left as it was."""
    done = []
    try:
        for m in layers:
            getattr(m, step)()
            done.append(m)
    except BaseException:
        for m in reversed(done):
            getattr(m, undo)()
        raise


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the exact pre-merge weights; returns ``model``."""
    shared = _find_shared(model)
    error = _REGISTRY[shared.method].merge_error
    if error is not None:
        raise ValueError(f"{shared.method} adapters cannot be merged or unmerged: {error}")
    layers = [m for m in _adapter_layers(model) if hasattr(m, "unmerge")]
    if not all(m.merged for m in layers):
        raise ValueError("the model is not merged; call kk.merge(model) first")
    _all_or_none(layers, "unmerge", "merge")
    return model


def _adapter_keys(model: nn.Module) -> List[str]:
    _find_shared(model)
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,)
    keys = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, SharedFactors):
            # recurse: a Swin model's per-stage factors live on kk_shared.stage<i>
            keys += [dot + name for name, _ in module.named_parameters()]
        elif any(module is head for head in heads):
            keys += [dot + name for name in module.state_dict()]
        else:
            keys += [dot + name for name in getattr(module, "kk_adapter_params", ())]
    return keys


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors and the classifier head's, by their names in ``model.state_dict()``.

    Like ``state_dict()``, the values are detached tensors sharing storage with the model.
    """
    full = model.state_dict(keep_vars=False)
    return {key: full[key] for key in _adapter_keys(model)}


class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]


def _listing(keys, limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Copy the adapter (and head) tensors of ``state`` into ``model``.

    Shape mismatches always raise; with ``strict`` (the default) missing and unexpected
    names raise too, else they are returned. Raises on a merged model (unmerge first).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    targets = adapter_state_dict(model)
    missing = [k for k in targets if k not in state]
    unexpected = [k for k in state if k not in targets]
    not_tensors = [k for k in state if k in targets and not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        raise TypeError(f"adapter state values must be tensors: {_listing(not_tensors)}")
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(t.shape)}"
        for k, t in targets.items()
        if k in state and state[k].shape != t.shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {_listing(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        shared = _find_shared(model)
        raise ValueError(
            f"cannot load the adapter state into this {shared.method} model ({shared.config}): " + "; ".join(problems)
        )
    if any(getattr(m, "merged", False) for m in _adapter_layers(model)):
        raise ValueError("the model is merged; call kk.unmerge(model) before loading adapter weights")
    # convert every value first (a dtype or device it cannot take raises here), then copy:
    # a load that raises leaves the model as it was
    staged = {}
    for key, tensor in targets.items():
        if key not in state:
            continue
        value = state[key]
        if value.is_complex() and not tensor.is_complex():
            raise TypeError(f"state[{key!r}] is complex ({value.dtype}); the model's {key} is {tensor.dtype}")
        try:
            staged[key] = value.detach().to(device=tensor.device, dtype=tensor.dtype)
        except (RuntimeError, NotImplementedError) as exc:
            raise ValueError(f"state[{key!r}] cannot be loaded into the model's {key}: {exc}") from exc
    with torch.no_grad():
        for key, value in staged.items():
            targets[key].copy_(value)
    return LoadResult(missing, unexpected)
