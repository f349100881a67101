"""specdiff-fx: a torch.compile backend for training-free feature caching in diffusion denoisers."""

from .backend import SpecDiffBackend, UnsupportedGraph, get_runtime, make_backend, specdiff_backend
from .config import SpecDiffConfig

__all__ = [
    "SpecDiffBackend", "SpecDiffConfig", "UnsupportedGraph", "get_runtime", "make_backend",
    "specdiff_backend",
]
__version__ = "0.1.0"
