"""Real diffusers pipelines (tests/tiny_pipelines.py) with their own ``__call__``, schedulers and
CFG, every pipeline x policy through ``compile_pipeline``, and the raw path (``torch.compile(model,
backend=...)`` inside the pipeline) where its inputs can tell the clock.

What each run must show: ``off`` equals the uncompiled pipeline; the same seed twice gives the same
output and a different call in between changes nothing; one trajectory per call with the steps the
scheduler took; caching happened unless the fallback is a documented one (SPECDIFF_FALLBACKS, the
README's support matrix); cache memory stays the same over repeated calls.
"""

import math
import os
import warnings

import pytest
import torch

from specdiff_fx import compile_pipeline, get_runtime, make_backend, restore_pipeline
from tiny_pipelines import PIPELINES, SLG_EXTRA_CALL_STEPS, WAN22_EXPERT_STEPS, build_pipeline

POLICIES = ("off", "fora", "taylor", "specdiff")
# schedules that cache within the tiny cases' 5-7 steps
SCHEDULES = {
    "off": {},
    "fora": dict(warmup_steps=2, interval=2),
    "taylor": dict(warmup_steps=2, interval=3),
    "specdiff": dict(warmup_steps=2, reset_steps=()),
}
# compile_pipeline's default is a dynamic compile: the policies whose variants it builds two
# ways (fora: once for every size; specdiff: per size, in its runtime) run it on every pipeline;
# off and taylor (taylor builds as fora does) take the static compile, so both ways of compiling
# meet every pipeline while the suite traces each pipeline dynamically only twice (a dynamic
# trace costs about three static ones on these models); the tests of the clock below, at one
# shape each, compile static for the same reason
DYNAMIC = {"off": False, "fora": True, "taylor": False, "specdiff": True}
# documented fallbacks (README, support matrix): pipeline -> what the warning names
SPECDIFF_FALLBACKS = {
    "sana": "linear attention",
    "lumina2": "no timestep input found",
    "sd15": "not a (batch, tokens, width)",
}


# why each documented fallback happens (the README's support matrix says it in these words)
FALLBACK_REASONS = {
    "sana": "linear attention (a matmul contracting the token axis)",
    "lumina2": "its blocks run in a frame without the timestep (`.tolist()` on the mask breaks the graph)",
    "sd15": "a UNet's features are conv maps, not a token sequence",
}


