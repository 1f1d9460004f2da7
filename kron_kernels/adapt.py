"""timm model surgery: ``adapt``, ``merge``/``unmerge`` and adapter-only state dicts (DESIGN.md 3).

``adapt(model, method, impl="fused", **config)`` freezes a timm ``VisionTransformer``,
inserts the method's modules (``impl="fused"``: :mod:`kron_kernels.nn`; ``impl="reference"``:
the naive classes of :mod:`kron_kernels.reference`, with the same parameter names and
shapes), leaves the classifier head trainable and returns the model, changed in place.

Parameters shared across layers (KAdaptation's ``A_q``/``A_v``, Compacter's ``A``) are
registered once, on a :class:`SharedFactors` module attached as ``model.kk_shared``, which
also records the method, impl and config. The layers look them up there on every call
without registering them, so ``model.parameters()`` and state dicts hold each exactly once.

Methods are registered with ``_register`` below; ``METHODS`` lists them in registration order.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .nn import compacter as nn_compacter
from .nn import kadaptation as nn_kadaptation
from .reference import compacter as ref_compacter
from .reference import kadaptation as ref_kadaptation

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


_REGISTRY: Dict[str, _Method] = {}


def _register(name: str, defaults: Mapping[str, Any], merge_error: Optional[str] = None):
    """Register ``build(model, impl, config, shared) -> [(parent, attribute, new_module), ...]``.

    ``build`` validates everything and creates the new modules and the shared parameters
    (on ``shared``) but changes nothing on ``model``: ``adapt`` applies the returned
    replacements only once every block has been built, so a bad config leaves the model as it was.
    """

    def decorator(build):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = _Method(name, MappingProxyType(dict(defaults)), build, merge_error)
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
def _check_vit(model) -> None:
    supported = "timm.models.vision_transformer.VisionTransformer"
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # without timm nothing can be a timm ViT
        raise TypeError(f"kk.adapt supports {supported} models, and timm is not installed") from None
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"kk.adapt supports {supported} models, got {type(model).__module__}.{type(model).__name__}")


def _factory(model: nn.Module) -> Dict[str, Any]:
    """Device and dtype of new factors: the backbone's device; float32 (float64 next to float64)."""
    weight = model.patch_embed.proj.weight if hasattr(model, "patch_embed") else next(model.parameters())
    return dict(device=weight.device, dtype=nn_kadaptation.factor_dtype(weight))


def _named_blocks(model) -> List[Tuple[str, nn.Module]]:
    return [(f"blocks.{i}", blk) for i, blk in enumerate(model.blocks)]


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
_KADAPTATION_TARGETS = ("q", "k", "v", "proj")


@_register("kadaptation", defaults=dict(n=32, r=1, targets=("q", "v"), bias=False, scale=1.0))
def _build_kadaptation(model, impl: str, config: Dict[str, Any], shared: SharedFactors):
    """KAdaptation on the q/k/v row slices of each block's fused ``attn.qkv`` and/or ``attn.proj``."""
    targets = config["targets"]
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in _KADAPTATION_TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise ValueError(
            f"kadaptation targets must be distinct names among {_KADAPTATION_TARGETS}, got {config['targets']!r}"
        )
    config["targets"] = targets
    n = config["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    factory = _factory(model)
    for kind in targets:
        shared.register_parameter(f"A_{kind}", nn.Parameter(torch.empty(n, n, n, **factory)))
        nn_kadaptation.init_shared_factor(getattr(shared, f"A_{kind}"))
    layer_cls = nn_kadaptation.KAdaptationLinear if impl == "fused" else ref_kadaptation.KAdaptationLinear
    options = dict(n=n, r=config["r"], bias=config["bias"], scale=config["scale"], shared=shared)
    qkv_kinds = [t for t in ("q", "k", "v") if t in targets]
    replacements = []
    for block_name, blk in _named_blocks(model):
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
)
def _build_compacter(model, impl: str, config: Dict[str, Any], shared: SharedFactors):
    """A Compacter adapter on the output of every block's ``attn`` and ``mlp`` (before the residual)."""
    n, d = config["n"], model.embed_dim
    k = d // 32 if config["k"] is None else config["k"]
    config["k"] = k
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the bottleneck size k must be a positive int, got {k!r} (default d // 32 = {d // 32})")
    if d % n or k % n:
        raise ValueError(f"n={n} must divide the hidden size d={d} and the bottleneck size k={k}")
    factory = _factory(model)
    shared.A = nn.Parameter(nn_kadaptation.init_shared_factor(torch.empty(n, n, n, **factory)))
    adapter_cls = nn_compacter.CompacterAdapter if impl == "fused" else ref_compacter.CompacterAdapter
    replacements = []
    for block_name, blk in _named_blocks(model):
        for attr in ("attn", "mlp"):
            module = _submodule(blk, block_name, attr, "compacter")
            name = f"{block_name}.{attr}"
            adapter = _built(name, lambda: adapter_cls(d, k, n, A=shared, **factory))
            replacements.append((blk, attr, nn_compacter.AdapterWrapper(module, adapter)))
    return replacements


METHODS = tuple(_REGISTRY)


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------
def adapt(model: nn.Module, method: str, impl: str = "fused", **config) -> nn.Module:
    """Adapt a timm VisionTransformer in place with ``method`` (one of :data:`METHODS`).

    Freezes every backbone parameter, inserts the method's trainable modules, leaves the
    classifier head trainable and returns ``model``. At init the adapted model computes
    what the original computes. ``impl="reference"`` builds the naive modules of
    :mod:`kron_kernels.reference` with the same parameter names, for comparisons.

    Config (defaults): kadaptation ``n=32, r=1, targets=("q", "v"), bias=False, scale=1.0``
    (targets among ``"q", "k", "v", "proj"``); compacter ``n=4, k=d // 32``.
    """
    _check_vit(model)
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; kk.METHODS = {METHODS}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    spec = _REGISTRY[method]
    unknown = sorted(set(config) - set(spec.defaults))
    if unknown:
        raise TypeError(f"{method} got unknown config {unknown}; it accepts {sorted(spec.defaults)}")
    if any(isinstance(m, SharedFactors) for m in model.modules()):
        previous = _find_shared(model)
        raise ValueError(f"this model is already adapted ({previous.method}); adapt a fresh model")
    config = {**spec.defaults, **config}
    shared = SharedFactors(method, impl, {})
    replacements = spec.build(model, impl, config, shared)
    shared.config = config  # as resolved by build (defaults filled in)
    # everything is built: only now change the model
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, new in replacements:
        new.train(parent.training)
        setattr(parent, attr, new)
    shared.train(model.training)
    setattr(model, SHARED_ATTR, shared)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    return model


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
    for m in layers:
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the exact pre-merge weights; returns ``model``."""
    shared = _find_shared(model)
    error = _REGISTRY[shared.method].merge_error
    if error is not None:
        raise ValueError(f"{shared.method} adapters cannot be merged or unmerged: {error}")
    layers = [m for m in _adapter_layers(model) if hasattr(m, "unmerge")]
    if not all(m.merged for m in layers):
        raise ValueError("the model is not merged; call kk.merge(model) first")
    for m in layers:
        m.unmerge()
    return model


def _adapter_keys(model: nn.Module) -> List[str]:
    _find_shared(model)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    keys = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, SharedFactors):
            keys += [dot + name for name, _ in module.named_parameters(recurse=False)]
        elif module is head:
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
    with torch.no_grad():
        for key, tensor in targets.items():
            if key in state:
                tensor.copy_(state[key])
    return LoadResult(missing, unexpected)
