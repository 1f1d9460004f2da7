"""Drop-in nn.Modules, one file per method; they call the functional ops of :mod:`kron_kernels.ops`."""
from .compacter import AdapterWrapper, CompacterAdapter, PHMLinear
from .kadaptation import KAdaptationLinear

__all__ = ["KAdaptationLinear", "PHMLinear", "CompacterAdapter", "AdapterWrapper"]