def support_matrix() -> str:
    """The README's pipeline x policy table, from what this module checks."""
    rows = ["| pipeline | class, scheduler | off | fora | taylor | specdiff |", "|---|---|---|---|---|---|"]
    for name in sorted(PIPELINES):
        case = build_pipeline(name)
        classes = f"`{type(case.pipe).__name__}`, `{type(case.pipe.scheduler).__name__}`"
        cells = [f"fallback: {FALLBACK_REASONS[name]}" if _expected_fallback(name, p) else "yes"
                 for p in POLICIES]
        rows.append(f"| {name} | {classes} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def test_readme_support_matrix_is_current():
    assert set(FALLBACK_REASONS) == set(SPECDIFF_FALLBACKS)
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    assert support_matrix() in readme, "README's support matrix differs: paste `python tests/test_pipelines.py`"


def _steps_of(case, denoiser):
    """Scheduler steps at which ``denoiser`` runs in one call of ``case``."""
    if case.name == "wan22":
        return len(WAN22_EXPERT_STEPS[denoiser])
    return case.steps


def _expected_fallback(name, policy):
    return SPECDIFF_FALLBACKS.get(name) if policy == "specdiff" else None


def _run_compiled(case, policy, **config):
    """Three calls (seed 0, seed 1, seed 0) through compile_pipeline; warnings collected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_pipeline(case.pipe, policy=policy, **{**SCHEDULES[policy], **config})
        first = case(0)
        stats_one = {d: get_runtime(getattr(case.pipe, d)).stats() for d in case.denoisers}
        other = case(1)
        again = case(0)
    fallbacks = [str(w.message) for w in caught if "without caching" in str(w.message)]
    return first, other, again, stats_one, fallbacks


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_policy(name, policy):
    case = build_pipeline(name)
    plain = case(0)
    first, other, again, stats_one, fallbacks = _run_compiled(case, policy, compiler="eager", dynamic=DYNAMIC[policy])
    assert torch.isfinite(first).all() and torch.isfinite(other).all()
    assert torch.equal(first, again), "the same seed twice (another call in between) must give the same output"
    if policy == "off":
        assert torch.equal(first, plain)
    expected = _expected_fallback(name, policy)
    if expected is None:
        # Lumina2's embedding frame has no blocks, but its block frames cache: no false alarm
        assert not fallbacks, fallbacks
    else:
        assert any(expected in f for f in fallbacks), fallbacks
    for denoiser in case.denoisers:
        view = get_runtime(getattr(case.pipe, denoiser))
        stats = view.stats()
        steps = _steps_of(case, denoiser)
        assert stats["trajectories"] == 3, (denoiser, stats["trajectories"])
        if expected is not None:
            assert stats["fallback"] is not None or any(f["fallback"] for f in stats["frames"])
            continue
        assert stats["steps"] == 3 * steps, (denoiser, stats["steps"])
        assert stats["clock"] in ("pipeline", "leader frame")
        assert stats["cache_bytes"] == stats_one[denoiser]["cache_bytes"], "cache memory grew over calls"
        if policy != "off" and steps >= 4:
            assert stats["cached_steps"] > 0, (denoiser, [e["calls"] for e in stats["plan"]])
        if policy == "off":
            assert stats["cached_steps"] == 0
    restore_pipeline(case.pipe)
    assert torch.equal(case(0), plain), "restore_pipeline leaves the pipeline as it was"


def test_slg_calls_get_a_runtime_of_their_own():
    case = build_pipeline("sd3_slg")
    _run_compiled(case, "fora")
    frames = get_runtime(case.pipe.transformer).stats()["frames"]
    assert len(frames) == 2  # the batched CFG call and the batch-1 skip-layer call
    main = max(frames, key=lambda f: f["calls"])
    slg = min(frames, key=lambda f: f["calls"])
    assert main["primary"] and main["steps"] == 3 * case.steps
    assert slg["steps"] == 3 * len(SLG_EXTRA_CALL_STEPS) and slg["trajectories"] == 3


def test_refine_after_a_full_call_equals_the_refine_alone():
    """FLUX img2img at strength 1.0, then a refine call at strength 0.08 that starts below where the
    first ended: through compile_pipeline it is a trajectory of its own."""
    for policy in ("fora", "taylor", "specdiff"):
        torch._dynamo.reset()
        alone = build_pipeline("flux_img2img")
        compile_pipeline(alone.pipe, policy=policy, compiler="eager", dynamic=False, **SCHEDULES[policy])
        refine_alone = alone(0, strength=0.08)
        torch._dynamo.reset()
        case = build_pipeline("flux_img2img")
        compile_pipeline(case.pipe, policy=policy, compiler="eager", dynamic=False, **SCHEDULES[policy])
        case(0)
        refine = case(0, strength=0.08)
        assert torch.equal(refine, refine_alone), policy
        assert get_runtime(case.pipe.transformer).stats()["trajectories"] == 2


def test_one_step_calls_are_trajectories_with_constant_memory():
    case = build_pipeline("flux")
    compile_pipeline(case.pipe, policy="fora", compiler="eager", dynamic=False)
    outs, sizes = [], []
    for _ in range(4):
        outs.append(case(0, num_inference_steps=1))
        sizes.append(get_runtime(case.pipe.transformer).stats()["cache_bytes"])
    stats = get_runtime(case.pipe.transformer).stats()
    assert (stats["trajectories"], stats["steps"], stats["cache_slots"]) == (4, 4, 1)
    assert len(set(sizes)) == 1
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_wan22_experts_each_have_their_own_runtime_and_warm_up():
    case = build_pipeline("wan22")
    plain = case(0)
    compile_pipeline(case.pipe, policy="fora", compiler="eager", dynamic=False, warmup_steps=1, interval=2)
    case(0)
    first, second = get_runtime(case.pipe.transformer), get_runtime(case.pipe.transformer_2)
    assert first.primary is not second.primary
    assert [e["calls"][0] for e in second.stats()["plan"]] == ["full"]  # it joins late: its own warm-up
    assert first.stats()["steps"] == len(WAN22_EXPERT_STEPS["transformer"])
    restore_pipeline(case.pipe)
    assert torch.equal(case(0), plain)


def test_a_scheduler_swapped_in_after_compile_drives_the_clock():
    from diffusers import FlowMatchHeunDiscreteScheduler

    case = build_pipeline("sd3")
    compile_pipeline(case.pipe, policy="fora", compiler="eager", dynamic=False, **SCHEDULES["fora"])
    case(0)
    old = case.pipe.scheduler
    case.pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(old.config)
    case(0)
    case(0)
    stats = get_runtime(case.pipe.transformer).stats()
    heun_steps = 2 * 5 - 1  # 5 steps: every evaluation after the first is a scheduler step of its own
    assert (stats["trajectories"], stats["steps"]) == (3, 5 + 2 * heun_steps)
    assert "step" not in vars(old) and "step" in vars(case.pipe.scheduler)
    restore_pipeline(case.pipe)
    assert "step" not in vars(case.pipe.scheduler)


def test_compile_pipeline_errors_are_clear():
    case = build_pipeline("sd3")
    compile_pipeline(case.pipe, policy="off", compiler="eager")
    with pytest.raises(ValueError, match="already"):
        compile_pipeline(case.pipe)
    restore_pipeline(case.pipe)
    with pytest.raises(ValueError, match="not compiled"):
        restore_pipeline(case.pipe)
    with pytest.raises(ValueError, match="no denoiser"):
        compile_pipeline(case.pipe, denoisers=["does_not_exist"])
    with pytest.raises(TypeError, match="unknown SpecDiffConfig"):
        compile_pipeline(case.pipe, policy="fora", not_a_field=1)
    assert getattr(case.pipe, "_specdiff", None) is None and "step" not in vars(case.pipe.scheduler)


def test_draft_advances_with_the_pipelines_scheduler():
    """specdiff's draft on a DDPM pipeline (HunyuanDiT) steps a copy of the pipeline's scheduler with
    a generator of its own: deterministic, and the user's global random state untouched."""
    case = build_pipeline("hunyuan_dit")
    compile_pipeline(case.pipe, policy="specdiff", compiler="eager", dynamic=False, **SCHEDULES["specdiff"])
    torch.manual_seed(123)
    out = case(0)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(case(0), out)
    assert torch.equal(torch.rand(1), after)
    assert get_runtime(case.pipe.transformer).stats()["draft_steps"] == 2  # one draft call per trajectory


# ----------------------------------------------------------------------------- the raw path
def _raw(case, backend, names=None):
    for name in names or case.denoisers:
        setattr(case.pipe, name, torch.compile(getattr(case.pipe, name), backend=backend, dynamic=False))


@pytest.mark.parametrize("name, steps", [("sd3_heun", 7), ("sd15", 6)])
def test_raw_path_counts_repeated_timesteps_as_steps(name, steps):
    """FlowMatchHeun (t0, t1, t1, …) and PNDM (its second timestep twice); SD 1.5 passes the timestep
    positionally (``unet(latents, t, …)``), found by what it feeds (the sinusoidal embedding)."""
    case = build_pipeline(name)
    _raw(case, make_backend(policy="fora", compiler="eager", warmup_steps=2, interval=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for seed in (0, 1):
            case(seed)
    stats = get_runtime(getattr(case.pipe, case.denoisers[0])).stats()
    assert stats["fallback"] is None
    assert (stats["trajectories"], stats["steps"]) == (2, 2 * steps)
    assert stats["cached_steps"] > 0 and stats["clock"] == "inferred"


def test_raw_path_one_step_series_has_bounded_slots():
    case = build_pipeline("flux")
    _raw(case, make_backend(policy="fora", compiler="eager"))
    sizes = []
    with pytest.warns(RuntimeWarning, match="1-2 steps in a row"):  # nothing cached: said once
        for seed in range(6):
            case(seed, num_inference_steps=1)
            sizes.append(get_runtime(case.pipe.transformer).stats()["cache_bytes"])
    stats = get_runtime(case.pipe.transformer).stats()
    assert stats["trajectories"] == 6 and stats["cache_slots"] <= 2
    assert len(set(sizes[2:])) == 1


def test_raw_path_two_experts_through_one_backend():
    """Wan 2.2 with both experts compiled by one backend object (what backend="specdiff" gives): the
    experts share dynamo's graph, yet each has its own runtime, equal to one backend per expert."""
    outs = {}
    for shared in (True, False):
        torch._dynamo.reset()
        case = build_pipeline("wan22")
        backend = make_backend(policy="taylor", compiler="eager", warmup_steps=1, interval=2)
        for name in case.denoisers:
            b = backend if shared else make_backend(policy="taylor", compiler="eager", warmup_steps=1, interval=2)
            _raw(case, b, [name])
        outs[shared] = case(0)
        first, second = get_runtime(case.pipe.transformer), get_runtime(case.pipe.transformer_2)
        assert first.primary is not second.primary
        assert first.stats()["steps"] == 4 and second.stats()["steps"] == 1
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)


def test_raw_path_lumina2_rising_timesteps_without_a_flag():
    case = build_pipeline("lumina2")
    _raw(case, make_backend(policy="fora", compiler="eager", warmup_steps=2, interval=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding frame has no blocks (a documented fallback)
        case(0)
        case(1)
    stats = get_runtime(case.pipe.transformer).stats()
    assert stats["trajectories"] == 2 and stats["cached_steps"] > 0


def test_raw_path_refine_after_full_warns_and_begin_trajectory_fixes_it():
    """What the raw path cannot know: a refine call starting below where the last call ended looks
    like more steps of it.  It warns; begin_trajectory() makes it right."""
    alone = build_pipeline("flux_img2img")
    _raw(alone, make_backend(policy="fora", compiler="eager", warmup_steps=1, interval=2))
    want = alone(0, strength=0.08)
    torch._dynamo.reset()
    case = build_pipeline("flux_img2img")
    _raw(case, make_backend(policy="fora", compiler="eager", warmup_steps=1, interval=2))
    case(0)
    with pytest.warns(RuntimeWarning, match="begin_trajectory"):
        case(0, strength=0.08)
    get_runtime(case.pipe.transformer).begin_trajectory()
    case(0)
    get_runtime(case.pipe.transformer).begin_trajectory()
    assert torch.equal(case(0, strength=0.08), want)


@pytest.mark.slow
@pytest.mark.inductor
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_pipeline_policy_under_inductor(name, policy):
    """The default compiler through real pipelines: expanded timesteps (``t.expand(B)``, stride 0)
    reach every variant and the draft, which is compiled for the contiguous ones it passes."""
    case = build_pipeline(name)
    plain = case(0)
    first, other, again, _, fallbacks = _run_compiled(case, policy)
    assert not fallbacks and torch.equal(first, again) and torch.isfinite(other).all()
    if policy == "off":
        torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)
    stats = get_runtime(case.pipe.transformer).stats()
    assert (stats["trajectories"], stats["steps"]) == (3, 3 * case.steps)
    assert (stats["cached_steps"] > 0) == (policy != "off")
    if policy == "specdiff":
        assert stats["draft_steps"] == 3


if __name__ == "__main__":
    print(support_matrix())


SCHEDULER_DRAFTS = {  # scheduler -> where its 2-step draft comes from
    "DDIMScheduler": "alphas",           # "leading" spacing: a 2-step copy would start below the trajectory
    "EulerDiscreteScheduler": "copy",    # scales the model input: the draft steps the unscaled sample
    "PNDMScheduler": "alphas",           # copied with its Runge-Kutta warm-up skipped, but "leading" too
    "KDPM2AncestralDiscreteScheduler": "alphas",  # diffusers gives it a NaN timestep at 2 steps
    "DPMSolverMultistepScheduler": "copy",
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_DRAFTS))
def test_specdiff_draft_follows_the_pipelines_scheduler(scheduler):
    import diffusers

    from specdiff_fx.pipeline import _scheduler_draft

    case = build_pipeline("pixart_sigma")
    case.pipe.scheduler = getattr(diffusers, scheduler).from_config(case.pipe.scheduler.config)
    compile_pipeline(case.pipe, policy="specdiff", compiler="eager", dynamic=False, **SCHEDULES["specdiff"])
    out = case(0)
    assert torch.isfinite(out).all() and torch.equal(case(0), out)
    stats = get_runtime(case.pipe.transformer).stats()
    assert stats["draft_steps"] == 2 and stats["trajectories"] == 2 and stats["cached_steps"] > 0
    real = case.pipe.scheduler
    first = float(real.timesteps[getattr(real, "begin_index", None) or 0])
    draft = _scheduler_draft(case.pipe._specdiff, 2)
    assert draft is not None and draft.timesteps[0] == pytest.approx(first)
    assert all(math.isfinite(t) for t in draft.timesteps)
    # a model that predicts zero noise: every DDPM-form sampler maps x_t to sqrt(a_next / a_t) x_t
    x = torch.randn(2, 4, 8, 8)
    alphas = real.alphas_cumprod
    want = x * (alphas[round(draft.timesteps[1])] / alphas[round(draft.timesteps[0])]) ** 0.5
    torch.testing.assert_close(draft.advance(x, torch.zeros_like(x), 0), want, rtol=1e-4, atol=1e-5)
    copied = "alphas" if draft.advance.__qualname__.startswith("_alphas_draft") else "copy"
    assert copied == SCHEDULER_DRAFTS[scheduler]
