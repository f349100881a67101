"""Procedural class-conditional image data for the reference model.

32x32 RGB images in [-1, 1], generated in torch from a seed (fully deterministic,
CPU, no files). Each class is a bold shape with its own hue, drawn near the image
centre (small jitter in position, size and colour) on a random two-colour linear
gradient background. Shapes are anti-aliased (soft signed-distance edges).

Classes (index: name): 0 circle, 1 square, 2 triangle, 3 diamond, 4 ring, 5 plus (thick arms).
The class is carried by the SHAPE only: the foreground colour is a random bright, saturated
hue for every image (independent of the class), so a classifier cannot score by colour and
classifier accuracy on model samples measures whether the shape came out right.

Design notes (measured on the first training runs of the reference model): shapes near
the centre learn much faster than shapes anywhere; thin parts learn slowly, so the plus has thick arms and the
ring is wide.
"""
from __future__ import annotations

import math

import torch

IMAGE_SIZE = 32
CLASS_NAMES = ("circle", "square", "triangle", "diamond", "ring", "plus")
NUM_CLASSES = len(CLASS_NAMES)


def _sdf(cls: int, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of class `cls` shape of radius r at origin."""
    if cls == 0:  # circle
        return torch.sqrt(px**2 + py**2) - r
    if cls == 1:  # axis-aligned square, half side ~0.85 r
        h = 0.85 * r
        return torch.maximum(px.abs(), py.abs()) - h
    if cls == 2:  # upward triangle (equilateral), centred
        k = math.sqrt(3.0)
        s = 1.15 * r
        y = py - 0.25 * s  # move centroid to origin (image y grows downwards)
        # three half-planes: bottom edge, two slanted edges
        d_bottom = y - 0.5 * s
        d_left = (-k * px - y - s) / 2.0
        d_right = (k * px - y - s) / 2.0
        return torch.maximum(d_bottom, torch.maximum(d_left, d_right))
    if cls == 3:  # diamond
        return (px.abs() + py.abs()) / math.sqrt(2.0) - 0.8 * r
    if cls == 4:  # ring, thickness ~0.45 r
        return (torch.sqrt(px**2 + py**2) - 0.78 * r).abs() - 0.24 * r
    if cls == 5:  # plus with thick arms
        w = 0.33 * r
        L = 1.05 * r
        bar_h = torch.maximum(px.abs() - L, py.abs() - w)
        bar_v = torch.maximum(px.abs() - w, py.abs() - L)
        return torch.minimum(bar_h, bar_v)
    raise ValueError(f"unknown class {cls}")


def make_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Render images for the given integer class labels. Returns (B, 3, 32, 32) in [-1, 1]."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    b = labels.shape[0]
    g = generator
    n = IMAGE_SIZE
    coords = torch.arange(n, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (n, n)

    # Background: linear gradient between two muted colours in a random direction.
    c0 = 0.05 + 0.5 * torch.rand(b, 3, generator=g)
    c1 = 0.05 + 0.5 * torch.rand(b, 3, generator=g)
    ang = 2 * math.pi * torch.rand(b, generator=g)
    dirx, diry = torch.cos(ang), torch.sin(ang)
    proj = ((xx - n / 2)[None] * dirx[:, None, None] + (yy - n / 2)[None] * diry[:, None, None]) / n + 0.5
    proj = proj.clamp(0, 1)[:, None]  # (b, 1, n, n)
    bg = c0[:, :, None, None] * (1 - proj) + c1[:, :, None, None] * proj

    # Shape geometry: centre jitter +-3 px, radius 8..11 px.
    cx = n / 2 + (torch.rand(b, generator=g) * 6 - 3)
    cy = n / 2 + (torch.rand(b, generator=g) * 6 - 3)
    r = 8.0 + 3.0 * torch.rand(b, generator=g)
    # Foreground: random hue, saturation 0.75..1, value 0.9..1 (HSV -> RGB), independent of class.
    hue = torch.rand(b, generator=g)
    sat = 0.75 + 0.25 * torch.rand(b, generator=g)
    val = 0.9 + 0.1 * torch.rand(b, generator=g)
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + 6 * hue[:, None]) % 6
    fg = val[:, None] * (1 - sat[:, None] * (torch.minimum(k, 4 - k)).clamp(0, 1))  # (b, 3)

    px = xx[None] - cx[:, None, None]
    py = yy[None] - cy[:, None, None]
    d = torch.empty(b, n, n)
    for c in range(NUM_CLASSES):
        m = labels == c
        if m.any():
            d[m] = _sdf(c, px[m], py[m], r[m][:, None, None])
    alpha = torch.sigmoid(-d / 0.5)[:, None]  # soft edge ~1 px
    fg = fg[:, :, None, None]
    img = bg * (1 - alpha) + fg * alpha
    return img * 2 - 1


def make_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random labels + images. Deterministic given the generator state."""
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return make_images(labels, generator), labels


def make_dataset(n: int, seed: int = 0, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """n images from a fixed seed. With balanced=True, labels cycle 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    if balanced:
        labels = torch.arange(n) % NUM_CLASSES
    else:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return make_images(labels, g), labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (B, 3, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 3, pad: int = 2) -> None:
    """Save (B, 3, H, W) images in [-1, 1] as a PNG grid (rows of nrow), upscaled nearest."""
    from PIL import Image

    x = to_uint8(images)
    b, c, h, w = x.shape
    ncol = nrow
    nrows = math.ceil(b / ncol)
    H = nrows * (h * scale + pad) + pad
    W = ncol * (w * scale + pad) + pad
    canvas = torch.full((3, H, W), 255, dtype=torch.uint8)
    for i in range(b):
        rr, cc = divmod(i, ncol)
        tile = x[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        y0 = pad + rr * (h * scale + pad)
        x0 = pad + cc * (w * scale + pad)
        canvas[:, y0 : y0 + h * scale, x0 : x0 + w * scale] = tile
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)
