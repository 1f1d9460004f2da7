"""Functional ops: one file per op family (functional API + thin autograd.Function)."""
from .adapter import bottleneck_adapter
from .bottleneck import arc, fact_apply, fact_linear, fact_tk_delta, fact_tt_delta, losa_mixer
from .fastfood import fastfood, fastfood_params
from .fwht import fwht
from .kron import kron_delta, kron_deltas, kron_linear, kron_linear_slices, kron_matmul

__all__ = ["kron_delta", "kron_deltas", "kron_matmul", "kron_linear", "kron_linear_slices", "bottleneck_adapter",
           "fact_tt_delta", "fact_tk_delta", "fact_apply", "fact_linear", "arc", "losa_mixer", "fwht",
           "fastfood", "fastfood_params"]
