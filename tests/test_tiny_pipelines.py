"""The tiny real diffusers pipelines: deterministic, seed-dependent, and making the denoiser calls and
scheduler steps each case declares (counted, not assumed)."""

import functools

import pytest
import torch

from tiny_pipelines import PIPELINES, SLG_EXTRA_CALL_STEPS, WAN22_EXPERT_STEPS, build_pipeline

# batch of each denoiser call: 2 where cond and uncond are batched into one call, else 1
# (sd3_slg's extra skip-layer calls are batch 1, checked separately)
BATCH = {
    "sd3": 2, "sd3_img2img": 2, "sd3_heun": 2, "sd3_slg": 2, "flux": 1, "flux_true_cfg": 1, "flux_img2img": 1,
    "pixart_sigma": 2, "sana": 2, "qwen_image": 1, "cogview4": 1, "wan21": 1, "wan22": 1, "auraflow": 2,
    "hunyuan_dit": 2, "ltx": 2, "chroma": 1, "lumina2": 1, "sd15": 2,
}


def _latent_batch(args, kwargs) -> int:
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    return x.shape[0]


def _run_counted(case, seed=0, **overrides):
    """Run ``case`` once, recording (denoiser, scheduler steps so far, batch, kwargs) for every
    denoiser call and counting scheduler.step calls on the scheduler instance."""
    calls, steps = [], [0]
    hooks = []
    for name in case.denoisers:
        def pre(module, args, kwargs, name=name):
            calls.append((name, steps[0], _latent_batch(args, kwargs), kwargs))
        hooks.append(getattr(case.pipe, name).register_forward_pre_hook(pre, with_kwargs=True))
    scheduler = case.pipe.scheduler
    original = scheduler.step

    @functools.wraps(original)  # keep the signature: pipelines inspect it to pass `generator`/`eta`
    def counting_step(*args, **kwargs):
        steps[0] += 1
        return original(*args, **kwargs)

    scheduler.step = counting_step
    try:
        out = case(seed, **overrides)
    finally:
        del scheduler.step
        for hook in hooks:
            hook.remove()
    assert "step" not in vars(scheduler)
    return out, steps[0], calls


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_tiny_pipeline(name):
    case = build_pipeline(name)
    assert case.name == name
    for component in case.denoisers:
        model = getattr(case.pipe, component)
        assert not model.training
        assert all(p.dtype == torch.float32 for p in model.parameters())

    out, steps, calls = _run_counted(case, seed=0)
    assert torch.isfinite(out).all()
    again = case(0)
    assert torch.equal(out, again), "same seed must give bitwise the same output"
    assert not torch.equal(out, case(1)), "another seed must give another output"

    assert steps == case.steps
    extra = len(SLG_EXTRA_CALL_STEPS) if name == "sd3_slg" else 0
    assert len(calls) == case.steps * case.calls_per_step + extra
    # every step makes its calls before stepping the scheduler
    per_step = [sum(1 for c in calls if c[1] == i) for i in range(steps)]
    expected = [case.calls_per_step + (name == "sd3_slg" and i in SLG_EXTRA_CALL_STEPS) for i in range(steps)]
    assert per_step == expected

    if name == "sd3_slg":
        extra_calls = [c for c in calls if "skip_layers" in c[3]]
        assert [c[1] for c in extra_calls] == list(SLG_EXTRA_CALL_STEPS)
        assert all(c[2] == 1 for c in extra_calls)
        calls = [c for c in calls if "skip_layers" not in c[3]]
    assert {c[2] for c in calls} == {BATCH[name]}

    if name == "wan22":
        for component, expert_steps in WAN22_EXPERT_STEPS.items():
            assert sorted({c[1] for c in calls if c[0] == component}) == list(expert_steps)
    else:
        assert {c[0] for c in calls} == set(case.denoisers)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_two_builds_are_identical(name):
    first, second = build_pipeline(name), build_pipeline(name)
    for component in first.denoisers:
        a, b = getattr(first.pipe, component).state_dict(), getattr(second.pipe, component).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(first(3), second(3))


def test_flux_img2img_refine_strength():
    case = build_pipeline("flux_img2img")
    full = case(0)
    refined, steps, calls = _run_counted(case, seed=0, strength=0.08)
    assert steps == 1 and len(calls) == 1
    assert refined.shape == full.shape and torch.isfinite(refined).all()


def test_unknown_pipeline():
    with pytest.raises(ValueError, match="unknown pipeline"):
        build_pipeline("nope")
