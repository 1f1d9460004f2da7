"""Intrinsic dimension (Li et al. 2018): the smallest subspace dimension d whose training
reaches ``threshold`` (90%) of the metric that training every chosen parameter reaches.

Procedure, as in the paper: train the chosen parameters directly (the baseline, unless its
metric is given), then for each d in ``dims`` (ascending) train a fresh copy of the model in a
random d-dimensional Fastfood subspace (:class:`kron_kernels.nn.FastfoodSubspace`) with the
same data, loss and number of steps, evaluate, and report ``d90``: the smallest d whose metric
is at least ``threshold * full_metric`` (None when no d reaches it). Works on any module --
e.g. on one block of a timm ViT with ``include="blocks.0.attn"`` (only that block's attention
parameters move; the KAdaptation paper measures the attention and the MLP of a block this way).
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from .nn.fastfood import FastfoodSubspace, Include, check_subspace_options, select_parameters
from .ops._common import check_bool, check_float, check_int
from .ops._fastfood_generator import DEFAULT_GENERATOR

__all__ = ["intrinsic_dimension", "IntrinsicDimensionResult"]


@dataclass
class IntrinsicDimensionResult:
    """Per-d metrics, the full-training metric, and d90 (None if no d reached the threshold)."""

    metrics: Dict[int, float]
    full_metric: float
    threshold: float
    d90: Optional[int]
    n_params: int = 0
    losses: Dict[object, float] = field(default_factory=dict)

    def __str__(self) -> str:
        target = self.threshold * self.full_metric
        lines = [f"full training ({self.n_params} parameters): {self.full_metric:.4f}; "
                 f"target {self.threshold:.0%} = {target:.4f}"]
        lines += [f"  d = {d:>8}: {m:.4f}{'  <- d' + format(round(self.threshold * 100)) if d == self.d90 else ''}"
                  for d, m in self.metrics.items()]
        lines.append(f"intrinsic dimension d{round(self.threshold * 100)} = {self.d90}")
        return "\n".join(lines)


def _train(model: nn.Module, params, data: Iterable, loss_fn: Callable, steps: int, lr: float, bar) -> float:
    """``steps`` Adam steps cycling through ``data``; returns the last loss."""
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    done = 0
    for _, (x, y) in zip(range(steps), itertools.cycle(data)):
        done += 1
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if done == 0:  # a one-shot iterator that an earlier run used up
        raise ValueError("data yielded no batches (an iterator that was already exhausted? "
                         "intrinsic_dimension needs a re-iterable such as a list or a DataLoader)")
    return float(loss.detach())


_NO_BATCH = object()


def _check_data(data):
    """``data`` itself if it yields at least one batch; a one-shot iterator is returned with
    its first batch put back in front. Refuses data that yields nothing, by name."""
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}") from None
    first = next(it, _NO_BATCH)
    one_shot = it is data
    if first is _NO_BATCH:
        if one_shot:
            raise ValueError("data yielded no batches (an iterator that was already exhausted?)")
        raise ValueError("data yielded no batches (an empty dataset or DataLoader?)")
    if one_shot:
        return itertools.chain([first], it)
    return data


def intrinsic_dimension(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable,
    eval_fn: Callable[[nn.Module], float],
    dims: Sequence[int],
    *,
    include: Include = None,
    threshold: float = 0.9,
    steps: int = 200,
    lr: float = 1e-2,
    full_lr: float = 1e-3,
    full_metric: Optional[float] = None,
    seed: int = 0,
    mode: str = "stacked",
    generator: int = DEFAULT_GENERATOR,
    per_tensor: bool = False,
    said: bool = False,
    stop_early: bool = False,
    progress: bool = True,
) -> IntrinsicDimensionResult:
    """Measure the intrinsic dimension of ``model``'s chosen parameters on a task.

    Args:
        model: left untouched; every run trains a deep copy.
        data: a re-iterable of ``(inputs, targets)`` batches (e.g. a DataLoader), cycled; a
            one-shot iterator works only if it never runs dry (e.g. an endless generator).
            Data that yields no batch is refused before any training (ValueError).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar to minimise.
        eval_fn: ``eval_fn(trained_model)`` -> metric, higher is better (e.g. accuracy);
            called with the subspace-wrapped model for each d.
        dims: subspace dimensions to try (sorted ascending).
        include: the parameters to train (see ``kk.nn.FastfoodSubspace``); the rest stay frozen
            in every run, the baseline included.
        threshold: the fraction of the full metric to reach (0.9 gives d90).
        steps, lr: Adam steps and learning rate of each subspace run (theta's scale: P has
            unit-norm columns, so a step in theta moves the weights by about as much).
        full_lr: the baseline's learning rate; ``full_metric`` skips the baseline.
        seed, mode, generator, per_tensor, said: the projection (``FastfoodSubspace``;
            ``generator`` the version of its generator, 1 or 2).
        stop_early: stop at the first d that reaches the threshold.
        progress: show a tqdm progress bar (if tqdm is installed).
    """
    # every argument is checked before any training (the model itself is never changed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("eval_fn", eval_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if any(isinstance(m, FastfoodSubspace) for m in model.modules()):
        raise ValueError("model is or contains a FastfoodSubspace: pass the unwrapped model")
    threshold = check_float("threshold", threshold, min=0.0, max=1.0, min_open=True)
    if isinstance(dims, (str, bytes, torch.Tensor)) or not isinstance(dims, Iterable):
        raise TypeError(f"dims must be a non-empty list of positive ints, got {type(dims).__name__} {dims!r}")
    dims = list(dims)
    for d in dims:
        try:
            check_int("dims", d, min=1)
        except TypeError:
            raise TypeError(f"dims must be a non-empty list of positive ints, got {dims!r}") from None
        except ValueError:
            raise ValueError(f"dims must be a non-empty list of positive ints, got {dims!r}") from None
    if not dims:
        raise ValueError(f"dims must be a non-empty list of positive ints, got {dims!r}")
    dims = sorted(dims)
    steps = check_int("steps", steps, min=1)
    lr = check_float("lr", lr, min=0.0, min_open=True)
    full_lr = check_float("full_lr", full_lr, min=0.0, min_open=True)
    if full_metric is not None:
        full_metric = check_float("full_metric", full_metric)
    for name, flag in (("stop_early", stop_early), ("progress", progress)):
        check_bool(name, flag)
    names = select_parameters(model, include)
    params = dict(model.named_parameters())
    if any(not params[n].is_floating_point() for n in names):
        raise TypeError("the chosen parameters must be floating point")
    n_params = sum(params[n].numel() for n in names)
    sizes = [params[n].numel() for n in names]
    for d in dims:  # seed, mode, generator, per_tensor, said and every d against the chosen tensors' sizes
        check_subspace_options(d, seed, mode, per_tensor, said, sizes, generator)
    data = _check_data(data)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps * (len(dims) + (full_metric is None)), desc="intrinsic dimension")
        except ImportError:
            bar = None
    losses: Dict[object, float] = {}
    try:
        if full_metric is None:
            if bar is not None:
                bar.set_description("full training")
            full = copy.deepcopy(model)
            chosen = set(names)
            for n, p in full.named_parameters():
                p.requires_grad_(n in chosen)
            losses["full"] = _train(full, [p for p in full.parameters() if p.requires_grad], data, loss_fn,
                                    steps, full_lr, bar)
            full.eval()
            with torch.no_grad():
                full_metric = float(eval_fn(full))
        metrics: Dict[int, float] = {}
        d90 = None
        for d in dims:
            if bar is not None:
                bar.set_description(f"subspace d={d}")
            sub = FastfoodSubspace(copy.deepcopy(model), d, seed=seed, mode=mode, per_tensor=per_tensor,
                                   said=said, include=include, generator=generator)
            losses[d] = _train(sub, [p for p in sub.parameters() if p.requires_grad], data, loss_fn, steps, lr, bar)
            sub.eval()
            with torch.no_grad():
                metrics[d] = float(eval_fn(sub))
            if d90 is None and metrics[d] >= threshold * full_metric:
                d90 = d
                if stop_early:
                    break
    finally:
        if bar is not None:
            bar.close()
    return IntrinsicDimensionResult(metrics, full_metric, threshold, d90, n_params, losses)
