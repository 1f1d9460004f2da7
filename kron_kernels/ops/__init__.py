"""Functional ops: one file per op family (functional API + thin autograd.Function)."""
from .adapter import bottleneck_adapter
from .kron import kron_delta, kron_linear, kron_linear_slices, kron_matmul

__all__ = ["kron_delta", "kron_matmul", "kron_linear", "kron_linear_slices", "bottleneck_adapter"]
