"""kron_kernels: fused GPU kernels for parameter-efficient adaptation of vision transformers.

Importing the package never initialises CUDA, imports Triton or loads the compiled
extension; each is probed lazily on the first call that needs it.
"""
from . import backend
from .backend import BackendUnavailableError, get_backend, set_backend, use_backend
from .ops import (
    arc,
    bottleneck_adapter,
    fact_apply,
    fact_linear,
    fastfood,
    fastfood_params,
    fact_tk_delta,
    fact_tt_delta,
    fwht,
    kron_delta,
    kron_deltas,
    kron_linear,
    kron_linear_slices,
    kron_matmul,
    losa_mixer,
)
from . import nn
from .intrinsic import IntrinsicDimensionResult, intrinsic_dimension
from .adapt import METHODS, adapt, adapter_state_dict, load_adapter_state_dict, merge, unmerge
from .adapter_files import AdapterFileInfo, adapter_file_info, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "backend",
    "BackendUnavailableError",
    "get_backend",
    "set_backend",
    "use_backend",
    "kron_delta",
    "kron_deltas",
    "kron_matmul",
    "kron_linear",
    "kron_linear_slices",
    "bottleneck_adapter",
    "fact_tt_delta",
    "fact_apply",
    "fact_linear",
    "fact_tk_delta",
    "arc",
    "losa_mixer",
    "fwht",
    "fastfood",
    "fastfood_params",
    "intrinsic_dimension",
    "IntrinsicDimensionResult",
    "nn",
    "METHODS",
    "adapt",
    "merge",
    "unmerge",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "adapter_file_info",
    "AdapterFileInfo",
]
