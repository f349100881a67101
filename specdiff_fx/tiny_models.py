"""Tiny random-init models of each supported diffusers family, for tests, demos and inspection.

Each family gives a model and a function that makes its inputs for a batch and a
timestep, so the same code can run trajectories on any family.  Timesteps are passed
on the 0..1000 scale; FLUX takes them divided by 1000, as its pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TinyCase:
    family: str
    model: torch.nn.Module
    make_inputs: Callable[..., dict]     # (batch, timestep, seed) -> forward kwargs

    def output(self, result) -> torch.Tensor:
        """The denoiser's prediction from whatever the model returned."""
        if isinstance(result, (tuple, list)):
            return result[0]
        return getattr(result, "sample", result)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_dit(layers: int = 2, heads: int = 2, head_dim: int = 8, patch: int = 2, sample: int = 8,
             seed: int = 0) -> TinyCase:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=sample, patch_size=patch, norm_num_groups=1,
        num_embeds_ada_norm=10,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, sample, sample, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            class_labels=torch.randint(0, 10, (batch,), generator=g),
        )

    return TinyCase("dit", model, make_inputs)


def tiny_pixart(layers: int = 2, seed: int = 0) -> TinyCase:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=16,
        caption_channels=12, norm_num_groups=1, use_additional_conditions=False,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )

    return TinyCase("pixart", model, make_inputs)


def tiny_sd3(layers: int = 2, heads: int = 2, head_dim: int = 8, patch: int = 2, sample: int = 8,
             seed: int = 0) -> TinyCase:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    width = heads * head_dim
    model = SD3Transformer2DModel(
        sample_size=sample, patch_size=patch, in_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=12,
        caption_projection_dim=width, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=max(sample // patch, 4),
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, sample, sample, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            pooled_projections=torch.randn(batch, 10, generator=g),
            timestep=torch.full((batch,), float(timestep)),
        )

    return TinyCase("sd3", model, make_inputs)


def tiny_flux(seed: int = 0) -> TinyCase:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    side = 4
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).reshape(-1, 3).float()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, side * side, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            pooled_projections=torch.randn(batch, 10, generator=g),
            timestep=torch.full((batch,), float(timestep) / 1000.0),
            img_ids=img_ids,
            txt_ids=torch.zeros(5, 3),
        )

    return TinyCase("flux", model, make_inputs)


def tiny_unet(seed: int = 0) -> TinyCase:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=4, norm_num_groups=4,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            sample=torch.randn(batch, 4, 8, 8, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
        )

    return TinyCase("unet", model, make_inputs)


TINY_FAMILIES: dict[str, Callable[..., TinyCase]] = {
    "dit": tiny_dit,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
    "unet": tiny_unet,
}


def build_tiny(family: str, **kwargs) -> TinyCase:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(TINY_FAMILIES)}")
    return TINY_FAMILIES[family](**kwargs)
