"""Tiny random-init diffusers models, shipped because the package runs them itself.

``specdiff-fx inspect --family NAME`` and the examples compile a model without downloading
weights, so the tiny configs of each supported family live here, inside the package.  Nothing
in the library (passes, runtime, policies, backend, pipeline) imports this package; the real
pipelines built around these models are test fixtures and live in ``tests/tiny_pipelines.py``.
"""

from .tiny_models import TINY_FAMILIES, TinyCase, build_tiny

__all__ = ["TINY_FAMILIES", "TinyCase", "build_tiny"]
