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


def tiny_pixart(layers: int = 2, seed: int = 0, text_mask: bool = False) -> TinyCase:
    """PixArt-alpha/sigma; ``text_mask=True`` passes the padding mask its pipeline passes."""
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
            **({"encoder_attention_mask": _text_mask(batch, 5)} if text_mask else {}),
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
        # two single-stream blocks: the image tokens stay joint with the text after the first one
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
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


# ---------------------------------------------------------------------------------------------
# Every other diffusers 0.42.1 transformer that serves a text-to-image or text-to-video
# pipeline.  Sizes are tiny (16-32 image tokens, width 16) so a CPU runs each in seconds;
# inputs follow what the family's pipeline passes, text padding masks included: the last
# text token of batch row 1 is padding, so masked and unmasked rows differ.


def _text_mask(batch: int, length: int, dtype=torch.long) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=dtype)
    if batch > 1:
        mask[1, -1] = 0
    return mask


def tiny_hunyuan_dit(seed: int = 0) -> TinyCase:
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    torch.manual_seed(seed)
    model = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=16, num_layers=2, cross_attention_dim=12, cross_attention_dim_t5=16,
        pooled_projection_dim=16, text_len=5, text_len_t5=6,
    ).eval()
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), use_real=True)

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            text_embedding_mask=_text_mask(batch, 5),
            encoder_hidden_states_t5=torch.randn(batch, 6, 16, generator=g),
            text_embedding_mask_t5=_text_mask(batch, 6),
            image_meta_size=torch.tensor([[8, 8, 8, 8, 0, 0]] * batch, dtype=torch.float32),
            style=torch.zeros(batch, dtype=torch.long),
            image_rotary_emb=rope,
        )

    return TinyCase("hunyuan_dit", model, make_inputs)


def tiny_sana(seed: int = 0) -> TinyCase:
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=12, sample_size=8, patch_size=2,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            encoder_attention_mask=_text_mask(batch, 5),
        )

    return TinyCase("sana", model, make_inputs)


def tiny_auraflow(seed: int = 0) -> TinyCase:
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(
        # two single-stream blocks: the image tokens stay joint with the text after the first one
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=16,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep) / 1000.0),
        )

    return TinyCase("auraflow", model, make_inputs)


def tiny_qwen_image(seed: int = 0) -> TinyCase:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 16, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            encoder_hidden_states_mask=_text_mask(batch, 5),
            timestep=torch.full((batch,), float(timestep) / 1000.0),
            img_shapes=[[(1, 4, 4)]] * batch,
        )

    return TinyCase("qwen_image", model, make_inputs)


def _grid_ids(side: int, dims: int, batch: int | None = None) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cols = [torch.zeros_like(ys)] * (dims - 2)
    ids = torch.stack([cols[0], ys, xs, *cols[1:]] if dims > 3 else [*cols, ys, xs], dim=-1)
    ids = ids.reshape(-1, dims)
    return ids if batch is None else ids.expand(batch, -1, -1).contiguous()


def tiny_flux2(seed: int = 0) -> TinyCase:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        # two single-stream blocks: the image tokens stay joint with the text after the first one
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        txt = torch.zeros(batch, 5, 4, dtype=torch.long)
        txt[..., 3] = torch.arange(5)
        return dict(
            hidden_states=torch.randn(batch, 16, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep) / 1000.0),
            img_ids=_grid_ids(4, 4, batch),
            txt_ids=txt,
        )

    return TinyCase("flux2", model, make_inputs)


def tiny_chroma(seed: int = 0) -> TinyCase:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(
        # two single-stream blocks: the image tokens stay joint with the text after the first one
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        # the pipeline extends the text padding mask with ones over the image tokens
        mask = torch.cat([_text_mask(batch, 5, torch.bool), torch.ones(batch, 16, dtype=torch.bool)], dim=1)
        return dict(
            hidden_states=torch.randn(batch, 16, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep) / 1000.0),
            img_ids=_grid_ids(4, 3),
            txt_ids=torch.zeros(5, 3),
            attention_mask=mask,
        )

    return TinyCase("chroma", model, make_inputs)


def tiny_lumina2(seed: int = 0) -> TinyCase:
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4),
        axes_lens=(32, 32, 32), cap_feat_dim=12,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            timestep=torch.full((batch,), 1.0 - float(timestep) / 1000.0),  # Lumina2 counts up
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            encoder_attention_mask=_text_mask(batch, 5, torch.bool),
        )

    return TinyCase("lumina2", model, make_inputs)


def tiny_hidream(seed: int = 0, layers: int = 1) -> TinyCase:
    """``layers`` double-stream and as many single-stream blocks, each fed its own Llama layer."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=layers, num_single_layers=layers,
        attention_head_dim=8, num_attention_heads=2, caption_channels=[12, 12], text_emb_dim=10,
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(8, 8),
        llama_layers=list(range(2 * layers)),
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            timesteps=torch.full((batch,), float(timestep)),
            encoder_hidden_states_t5=torch.randn(batch, 5, 12, generator=g),
            encoder_hidden_states_llama3=torch.randn(2 * layers, batch, 5, 12, generator=g),
            pooled_embeds=torch.randn(batch, 10, generator=g),
        )

    return TinyCase("hidream", model, make_inputs)


def tiny_cogview4(seed: int = 0) -> TinyCase:
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    model = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, text_embed_dim=12, time_embed_dim=16, condition_dim=4,
        pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4),
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        size = torch.tensor([[64.0, 64.0]] * batch)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            original_size=size, target_size=size.clone(), crop_coords=torch.zeros(batch, 2),
        )

    return TinyCase("cogview4", model, make_inputs)


def tiny_wan(seed: int = 0) -> TinyCase:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
        )

    return TinyCase("wan", model, make_inputs)


def tiny_ltx_video(seed: int = 0) -> TinyCase:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=12,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 2 * 4 * 4, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep)),
            encoder_attention_mask=_text_mask(batch, 5),
            num_frames=2, height=4, width=4,
        )

    return TinyCase("ltx_video", model, make_inputs)


def tiny_cogvideox(seed: int = 0) -> TinyCase:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=5,
    ).eval()

    def make_inputs(batch: int = 2, timestep: float = 500.0, seed: int = 0) -> dict:
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 2, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
            timestep=torch.full((batch,), float(timestep)),
        )

    return TinyCase("cogvideox", model, make_inputs)


TINY_FAMILIES: dict[str, Callable[..., TinyCase]] = {
    "dit": tiny_dit,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
    "unet": tiny_unet,
    "hunyuan_dit": tiny_hunyuan_dit,
    "sana": tiny_sana,
    "auraflow": tiny_auraflow,
    "qwen_image": tiny_qwen_image,
    "flux2": tiny_flux2,
    "chroma": tiny_chroma,
    "lumina2": tiny_lumina2,
    "hidream": tiny_hidream,
    "cogview4": tiny_cogview4,
    "wan": tiny_wan,
    "ltx_video": tiny_ltx_video,
    "cogvideox": tiny_cogvideox,
}


def build_tiny(family: str, **kwargs) -> TinyCase:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(TINY_FAMILIES)}")
    return TINY_FAMILIES[family](**kwargs)
