"""Real diffusers pipelines built from tiny random-init components, for tests and demos.

A denoiser compiled on its own is not what users run: they run a pipeline, whose ``__call__``
picks the timesteps, shifts and scales them, batches or splits classifier-free guidance,
builds masks, position ids and extra conditioning, and feeds the result through a real
scheduler.  Each case here is the real diffusers 0.42.1 pipeline class, called through its
real ``__call__`` with its real scheduler, around a denoiser a few kilobytes big.  Text
encoders and tokenizers are left out (``None``) and the prompt embeddings, their padding
masks and the negative prompt's are passed directly; VAEs are left out too where the
pipeline returns latents without one.  No weights or downloads are needed, every case runs
on a CPU in well under a second, and two builds of a case are identical.

Denoiser configs follow :mod:`specdiff_fx.testing.tiny_models`.  Text embeddings are 5 tokens wide
(6 for HunyuanDiT's T5 stream); where the pipeline hands a text mask to its denoiser, the prompt's
last token is padding and the negative prompt is padded differently, so masked rows really differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from specdiff_fx.testing import tiny_models

__all__ = ["TinyPipeline", "PIPELINES", "build_pipeline", "SLG_EXTRA_CALL_STEPS", "WAN22_EXPERT_STEPS"]


@dataclass
class TinyPipeline:
    name: str                      # key in PIPELINES
    pipe: Any                      # the diffusers pipeline instance
    denoisers: tuple[str, ...]     # component names of the denoiser(s)
    kwargs: Callable[[int], dict]  # seed -> keyword arguments for pipe(**kwargs)
    steps: int                     # scheduler.step() calls one pipe(**kwargs(seed)) makes
    calls_per_step: int            # denoiser forward calls per scheduler step

    def __call__(self, seed: int = 0, **overrides) -> torch.Tensor:
        """Run the pipeline and return its output (latents, or images/frames) as one tensor."""
        with torch.no_grad():
            out = self.pipe(**{**self.kwargs(seed), **overrides})
        for field in ("images", "frames"):
            if hasattr(out, field):
                result = getattr(out, field)
                break
        else:
            result = out[0]
        return result if isinstance(result, torch.Tensor) else torch.as_tensor(result)


# ---------------------------------------------------------------------------------------------
# Shared pieces

_TEXT_LEN = 5


def _fixed(*shape: int, seed: int, rand: bool = False) -> torch.Tensor:
    """A tensor that depends only on ``seed`` (embeddings, input images): fixed across runs."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) if rand else torch.randn(*shape, generator=g)


def _mask(valid: int, length: int = _TEXT_LEN, dtype=torch.long) -> torch.Tensor:
    """A batch-1 text padding mask: ``valid`` real tokens, then padding."""
    mask = torch.zeros(1, length, dtype=dtype)
    mask[:, :valid] = 1
    return mask


def _kwargs_fn(fixed: dict) -> Callable[[int], dict]:
    """seed -> ``fixed`` (tensors cloned, so a pipeline can never alter them) plus a generator."""

    def kwargs(seed: int) -> dict:
        out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in fixed.items()}
        out["generator"] = torch.Generator().manual_seed(seed)
        return out

    return kwargs


