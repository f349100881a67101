"""A real diffusers pipeline (DiTPipeline from tiny random components) with our compiled transformer."""

import torch

from specdiff_fx import get_runtime, make_backend


def _tiny_dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, norm_num_groups=1,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class for CFG is label 1000
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=16,
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                       id2label={i: f"class{i}" for i in range(10)})


def _run(pipe, steps=8):
    out = pipe(class_labels=[1, 3], num_inference_steps=steps, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return torch.from_numpy(out.images)


def test_dit_pipeline_end_to_end_with_specdiff():
    pipe = _tiny_dit_pipeline()
    with torch.no_grad():
        reference = _run(pipe)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(
        transformer, backend=make_backend(policy="fora", warmup_steps=2, interval=2, compiler="eager"),
        fullgraph=True, dynamic=False,
    )
    with torch.no_grad():
        images = _run(pipe)
        again = _run(pipe)  # a second trajectory through the same compiled model
    assert images.shape == reference.shape == (2, 16, 16, 3)
    assert torch.isfinite(images).all()
    assert torch.equal(images, again), "same seed, same trajectory: caches must not leak across runs"
    stats = get_runtime(pipe.transformer).stats()
    assert stats["trajectories"] == 2 and stats["steps"] == 16 and stats["cached_steps"] == 6
    # caching changes the result a little, not wholesale
    assert (images - reference).abs().max() < 0.5
