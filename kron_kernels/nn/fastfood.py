"""Subspace training: ``FastfoodSubspace`` reparameterises a module's parameters as
``Theta = Theta0 + P theta`` with P a Fastfood projection (DESIGN.md 4.6; Li et al. 2018,
"Measuring the intrinsic dimension of objective landscapes"; Aghajanyan et al. 2021, SAID).

* Global (``per_tensor=False``, Li et al.): the chosen parameters, flattened in
  ``named_parameters`` order and concatenated, form one D-vector; ``P: R^d -> R^D`` is one
  ``kk.fastfood`` call per forward.
* Per tensor (``per_tensor=True``): tensor i gets its own projection ``P_i: R^d -> R^{D_i}``
  of the same theta, with seed ``(seed + (i + 1) * 0x9E3779B97F4A7C15) mod 2^64``, each
  normalised to unit-norm columns for its own D_i.
* SAID (``said=True``, Aghajanyan et al.): per-tensor scalars ``lambda_i`` (initialised to 1
  -- with theta = 0 *and* lambda = 0 neither would ever get a gradient) multiply tensor i's
  increment: ``Theta_i = Theta0_i + lambda_i (P theta)_i``. The paper counts the m scalars in
  its d; here they come on top of theta's d.

Only ``theta`` (and ``lambdas``) are parameters of the wrapper that require grad. The chosen
parameters are turned into *buffers* of their owner modules (same tensors, no copy) holding
Theta0, so no optimiser over ``parameters()`` can touch them and they get no gradient; the
other parameters of ``module`` are frozen (``requires_grad=False``; re-enable e.g. a head's
by hand). The forward is ``torch.func.functional_call`` with the reparameterised tensors;
at theta = 0 it returns exactly the module's output (``P 0 = 0`` exactly, and
``Theta0 + 0 == Theta0``).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call

from ..ops._common import check_bool, check_int
from ..ops.fastfood import DEFAULT_GENERATOR, MODES, check_generator, fastfood, fastfood_block_size

__all__ = ["FastfoodSubspace", "select_parameters", "check_subspace_options"]

Include = Union[None, str, Iterable[str], Callable[[str], bool]]
_SEED_STEP = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: per-tensor seeds far apart
# every module of a tree already wrapped by a FastfoodSubspace (weakly: no leak)
_WRAPPED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def check_subspace_options(d, seed, mode, per_tensor, said, sizes: Sequence[int],
                           generator=DEFAULT_GENERATOR) -> Tuple[int, int]:
    """Validate a subspace's options against the chosen tensors' ``sizes`` (TypeError /
    ValueError naming the argument): ``d`` a positive int, ``seed`` an int in [0, 2^64),
    ``mode`` one of MODES, ``per_tensor``/``said`` bools, ``generator`` one of
    ``kk.ops.fastfood``'s GENERATORS, and every projection that the forward will compute
    (``R^d -> R^D``, or ``R^d -> R^{D_i}`` per tensor) within ``kk.fastfood``'s limits. Returns
    ``(d, seed)`` as Python ints (a numpy int converted)."""
    d = check_int("d", d, min=1)
    seed = check_int("seed", seed, min=0, max=(1 << 64) - 1, desc="an int in [0, 2^64)")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_generator(generator)
    check_bool("per_tensor", per_tensor)
    check_bool("said", said)
    for D in (sizes if per_tensor else [sum(sizes)]):
        fastfood_block_size(D, d, mode)
    return d, seed


def select_parameters(module: nn.Module, include: Include = None) -> List[str]:
    """Names of ``module``'s parameters chosen by ``include``: None = all; a name or list of
    names, each matching a parameter exactly or a submodule prefix (``"blocks.0.attn"``
    chooses every parameter under it); or a predicate ``include(name) -> bool``."""
    names = [n for n, _ in module.named_parameters()]
    if include is None:
        chosen = names
    elif callable(include):
        chosen = [n for n in names if include(n)]
    else:
        wanted = [include] if isinstance(include, str) else list(include)
        if not all(isinstance(w, str) for w in wanted):
            raise TypeError("include must be None, a name, a list of names, or a predicate on names")
        unknown = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n in names)]
        if unknown:
            raise ValueError(f"include: no parameter of the module is or is under {unknown}")
        chosen = [n for n in names if any(n == w or n.startswith(w + ".") for w in wanted)]
    if not chosen:
        raise ValueError("include chose no parameter of the module")
    return chosen


class FastfoodSubspace(nn.Module):
    """Train ``module`` in a random d-dimensional subspace: ``Theta = Theta0 + P theta``.

    Args:
        module: the model (or submodule) whose parameters are reparameterised (in place: the
            chosen parameters become buffers of their owners).
        d: the subspace dimension (``theta``'s length).
        seed, mode: of the Fastfood projection (``kk.fastfood``).
        generator: the version of the projection's generator (``kk.fastfood``'s ``generator``:
            1, the default, or 2).
        per_tensor: one projection per tensor instead of one global projection.
        said: per-tensor scales ``lambda_i`` (SAID).
        include: which parameters (see :func:`select_parameters`); default all.

    Everything is validated before ``module`` is touched (``d``, ``seed``, ``mode``, ``generator``, the bool
    flags ``per_tensor``/``said``, ``include``, floating-point parameters on one device, and
    every projection against ``kk.fastfood``'s limits): a refusal (TypeError/ValueError naming
    the argument) leaves the module exactly as it was. A module that is, contains, or is part
    of a module already wrapped by a ``FastfoodSubspace`` is refused (its parameters are
    already reparameterised); wrap once, choosing every tensor with ``include``.
    """

    def __init__(self, module: nn.Module, d: int, seed: int = 0, mode: str = "stacked",
                 per_tensor: bool = False, said: bool = False, include: Include = None, *,
                 generator: int = DEFAULT_GENERATOR):
        super().__init__()
        # everything is checked before the module is touched: a refusal leaves it as it was
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if any(isinstance(m, FastfoodSubspace) for m in module.modules()):
            raise ValueError("module is or contains a FastfoodSubspace: wrapping it again is not supported")
        if any(m in _WRAPPED for m in module.modules()):
            raise ValueError("module is (part of) a module already wrapped by FastfoodSubspace: "
                             "its parameters are already reparameterised")
        if next(module.parameters(), None) is None:
            raise ValueError("module has no parameters to reparameterise")
        names = select_parameters(module, include)
        params = dict(module.named_parameters())
        if any(not params[n].is_floating_point() for n in names):
            bad = [n for n in names if not params[n].is_floating_point()]
            raise TypeError(f"the chosen parameters must be floating point: {bad}")
        device = {params[n].device for n in names}
        if len(device) > 1:
            raise ValueError(f"the chosen parameters live on several devices: {device}")
        sizes = [params[n].numel() for n in names]
        d, seed = check_subspace_options(d, seed, mode, per_tensor, said, sizes, generator)
        generator = check_generator(generator)
        # the aliases of a tied parameter (e.g. shared embeddings) all get the one new tensor
        aliases: Dict[str, List[str]] = {n: [] for n in names}
        ids = {id(params[n]): n for n in names}
        for alias, p in module.named_parameters(remove_duplicate=False):
            if id(p) in ids and alias != ids[id(p)]:
                aliases[ids[id(p)]].append(alias)
        owners = []
        for n in names:
            for name in [n] + aliases[n]:
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                if leaf not in owner._parameters:
                    raise ValueError(f"cannot reparameterise {name!r}: it is not a plain parameter of its module")
                owners.append((owner, leaf))
        first = params[names[0]]
        theta = nn.Parameter(torch.zeros(d, device=first.device, dtype=torch.float32))
        lambdas = nn.Parameter(torch.ones(len(names), device=first.device)) if said else None
        # ---- nothing below raises on valid input: from here on the module is changed
        self.module = module
        self.names = names
        self.shapes = [params[n].shape for n in names]
        self.sizes = sizes
        self.d, self.seed, self.mode, self.generator = d, seed, mode, generator
        self.per_tensor, self.said = per_tensor, said
        self._aliases = aliases
        for p in module.parameters():
            p.requires_grad_(False)
        for owner, leaf in owners:
            tensor = owner._parameters.pop(leaf)
            owner.register_buffer(leaf, tensor.detach())
        self.theta = theta
        self.lambdas = lambdas
        for m in module.modules():
            _WRAPPED.add(m)

    @property
    def D(self) -> int:
        """Number of reparameterised scalars."""
        return sum(self.sizes)

    def tensor_seed(self, i: int) -> int:
        return (self.seed + (i + 1) * _SEED_STEP) % (1 << 64)

    def increments(self) -> List[torch.Tensor]:
        """``(P theta)_i`` (times ``lambda_i`` with SAID), one flat fp32 tensor per chosen parameter."""
        if self.per_tensor:
            parts = [fastfood(self.theta, size, self.tensor_seed(i), self.mode, generator=self.generator)
                     for i, size in enumerate(self.sizes)]
        else:
            parts = list(torch.split(fastfood(self.theta, self.D, self.seed, self.mode, generator=self.generator),
                                     self.sizes))
        if self.said:
            parts = [lam * part for lam, part in zip(self.lambdas, parts)]
        return parts

    def reparameterised(self) -> Dict[str, torch.Tensor]:
        """``{name: Theta0 + increment}`` for every chosen parameter and its aliases."""
        base = dict(self.module.named_buffers(remove_duplicate=False))
        out = {}
        for name, shape, inc in zip(self.names, self.shapes, self.increments()):
            theta0 = base[name]
            value = theta0 + inc.view(shape).to(theta0.dtype)
            for alias in [name] + self._aliases[name]:
                out[alias] = value
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.module, self.reparameterised(), args, kwargs, tie_weights=False)

    def extra_repr(self) -> str:
        return (f"d={self.d}, D={self.D}, tensors={len(self.names)}, seed={self.seed}, mode={self.mode!r}, "
                f"generator={self.generator}, per_tensor={self.per_tensor}, said={self.said}")
