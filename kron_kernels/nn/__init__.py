"""Drop-in nn.Modules, one file per method; they call the functional ops of :mod:`kron_kernels.ops`."""
from .arc import ARCAdapter
from .compacter import AdapterWrapper, CompacterAdapter, PHMBank, PHMLinear
from .fastfood import FastfoodSubspace
from .fact import FacTCoreBank, FacTLinear
from .kadaptation import KAdaptationBank, KAdaptationLinear
from .losa import LoSAMixer, LoSAModel

__all__ = [
    "KAdaptationLinear",
    "KAdaptationBank",
    "PHMLinear",
    "PHMBank",
    "CompacterAdapter",
    "AdapterWrapper",
    "FastfoodSubspace",
    "FacTLinear",
    "FacTCoreBank",
    "ARCAdapter",
    "LoSAMixer",
    "LoSAModel",
]
