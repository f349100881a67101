"""Class-conditional MMDiT reference model (diffusers SD3Transformer2DModel in pixel space).

Conventions (rectified flow):
    x_t = (1 - t) * x0 + t * noise,  t in [0, 1]
    the transformer gets timestep = 1000 * t and predicts velocity v = noise - x0.
Sampling integrates dx/dt = v with Euler steps from t = 1 (noise) to t = 0 (data).

Conditioning: a learned embedding table with num_classes + 1 rows (the last row is the
null / unconditional class used for classifier-free guidance) produces both the
`encoder_hidden_states` (num_text_tokens tokens of joint_attention_dim) and the
`pooled_projections` (pooled_projection_dim).
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
from torch import nn

from diffusers import SD3Transformer2DModel

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
CONFIG_FILE = "reference_mmdit.json"
WEIGHTS_FILE = "reference_mmdit.safetensors"

# Default architecture (the committed weights use whatever the JSON config says).
DEFAULT_TRANSFORMER_CONFIG = dict(
    sample_size=32,
    patch_size=2,  # 16 x 16 = 256 image tokens
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,  # width 128
    joint_attention_dim=64,
    caption_projection_dim=128,
    pooled_projection_dim=64,
    pos_embed_max_size=16,
)


class ClassConditionalMMDiT(nn.Module):
    """SD3 MMDiT + class-embedding conditioning. forward(x, timestep, class_labels) -> velocity."""

    def __init__(self, transformer_config: dict | None = None, num_classes: int = 6, num_text_tokens: int = 4):
        super().__init__()
        cfg = dict(DEFAULT_TRANSFORMER_CONFIG)
        if transformer_config:
            cfg.update(transformer_config)
        self.transformer = SD3Transformer2DModel(**cfg)
        self.num_classes = num_classes
        self.num_text_tokens = num_text_tokens
        self.null_class = num_classes
        jd = cfg["joint_attention_dim"]
        pd = cfg["pooled_projection_dim"]
        self.class_tokens = nn.Embedding(num_classes + 1, num_text_tokens * jd)
        self.class_pooled = nn.Embedding(num_classes + 1, pd)
        nn.init.normal_(self.class_tokens.weight, std=1.0)
        nn.init.normal_(self.class_pooled.weight, std=1.0)

    @property
    def transformer_config(self) -> dict:
        return {k: self.transformer.config[k] for k in DEFAULT_TRANSFORMER_CONFIG}

    def wrapper_config(self) -> dict:
        return dict(
            transformer=self.transformer_config,
            num_classes=self.num_classes,
            num_text_tokens=self.num_text_tokens,
        )

    def class_condition(self, class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,) long, value num_classes = null -> (encoder_hidden_states (B,T,J), pooled (B,P))."""
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.class_tokens.weight.device)
        ehs = self.class_tokens(labels).view(labels.shape[0], self.num_text_tokens, -1)
        pooled = self.class_pooled(labels)
        return ehs, pooled

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        ehs, pooled = self.class_condition(class_labels)
        timestep = torch.as_tensor(timestep, dtype=x.dtype, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=ehs.to(x.dtype),
            pooled_projections=pooled.to(x.dtype),
            timestep=timestep,
            return_dict=False,
        )[0]


def drop_labels(labels: torch.Tensor, num_classes: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class (= num_classes) with probability p (for CFG training)."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, num_classes), labels)


def save_reference_model(model: ClassConditionalMMDiT, directory: str = WEIGHTS_DIR) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(model.wrapper_config(), f, indent=2, sort_keys=True)
        f.write("\n")
    sd = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(directory, WEIGHTS_FILE))


def load_reference_model(device: str | torch.device = "cpu", directory: str = WEIGHTS_DIR) -> ClassConditionalMMDiT:
    """Build the model from the committed JSON config and load the committed safetensors (no network)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = json.load(f)
    model = ClassConditionalMMDiT(cfg["transformer"], cfg["num_classes"], cfg["num_text_tokens"])
    sd = load_file(os.path.join(directory, WEIGHTS_FILE))
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


def timestep_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """t values from 1 to 0 (num_steps + 1 entries). shift=1 is uniform; shift>1 spends more
    steps at high noise (SD3-style: t' = shift*t / (1 + (shift-1)*t))."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.float()


@torch.no_grad()
def sample(
    model: ClassConditionalMMDiT | Callable,
    class_labels,
    num_steps: int = 28,
    guidance_scale: float = 3.0,
    seed: int = 0,
    shift: float = 1.0,
    transformer: Callable | None = None,
    batch_cfg: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    noise: torch.Tensor | None = None,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    callback: Callable | None = None,
) -> torch.Tensor:
    """Euler flow-matching sampler with classifier-free guidance. Returns images (B, 3, 32, 32) ~[-1, 1].

    model: a ClassConditionalMMDiT (conditioning via model.class_condition, denoiser =
        `transformer` if given - e.g. a torch.compile'd model.transformer - else model.transformer);
        or any callable f(x, timestep, class_labels) -> velocity (then `transformer` is ignored).
    The denoiser sees exactly one call per step: with batch_cfg=True (default) and
        guidance_scale != 1, cond and uncond are batched as [cond; uncond] (batch 2B);
        with guidance_scale == 1 it is called on the conditional batch only;
        batch_cfg=False does two calls per step (cond, then uncond).
    Noise comes from torch.Generator().manual_seed(seed) on CPU (deterministic), unless `noise` is given.
    Schedule: timestep_schedule(num_steps, shift); shift=1.0 (uniform in t) by default.
    callback(step_index, t, x) is called after each step if given.
    """
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    B = labels.shape[0]
    if isinstance(model, ClassConditionalMMDiT):
        if device is None:
            device = model.class_tokens.weight.device
        den = transformer if transformer is not None else model.transformer
        null = torch.full_like(labels, model.null_class)
        ehs_c, pool_c = model.class_condition(labels)
        ehs_u, pool_u = model.class_condition(null)
        ehs_c, pool_c, ehs_u, pool_u = (t.to(device=device, dtype=dtype) for t in (ehs_c, pool_c, ehs_u, pool_u))
        ehs_cu, pool_cu = torch.cat([ehs_c, ehs_u]), torch.cat([pool_c, pool_u])

        def call(x, ts, which):
            if which == "cu":
                e, p = ehs_cu, pool_cu
            elif which == "c":
                e, p = ehs_c, pool_c
            else:
                e, p = ehs_u, pool_u
            return den(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=ts, return_dict=False)[0]

        null_labels = None
    else:
        if device is None:
            device = "cpu"
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None:
            raise ValueError("a plain callable needs a .num_classes attribute for the null label")
        null_labels = torch.full_like(labels, num_classes).to(device)
        lab_dev = labels.to(device)

        def call(x, ts, which):
            if which == "cu":
                return model(x, ts, torch.cat([lab_dev, null_labels]))
            return model(x, ts, lab_dev if which == "c" else null_labels)

    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((B, *image_shape), generator=g)
    x = noise.to(device=device, dtype=dtype)
    ts = timestep_schedule(num_steps, shift)
    cfg = guidance_scale != 1.0
    for i in range(num_steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        if cfg and batch_cfg:
            tt = torch.full((2 * B,), 1000.0 * t, device=device, dtype=dtype)
            v_c, v_u = call(torch.cat([x, x]), tt, "cu").chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        else:
            tt = torch.full((B,), 1000.0 * t, device=device, dtype=dtype)
            v = call(x, tt, "c")
            if cfg:
                v_u = call(x, tt, "u")
                v = v_u + guidance_scale * (v - v_u)
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i, t, x)
    return x.float()
