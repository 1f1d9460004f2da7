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

from .nn.fastfood import FastfoodSubspace, Include, select_parameters

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
    for _, (x, y) in zip(range(steps), itertools.cycle(data)):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return float(loss.detach())


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
    per_tensor: bool = False,
    said: bool = False,
    stop_early: bool = False,
    progress: bool = True,
) -> IntrinsicDimensionResult:
    """Measure the intrinsic dimension of ``model``'s chosen parameters on a task.

    Args:
        model: left untouched; every run trains a deep copy.
        data: a re-iterable of ``(inputs, targets)`` batches (e.g. a DataLoader), cycled.
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
        seed, mode, per_tensor, said: the projection (``FastfoodSubspace``).
        stop_early: stop at the first d that reaches the threshold.
        progress: show a tqdm progress bar (if tqdm is installed).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    dims = sorted(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"dims must be a non-empty list of positive ints, got {dims!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    names = select_parameters(model, include)
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
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
                                   said=said, include=include)
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
