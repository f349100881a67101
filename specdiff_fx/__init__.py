"""specdiff-fx: a torch.compile backend for training-free feature caching in diffusion denoisers."""

from .backend import SpecDiffBackend, UnsupportedGraph, get_runtime, make_backend, specdiff_backend
from .calibrate import fit_forecaster, refine_forecaster
from .config import SpecDiffConfig
from .pipeline import compile_pipeline, restore_pipeline
from .regional import RegionalCompile, compile_regional
from .tune import load_config, tune_pipeline

__all__ = [
    "RegionalCompile", "SpecDiffBackend", "SpecDiffConfig", "UnsupportedGraph", "compile_pipeline", "compile_regional",
    "fit_forecaster", "get_runtime", "load_config", "make_backend", "refine_forecaster", "restore_pipeline",
    "specdiff_backend", "tune_pipeline",
]
__version__ = "0.1.0"
