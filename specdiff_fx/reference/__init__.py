"""Reference model for quality checks: a small class-conditional MMDiT (diffusers
SD3Transformer2DModel, pixel space, 256 image tokens) trained on procedural shapes, plus a
CNN classifier / Frechet distance to score its samples. Weights are committed under weights/.
"""
from .classifier import classify, features, frechet_distance, load_classifier
from .data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, make_batch, make_dataset, make_images, save_grid
from .model import (
    ClassConditionalMMDiT,
    drop_labels,
    load_reference_model,
    sample,
    save_reference_model,
    timestep_schedule,
)

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "ClassConditionalMMDiT",
    "classify",
    "drop_labels",
    "features",
    "frechet_distance",
    "load_classifier",
    "load_reference_model",
    "make_batch",
    "make_dataset",
    "make_images",
    "sample",
    "save_grid",
    "save_reference_model",
    "timestep_schedule",
]
