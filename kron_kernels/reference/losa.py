"""Naive LoSA low-rank mixer, plain PyTorch as the LoSA side network computes it (DESIGN.md 4.4).

``f(x) = alpha * GELU(x @ W_down) @ W_up`` with ``x = z + h`` (exact erf GELU, no biases),
and ``h_l = h_{l-1} + f(z_l + h_{l-1})``. Channel mixing acts on the last axis
(``W_down: (C, r)``, ``W_up: (r, C)``); token mixing transposes the token axis to the end,
mixes, and transposes back (``W_down: (T, r)``, ``W_up: (r, T)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def low_rank_mlp(x: torch.Tensor, W_down: torch.Tensor, W_up: torch.Tensor, alpha) -> torch.Tensor:
    return alpha * (F.gelu(x @ W_down) @ W_up)


def losa_mixer(h, z, W_down, W_up, alpha, axis: str = "channel") -> torch.Tensor:
    """``h + alpha * GELU((z + h) W_down) W_up`` along ``axis``: ``"channel"`` (the last axis)
    or ``"token"`` (the second to last, through a transpose)."""
    x = z + h
    if axis == "channel":
        return h + low_rank_mlp(x, W_down, W_up, alpha)
    if axis == "token":
        return h + low_rank_mlp(x.transpose(-1, -2), W_down, W_up, alpha).transpose(-1, -2)
    raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")


class LoSAMixer(torch.nn.Module):
    """Reference twin of ``kron_kernels.nn.LoSAMixer`` (same constructor and parameter names),
    plain PyTorch: transposes for token mixing; video sums a spatial and a temporal mixer over
    the frame-major patch tokens after ``prefix`` prefix tokens (left unchanged)."""

    def __init__(self, kind, features, r, frames=None, prefix=0, device=None, dtype=None) -> None:
        super().__init__()
        self.kind, self.features, self.r, self.frames, self.prefix = kind, features, r, frames, prefix
        sizes = {"": features} if kind != "video" else {"_spatial": features, "_temporal": frames}
        names = []
        for suffix, n in sizes.items():
            setattr(self, f"W_down{suffix}", torch.nn.Parameter(torch.zeros(n, r, device=device, dtype=dtype)))
            setattr(self, f"W_up{suffix}", torch.nn.Parameter(torch.zeros(r, n, device=device, dtype=dtype)))
            names += [f"W_down{suffix}", f"W_up{suffix}"]
        self.alpha = torch.nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.kk_adapter_params = tuple(names) + ("alpha",)

    def forward(self, h, z):
        if self.kind != "video":
            return losa_mixer(h, z, self.W_down, self.W_up, self.alpha, axis=self.kind)
        n, F_ = self.prefix, self.frames
        hp, zp = h[:, n:], z[:, n:]
        B, T, C = hp.shape
        x = (zp + hp).reshape(B, F_, T // F_, C)
        spatial = low_rank_mlp(x.transpose(-1, -2), self.W_down_spatial, self.W_up_spatial, self.alpha)
        temporal = low_rank_mlp(x.permute(0, 2, 3, 1), self.W_down_temporal, self.W_up_temporal, self.alpha)
        update = spatial.transpose(-1, -2) + temporal.permute(0, 3, 1, 2)
        return torch.cat([h[:, :n], hp + update.reshape(B, T, C)], dim=1)
