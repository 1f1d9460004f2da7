"""LoSA, low-rank side adaptation (DESIGN.md 4.4): a side network on a frozen, autograd-free ViT.

:class:`LoSAModel` wraps a timm ``VisionTransformer`` (``kk.adapt(model, "losa")`` returns
the wrapper; the ViT is its ``backbone``). Its forward:

1. runs ``backbone.forward_features`` under ``torch.no_grad()``; forward hooks on the blocks
   collect the block outputs ``z_1 .. z_L``. No autograd graph is built for the backbone and
   no gradient can reach it, so training costs roughly a linear probe plus the side network;
2. side network: ``h_0 = z_L``, ``h_l = h_{l-1} + alpha_l GELU((z_l + h_{l-1}) W_down) W_up``
   (:func:`kron_kernels.losa_mixer`, no biases), mixing channels (``C -> r -> C``) at odd
   ``l`` (1-based) and tokens (``T -> r -> T``) at even ``l``;
3. ``h_L`` goes through the backbone's own final ``norm`` and its ``forward_head`` (pooling
   per ``global_pool`` / cls token, ``fc_norm``, the trainable ``head``). ``W_up = 0`` at
   init, so at step 0 the wrapper computes exactly what the backbone computes.

Video (``frames=F``): the token axis is ``num_prefix_tokens`` prefix tokens (cls) followed by
``F * P`` patch tokens, frame-major (token ``prefix + f * P + p``) -- e.g. the F frames stacked
along the image height, which timm's row-major patch flattening turns into this order. A
token-mixing layer then sums a spatial mixer (over the P patches of each frame) and a
temporal mixer (over the F frames of each patch position), both read from the same
``x = z + h``: ``h_l = h + alpha (f_spatial(x) + f_temporal(x))`` on the patch tokens; the
prefix tokens are left unchanged by token layers (they are mixed by the channel layers).

Initialisation: ``W_down ~ N(0, 1/features)``, ``W_up = 0``, ``alpha = 1``: the first backward
reaches ``W_up``, from the second step on every factor gets a gradient.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .. import ops
from ..ops._common import check_int

__all__ = ["LoSAMixer", "LoSAModel", "KINDS"]

KINDS = ("channel", "token", "video")


class LoSAMixer(nn.Module):
    """One side-network layer ``h, z -> h'``.

    Args:
        kind: ``"channel"`` (``W_down: (C, r)``), ``"token"`` (``W_down: (T, r)``) or ``"video"``
            (``W_down_spatial: (P, r)``, ``W_down_temporal: (F, r)``; the module docstring's layout).
        features: C for channel, T for token, P (patches per frame) for video.
        r: rank. frames: F (video only). prefix: prefix tokens before the patches (video only).
    """

    def __init__(self, kind: str, features: int, r: int, frames: Optional[int] = None, prefix: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        # the shared validators (TypeError: not an int; ValueError: out of range)
        features = check_int("features", features, min=1)
        r = check_int("r", r, min=1)
        if kind == "video":
            frames = check_int("frames", frames, min=1, desc="a positive int (the number of frames) for kind='video'")
        elif frames is not None:
            frames = check_int("frames", frames, min=1, desc="a positive int or None (only kind='video' reads it)")
        prefix = check_int("prefix", prefix, min=0)
        self.kind, self.features, self.r, self.frames, self.prefix = kind, features, r, frames, prefix
        factory = dict(device=device, dtype=dtype)
        sizes = {"": features} if kind != "video" else {"_spatial": features, "_temporal": frames}
        names = []
        for suffix, n in sizes.items():
            self.register_parameter(f"W_down{suffix}", nn.Parameter(torch.zeros(n, r, **factory)))
            self.register_parameter(f"W_up{suffix}", nn.Parameter(torch.zeros(r, n, **factory)))
            names += [f"W_down{suffix}", f"W_up{suffix}"]
        self.alpha = nn.Parameter(torch.ones((), **factory))
        self.kk_adapter_params = tuple(names) + ("alpha",)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``W_down ~ N(0, 1/features)``, ``W_up = 0``, ``alpha = 1`` (module docstring)."""
        for name in self.kk_adapter_params:
            p = getattr(self, name)
            if name.startswith("W_down"):
                p.normal_(0.0, p.shape[0] ** -0.5)
            elif name.startswith("W_up"):
                p.zero_()
            else:
                p.fill_(1.0)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.kind != "video":
            return ops.losa_mixer(h, z, self.W_down, self.W_up, self.alpha, axis=self.kind)
        n = self.prefix
        hp = h[:, n:].unflatten(1, (self.frames, -1))  # (B, F, P, C)
        zp = z[:, n:].unflatten(1, (self.frames, -1))
        spatial = ops.losa_mixer(hp, zp, self.W_down_spatial, self.W_up_spatial, self.alpha, axis="token")
        # the temporal mixer reads the same x = z + h; with h = 0 the op returns alpha f_t(x) alone
        x_t = (zp + hp).transpose(1, 2)  # (B, P, F, C)
        temporal = ops.losa_mixer(torch.zeros_like(x_t), x_t, self.W_down_temporal, self.W_up_temporal,
                                  self.alpha, axis="token")
        patches = (spatial + temporal.transpose(1, 2)).flatten(1, 2)
        return torch.cat([h[:, :n], patches], dim=1)

    def extra_repr(self) -> str:
        video = f", frames={self.frames}, prefix={self.prefix}" if self.kind == "video" else ""
        return f"kind={self.kind!r}, features={self.features}, r={self.r}{video}"


class LoSAModel(nn.Module):
    """The LoSA wrapper: frozen ``backbone`` (a timm ViT) + ``side`` (one mixer per block).

    ``forward(x)`` = ``forward_head(forward_features(x))``, as timm's models; attributes the
    wrapper does not have are read from the backbone. ``side`` may hold the reference mixers
    of :mod:`kron_kernels.reference.losa` (``impl="reference"``): the same names and shapes.
    """

    def __init__(self, backbone: nn.Module, side: nn.ModuleList) -> None:
        super().__init__()
        if len(side) != len(backbone.blocks):
            raise ValueError(f"side needs one mixer per block ({len(backbone.blocks)}), got {len(side)}")
        self.backbone = backbone
        self.side = side
        self._collected: Optional[List[torch.Tensor]] = None
        for blk in backbone.blocks:
            blk.register_forward_hook(self._collect)

    def _collect(self, module, inputs, output) -> None:
        if self._collected is not None:
            self._collected.append(output)

    def block_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``z_1 .. z_L`` from the frozen backbone, computed without autograd."""
        self._collected = []
        try:
            with torch.no_grad():
                self.backbone.forward_features(x)
            outputs = self._collected
        finally:
            self._collected = None
        if len(outputs) != len(self.side):
            raise RuntimeError(f"expected {len(self.side)} block outputs from the hooks, got {len(outputs)}")
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        zs = self.block_outputs(x)
        h = zs[-1]
        for mixer, z in zip(self.side, zs):
            h = mixer(h, z)
        return self.backbone.norm(h)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("backbone", "side", "_modules"):
                raise
            return getattr(self._modules["backbone"], name)