def _finish(pipe) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_autoencoder_kl(latent_channels: int, scaling_factor: float, shift_factor: float):
    """A 2x-downsampling AutoencoderKL (16x16 images <-> 8x8 latents), SD3/Flux style (no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=4,
        sample_size=16, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 3


def _sd3_embeds() -> dict:
    return dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=101),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=102),
        pooled_prompt_embeds=_fixed(1, 10, seed=103),
        negative_pooled_prompt_embeds=_fixed(1, 10, seed=104),
    )


def _sd3_pipeline(scheduler, vae=None, img2img: bool = False):
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    transformer = tiny_models.tiny_sd3(seed=0).model  # seeds torch with 0 itself
    return _finish(cls(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    ))


def _sd3() -> TinyPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _sd3_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))
    # vae=None: latents are height/8 = 8x8, the transformer's sample_size
    fixed = dict(**_sd3_embeds(), height=64, width=64, num_inference_steps=5, guidance_scale=5.0,
                 output_type="latent")
    return TinyPipeline("sd3", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


def _sd3_img2img() -> TinyPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = _tiny_autoencoder_kl(4, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = _sd3_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, img2img=True)
    # 8 steps at strength 0.6: t_start = int(8 - 4.8) = 3, so 5 steps run
    fixed = dict(**_sd3_embeds(), image=_fixed(1, 3, 16, 16, seed=105, rand=True), strength=0.6,
                 height=16, width=16, num_inference_steps=8, guidance_scale=5.0, output_type="latent")
    return TinyPipeline("sd3_img2img", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


def _sd3_heun() -> TinyPipeline:
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = _sd3_pipeline(FlowMatchHeunDiscreteScheduler(shift=3.0))
    # Heun is second order: 4 inference steps give timesteps t0, t1, t1, t2, t2, t3, t3 (2*4 - 1),
    # one model call and one scheduler.step per timestep.
    fixed = dict(**_sd3_embeds(), height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
                 output_type="latent")
    return TinyPipeline("sd3_heun", pipe, ("transformer",), _kwargs_fn(fixed), steps=7, calls_per_step=1)


# Skip-layer guidance runs one extra batch-1 (conditional only) call with ``skip_layers`` on the
# steps i where num_inference_steps * start < i < num_inference_steps * stop:
# 5 * 0.01 < i < 5 * 0.6, i.e. steps 1 and 2.
SLG_EXTRA_CALL_STEPS: tuple[int, ...] = (1, 2)


def _sd3_slg() -> TinyPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _sd3_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))
    fixed = dict(**_sd3_embeds(), height=64, width=64, num_inference_steps=5, guidance_scale=5.0,
                 skip_guidance_layers=[0], skip_layer_guidance_scale=2.8,
                 skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.6, output_type="latent")
    # calls_per_step counts the batched cond+uncond call only; SLG_EXTRA_CALL_STEPS get one more.
    return TinyPipeline("sd3_slg", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


# ---------------------------------------------------------------------------------------------
# FLUX.1


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler config
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def _flux_transformer():
    from diffusers import FluxTransformer2DModel

    # tiny_models.tiny_flux's config, guidance-distilled like FLUX.1-dev (guidance_embeds=True)
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
        axes_dims_rope=(2, 2, 4), guidance_embeds=True,
    ).eval()


def _flux_embeds(negative: bool = False) -> dict:
    out = dict(prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=201), pooled_prompt_embeds=_fixed(1, 10, seed=202))
    if negative:
        out.update(negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=203),
                   negative_pooled_prompt_embeds=_fixed(1, 10, seed=204))
    return out


def _flux_pipeline(vae=None, img2img: bool = False):
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    cls = FluxImg2ImgPipeline if img2img else FluxPipeline
    return _finish(cls(
        scheduler=_flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=_flux_transformer(),
    ))


def _flux() -> TinyPipeline:
    pipe = _flux_pipeline()
    # vae=None: scale factor 8, 64x64 -> 8x8 latents (2 channels) -> 4x4 = 16 packed tokens of 8
    fixed = dict(**_flux_embeds(), height=64, width=64, num_inference_steps=5, guidance_scale=3.5,
                 output_type="latent")
    return TinyPipeline("flux", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


def _flux_true_cfg() -> TinyPipeline:
    pipe = _flux_pipeline()
    fixed = dict(**_flux_embeds(negative=True), true_cfg_scale=4.0, height=64, width=64,
                 num_inference_steps=5, guidance_scale=3.5, output_type="latent")
    # cond call then a separate uncond call on every step
    return TinyPipeline("flux_true_cfg", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=2)


def _flux_img2img() -> TinyPipeline:
    torch.manual_seed(0)
    vae = _tiny_autoencoder_kl(2, scaling_factor=0.3611, shift_factor=0.1159)
    pipe = _flux_pipeline(vae=vae, img2img=True)
    # 16x16 image -> 8x8 latents -> 16 packed tokens.  strength=1.0 runs all 5 steps; a refine
    # call with strength=0.08 runs the last one only (t_start = int(5 - 5 * 0.08) = 4).
    fixed = dict(**_flux_embeds(), image=_fixed(1, 3, 16, 16, seed=205, rand=True), strength=1.0,
                 height=16, width=16, num_inference_steps=5, guidance_scale=3.5, output_type="latent")
    return TinyPipeline("flux_img2img", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


# ---------------------------------------------------------------------------------------------
# PixArt-Sigma, Sana


def _pixart_sigma() -> TinyPipeline:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    transformer = tiny_models.tiny_pixart(seed=0).model  # out_channels=8: learned sigma, chunked off
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
        prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True,
    )
    pipe = _finish(PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                       scheduler=scheduler))
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=301), prompt_attention_mask=_mask(4),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=302), negative_prompt_attention_mask=_mask(2),
        negative_prompt=None,  # its default "" would clash with negative_prompt_embeds
        height=64, width=64, num_inference_steps=5, guidance_scale=4.5, use_resolution_binning=False,
        output_type="latent",
    )
    return TinyPipeline("pixart_sigma", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


def _sana() -> TinyPipeline:
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    transformer = tiny_models.tiny_sana(seed=0).model
    # Sana's flow-matching DPM-Solver++ config
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
        solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True,
    )
    pipe = _finish(SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                scheduler=scheduler))
    # vae=None: scale factor 32, 256x256 -> 8x8 latents
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=401), prompt_attention_mask=_mask(4),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=402), negative_prompt_attention_mask=_mask(2),
        negative_prompt=None,  # its default "" would clash with negative_prompt_embeds
        height=256, width=256, num_inference_steps=5, guidance_scale=4.5, use_resolution_binning=False,
        output_type="latent",
    )
    return TinyPipeline("sana", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


# ---------------------------------------------------------------------------------------------
# Qwen-Image, CogView4


def _qwen_image() -> TinyPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = tiny_models.tiny_qwen_image(seed=0).model
    # Qwen-Image's scheduler config
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = _finish(QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                     transformer=transformer))
    # Masks that are all ones are dropped (set to None) by encode_prompt, so both are padded.
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=501), prompt_embeds_mask=_mask(4),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=502), negative_prompt_embeds_mask=_mask(2),
        true_cfg_scale=4.0, guidance_scale=None, height=64, width=64, num_inference_steps=5,
        output_type="latent",
    )
    return TinyPipeline("qwen_image", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=2)


def _cogview4() -> TinyPipeline:
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

    transformer = tiny_models.tiny_cogview4(seed=0).model
    # CogView4's scheduler config
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
        base_image_seq_len=256, time_shift_type="linear",
    )
    pipe = _finish(CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                    scheduler=scheduler))
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=601), negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=602),
        height=64, width=64, num_inference_steps=5, guidance_scale=5.0, output_type="latent",
    )
    # CFG as CogView4 does it: separate cond and uncond calls
    return TinyPipeline("cogview4", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=2)


# ---------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2


def _wan_scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
    )


def _wan_embeds() -> dict:
    # UMT5 embeddings come zeroed past each prompt's length (Wan passes no text mask)
    prompt, negative = _fixed(1, _TEXT_LEN, 12, seed=701), _fixed(1, _TEXT_LEN, 12, seed=702)
    prompt[:, 4:] = 0
    negative[:, 2:] = 0
    return dict(prompt_embeds=prompt, negative_prompt_embeds=negative)


def _wan21() -> TinyPipeline:
    from diffusers import WanPipeline

    transformer = tiny_models.tiny_wan(seed=0).model
    pipe = _finish(WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_wan_scheduler(3.0),
                               transformer=transformer))
    # vae=None: 4x temporal, 8x spatial: 5 frames of 64x64 -> 2 latent frames of 8x8
    fixed = dict(**_wan_embeds(), height=64, width=64, num_frames=5, num_inference_steps=5, guidance_scale=5.0,
                 output_type="latent")
    # CFG as Wan does it: separate cond and uncond calls
    return TinyPipeline("wan21", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=2)


# Wan 2.2 A14B hands over from the high-noise expert (transformer) to the low-noise one
# (transformer_2) once t < boundary_ratio * 1000.  With flow_shift=12 and 5 steps the timesteps
# are 999, 979, 947, 889, 750: steps 0-3 run transformer, step 4 runs transformer_2.
WAN22_EXPERT_STEPS: dict[str, tuple[int, ...]] = {"transformer": (0, 1, 2, 3), "transformer_2": (4,)}


def _wan22() -> TinyPipeline:
    from diffusers import WanPipeline

    high = tiny_models.tiny_wan(seed=0).model
    low = tiny_models.tiny_wan(seed=1).model
    pipe = _finish(WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_wan_scheduler(12.0),
                               transformer=high, transformer_2=low, boundary_ratio=0.875))
    fixed = dict(**_wan_embeds(), height=64, width=64, num_frames=5, num_inference_steps=5, guidance_scale=4.0,
                 guidance_scale_2=3.0, output_type="latent")
    return TinyPipeline("wan22", pipe, ("transformer", "transformer_2"), _kwargs_fn(fixed), steps=5,
                        calls_per_step=2)


# ---------------------------------------------------------------------------------------------
# AuraFlow, HunyuanDiT, LTX-Video, Chroma, Lumina2, SD 1.5


def _auraflow() -> TinyPipeline:
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    transformer = tiny_models.tiny_auraflow(seed=0).model
    pipe = _finish(AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73)))
    # AuraFlow passes no text mask to its transformer (the mask only zeroes padded embeddings
    # when the pipeline encodes the prompt itself), but check_inputs wants one with the embeds.
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=801), prompt_attention_mask=_mask(_TEXT_LEN),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=802), negative_prompt_attention_mask=_mask(_TEXT_LEN),
        height=64, width=64, num_inference_steps=5, guidance_scale=3.5, output_type="latent",
    )
    return TinyPipeline("auraflow", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


def _hunyuan_dit() -> TinyPipeline:
    from diffusers import DDPMScheduler, HunyuanDiTPipeline

    transformer = tiny_models.tiny_hunyuan_dit(seed=0).model  # text_len=5 (CLIP), text_len_t5=6
    # HunyuanDiT's scheduler config
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.018, beta_schedule="scaled_linear",
        prediction_type="v_prediction", clip_sample=False, steps_offset=1, timestep_spacing="leading",
        variance_type="fixed_small",
    )
    pipe = _finish(HunyuanDiTPipeline(
        vae=None, text_encoder=None, tokenizer=None, transformer=transformer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=None, tokenizer_2=None,
    ))
    fixed = dict(
        prompt_embeds=_fixed(1, 5, 12, seed=901), prompt_attention_mask=_mask(4, 5),
        negative_prompt_embeds=_fixed(1, 5, 12, seed=902), negative_prompt_attention_mask=_mask(2, 5),
        prompt_embeds_2=_fixed(1, 6, 16, seed=903), prompt_attention_mask_2=_mask(5, 6),
        negative_prompt_embeds_2=_fixed(1, 6, 16, seed=904), negative_prompt_attention_mask_2=_mask(2, 6),
        height=64, width=64, num_inference_steps=5, guidance_scale=5.0, use_resolution_binning=False,
        output_type="latent",
    )
    return TinyPipeline("hunyuan_dit", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


def _ltx() -> TinyPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    transformer = tiny_models.tiny_ltx_video(seed=0).model
    # LTX-Video's scheduler config
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
        base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
    )
    pipe = _finish(LTXPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                               transformer=transformer))
    # vae=None: 8x temporal, 32x spatial: 9 frames of 128x128 -> 2 x 4 x 4 = 32 latent tokens
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1001), prompt_attention_mask=_mask(4),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1002), negative_prompt_attention_mask=_mask(2),
        height=128, width=128, num_frames=9, num_inference_steps=5, guidance_scale=3.0, output_type="latent",
    )
    return TinyPipeline("ltx", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=1)


def _chroma_mask(valid: int) -> torch.Tensor:
    # as ChromaPipeline._get_t5_prompt_embeds makes it: the first padding token stays unmasked,
    # and the mask has the embeddings' float dtype
    return _mask(min(valid + 1, _TEXT_LEN), dtype=torch.float32)


def _chroma() -> TinyPipeline:
    from diffusers import ChromaPipeline

    transformer = tiny_models.tiny_chroma(seed=0).model
    pipe = _finish(ChromaPipeline(scheduler=_flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                  transformer=transformer))
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1101), prompt_attention_mask=_chroma_mask(3),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1102), negative_prompt_attention_mask=_chroma_mask(1),
        height=64, width=64, num_inference_steps=5, guidance_scale=4.0, output_type="latent",
    )
    # CFG as Chroma does it: separate cond and uncond calls
    return TinyPipeline("chroma", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=2)


def _lumina2() -> TinyPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    transformer = tiny_models.tiny_lumina2(seed=0).model
    pipe = _finish(Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
                                   vae=None, text_encoder=None, tokenizer=None))
    # the prompt has 4 real tokens, the negative prompt 2: padded differently
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1201), prompt_attention_mask=_mask(4),
        negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1202), negative_prompt_attention_mask=_mask(2),
        height=64, width=64, num_inference_steps=5, guidance_scale=4.0, output_type="latent",
    )
    # CFG as Lumina2 does it: separate cond and uncond calls (cfg_trunc_ratio=1.0 never truncates)
    return TinyPipeline("lumina2", pipe, ("transformer",), _kwargs_fn(fixed), steps=5, calls_per_step=2)


def _sd15() -> TinyPipeline:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    unet = tiny_models.tiny_unet(seed=0).model
    # SD 1.5's scheduler config
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = _finish(StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ))
    fixed = dict(
        prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1301), negative_prompt_embeds=_fixed(1, _TEXT_LEN, 12, seed=1302),
        height=64, width=64, num_inference_steps=5, guidance_scale=7.5, output_type="latent",
    )
    # PLMS without Runge-Kutta warmup repeats the second timestep: 5 steps -> 6 timesteps
    return TinyPipeline("sd15", pipe, ("unet",), _kwargs_fn(fixed), steps=6, calls_per_step=1)


PIPELINES: dict[str, Callable[[], TinyPipeline]] = {
    "sd3": _sd3,
    "sd3_img2img": _sd3_img2img,
    "sd3_heun": _sd3_heun,
    "sd3_slg": _sd3_slg,
    "flux": _flux,
    "flux_true_cfg": _flux_true_cfg,
    "flux_img2img": _flux_img2img,
    "pixart_sigma": _pixart_sigma,
    "sana": _sana,
    "qwen_image": _qwen_image,
    "cogview4": _cogview4,
    "wan21": _wan21,
    "wan22": _wan22,
    "auraflow": _auraflow,
    "hunyuan_dit": _hunyuan_dit,
    "ltx": _ltx,
    "chroma": _chroma,
    "lumina2": _lumina2,
    "sd15": _sd15,
}


def build_pipeline(name: str) -> TinyPipeline:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose from {sorted(PIPELINES)}")
    return PIPELINES[name]()
