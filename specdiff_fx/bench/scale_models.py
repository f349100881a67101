"""The models ``specdiff-fx scale`` times: random-weight diffusers transformers with the published
architecture shapes (SD3-medium, FLUX.1-dev, PixArt-Sigma), reducible in depth and width for CPUs,
and the K/V cache size a token-level policy needs for them by formula.

Weights do not matter for speed, so none are downloaded; what matters is that each family keeps
its block structure and head size at any reduced size (bench/scale.py's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# published shapes: (layers, heads, head_dim, text tokens as the pipeline pads them)
FAMILIES = {
    "sd3-medium": dict(layers=24, heads=24, head_dim=64, text_tokens=333),
    "flux-dev": dict(layers=19, heads=24, head_dim=128, text_tokens=512),
    "pixart-sigma": dict(layers=28, heads=16, head_dim=72, text_tokens=300),
}


@dataclass
class ScaleModel:
    family: str
    model: torch.nn.Module
    inputs: dict
    image_tokens: int
    text_tokens: int
    layers: int
    width: int
    heads: int
    head_dim: int
    params: int = 0

    def describe(self) -> dict:
        return {"family": self.family, "image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
                "layers": self.layers, "width": self.width, "heads": self.heads, "head_dim": self.head_dim,
                "params_m": round(self.params / 1e6, 1)}


def image_tokens_for(resolution: int) -> int:
    """Image tokens at ``resolution``² pixels: VAE factor 8, then 2×2 patches (or FLUX packing)."""
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
    return (resolution // 16) ** 2


def build_model(family: str, resolution: int, *, batch: int = 2, layers: int | None = None,
                width: int | None = None, head_dim: int | None = None, text_tokens: int | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0) -> ScaleModel:
    """A random-weight diffusers transformer of ``family`` and its inputs for one CFG batch."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    head_dim = head_dim or spec["head_dim"]
    heads = spec["heads"] if width is None else width // head_dim
    if width is not None and width % head_dim:
        raise ValueError(f"--width {width} must be a multiple of the head size {head_dim} (see --head-dim)")
    layers = layers or spec["layers"]
    text = text_tokens or spec["text_tokens"]
    width = heads * head_dim
    latent = resolution // 8
    tokens = image_tokens_for(resolution)
    device = torch.device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    timestep = torch.full((batch,), 500.0, device=device)
    if family == "sd3-medium":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=width,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=max(192, latent // 2))
        inputs = dict(hidden_states=randn(batch, 16, latent, latent),
                      encoder_hidden_states=randn(batch, text, 4096),
                      pooled_projections=randn(batch, 2048), timestep=timestep, return_dict=False)
    elif family == "flux-dev":
        from diffusers import FluxTransformer2DModel

        rope = (16, 56, 56) if head_dim == 128 else _rope_axes(head_dim)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers if layers != 19 else 38,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=rope)
        side = latent // 2
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).reshape(-1, 3).float()
        inputs = dict(hidden_states=randn(batch, tokens, 64), encoder_hidden_states=randn(batch, text, 4096),
                      pooled_projections=randn(batch, 768), timestep=timestep / 1000.0,
                      img_ids=img_ids.to(device), txt_ids=torch.zeros(text, 3, device=device),
                      guidance=torch.full((batch,), 3.5, device=device), return_dict=False)
    else:
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
            num_layers=layers, cross_attention_dim=width, caption_channels=4096, sample_size=latent,
            patch_size=2, use_additional_conditions=False, norm_num_groups=1)
        inputs = dict(hidden_states=randn(batch, 4, latent, latent), encoder_hidden_states=randn(batch, text, 4096),
                      timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                      return_dict=False)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    return ScaleModel(family, model, inputs, tokens, text, layers, width, heads, head_dim, params)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX RoPE axes for a reduced head size: the real split is 16/56/56 of 128 (even sizes)."""
    a = max(2, (head_dim // 8) // 2 * 2)
    b = (head_dim - a) // 2 // 2 * 2
    return (a, b, head_dim - a - b)


def kv_cache_formula_bytes(case: ScaleModel, batch: int, element_size: int) -> int:
    """K/V cache bytes by formula: 2 (K and V) × attention sites × batch × tokens × width.

    SD3 and FLUX double blocks attend over image + text tokens; FLUX single blocks too;
    PixArt's self-attention over image tokens only (its cross-attention keys are text and
    not cached per token).
    """
    if case.family == "flux-dev":
        sites, tokens = case.layers + (2 * case.layers if case.layers != 19 else 38), case.image_tokens + case.text_tokens
    elif case.family == "sd3-medium":
        sites, tokens = case.layers, case.image_tokens + case.text_tokens
    else:
        sites, tokens = case.layers, case.image_tokens
    return 2 * sites * batch * tokens * case.width * element_size
