"""Small CNN classifier for the procedural reference data, plus a Frechet distance on its features.

`features(images)` returns the 128-d global-average-pooled activations of the last conv block
(the layer before the linear head); `frechet_distance` compares two feature sets like FID does.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .data import NUM_CLASSES

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
WEIGHTS_FILE = "classifier.safetensors"
FEATURE_DIM = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShapeClassifier(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            _block(3, 32),
            nn.MaxPool2d(2),  # 16
            _block(32, 64),
            nn.MaxPool2d(2),  # 8
            _block(64, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(device: str | torch.device = "cpu") -> ShapeClassifier:
    """Load the committed classifier weights (eval mode, no network)."""
    from safetensors.torch import load_file

    model = ShapeClassifier()
    model.load_state_dict(load_file(os.path.join(WEIGHTS_DIR, WEIGHTS_FILE)), strict=True)
    return model.to(device).eval()


def _default() -> ShapeClassifier:
    """The committed classifier, loaded per call (1.2 MB, milliseconds): no module-level state."""
    return load_classifier()


@torch.no_grad()
def _batched(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def classify(images: torch.Tensor, model: ShapeClassifier | None = None, batch_size: int = 256) -> torch.Tensor:
    """images (B, 3, 32, 32) in [-1, 1] -> predicted labels (B,). Inputs are clamped to [-1, 1]."""
    m = model or _default()
    dev = next(m.parameters()).device
    x = images.detach().float().clamp(-1, 1).to(dev)
    return _batched(lambda b: m(b).argmax(1), x, batch_size).cpu()


@torch.no_grad()
def features(images: torch.Tensor, model: ShapeClassifier | None = None, batch_size: int = 256) -> torch.Tensor:
    """images (B, 3, 32, 32) in [-1, 1] -> (B, 128) float64 features for frechet_distance."""
    m = model or _default()
    dev = next(m.parameters()).device
    x = images.detach().float().clamp(-1, 1).to(dev)
    return _batched(m.features, x, batch_size).cpu().double()


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D):
        |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^{1/2}).
    tr((C_a C_b)^{1/2}) is computed without scipy as sum(sqrt(eig(S C_b S))) with S = C_a^{1/2}
    (S C_b S is symmetric PSD and has the same eigenvalues as C_a C_b); float64 throughout.
    """
    a = torch.as_tensor(feats_a, dtype=torch.float64)
    b = torch.as_tensor(feats_b, dtype=torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = torch.cov(a.T)
    cb = torch.cov(b.T)
    s = _sqrtm_psd(ca)
    m = s @ cb @ s
    m = (m + m.T) / 2
    tr_sqrt = torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()
    d = (mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt
    return float(d.clamp_min(0))
