"""Both policies on every diffusers 0.42.1 transformer class that serves a text-to-image or
text-to-video pipeline (plus DiT, class-conditional), as a new user would meet them: tiny
random-init configs (specdiff_fx/testing/tiny_models.py), batch 2, text padding masks where the
pipeline passes one.

For each class, policy ``specdiff`` either builds and passes partial exactness, cache
ratio 0 == original and no recompiles over 3 trajectories, or falls back with its
documented reason; policy ``fora`` runs with reuse steps and no recompiles, or falls back
with its documented reason.  The eager compiler is used throughout except one Inductor
run per attention kind this module adds (masked cross-attention, masked joint attention).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from specdiff_fx import get_runtime, make_backend
from specdiff_fx.passes.token_axis import analyze_token_axis
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import assert_all_close, run_steps
from test_token_variants import assert_partial_exact, record_at

BREAKS = "no timestep input found"
FOLLOWS = "follows the timestep frame"  # fora runs across the graph break: tests/test_graph_breaks.py

# family -> (diffusers class, pipelines, tiny-model kwargs, specdiff fallback reason, fora fallback reason)
MATRIX = {
    "dit": ("DiTTransformer2DModel", "DiTPipeline (class-conditional)", {}, None, None),
    "pixart": ("PixArtTransformer2DModel", "PixArtAlphaPipeline, PixArtSigmaPipeline", {"text_mask": True},
               None, None),
    "sd3": ("SD3Transformer2DModel", "StableDiffusion3Pipeline", {}, None, None),
    "flux": ("FluxTransformer2DModel", "FluxPipeline", {}, None, None),
    "hunyuan_dit": ("HunyuanDiT2DModel", "HunyuanDiTPipeline", {}, None, None),
    "sana": ("SanaTransformer2DModel", "SanaPipeline", {},
             r"linear attention: matmul contracts the token axis", None),
    "auraflow": ("AuraFlowTransformer2DModel", "AuraFlowPipeline", {}, None, None),
    "qwen_image": ("QwenImageTransformer2DModel", "QwenImagePipeline", {}, None, None),
    "flux2": ("Flux2Transformer2DModel", "Flux2Pipeline", {}, None, None),
    "chroma": ("ChromaTransformer2DModel", "ChromaPipeline", {}, None, None),
    "lumina2": ("Lumina2Transformer2DModel", "Lumina2Pipeline", {}, BREAKS, FOLLOWS),
    "hidream": ("HiDreamImageTransformer2DModel", "HiDreamImagePipeline", {}, BREAKS, FOLLOWS),
    "cogview4": ("CogView4Transformer2DModel", "CogView4Pipeline", {}, None, None),
    "wan": ("WanTransformer3DModel", "WanPipeline", {}, None, None),
    "ltx_video": ("LTXVideoTransformer3DModel", "LTXPipeline", {}, None, None),
    "cogvideox": ("CogVideoXTransformer3DModel", "CogVideoXPipeline", {}, None, None),
}
SPECDIFF_OK = [f for f, row in MATRIX.items() if row[3] is None]
SPECDIFF_FALLBACK = [f for f, row in MATRIX.items() if row[3] is not None]
FORA_OK = [f for f, row in MATRIX.items() if row[4] is None]
FORA_FALLBACK = [f for f, row in MATRIX.items() if row[4] not in (None, FOLLOWS)]
STEPS = [1000.0, 800.0, 600.0, 400.0, 200.0]
SPECDIFF = dict(policy="specdiff", compiler="eager", cache_ratio=0.5, warmup_steps=2, reset_steps=(),
                draft_steps=0)


def case_of(family):
    return build_tiny(family, **MATRIX[family][2])


def compile_case(case, family, **config):
    backend = make_backend(**config)
    fullgraph = MATRIX[family][4] not in (BREAKS, FOLLOWS)
    return torch.compile(case.model, backend=backend, fullgraph=fullgraph, dynamic=False), backend


def run_expecting_fallback(case, compiled, reason):
    """Two steps; the documented reason must be among the fallback warnings.  Where diffusers
    breaks the graph, the frames without blocks may also warn that they have no branches."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = run_steps(case, compiled, STEPS[:2])
    messages = [str(w.message) for w in caught if "specdiff: compiling" in str(w.message)]
    assert any(re.search(reason, m) for m in messages), messages
    allowed = (reason, "no residual branches found") if reason == BREAKS else (reason,)
    assert all(any(re.search(a, m) for a in allowed) for m in messages), messages
    return outs


def test_matrix_lists_every_text_pipeline_class():
    import diffusers

    text = [f for f in MATRIX if f != "dit"]
    assert len(text) >= 14
    for cls, *_ in MATRIX.values():
        assert hasattr(diffusers, cls), cls
    assert len(SPECDIFF_OK) >= 13 and {"pixart", "cogview4"} <= set(SPECDIFF_OK)


# ------------------------------------------------------------------------------ specdiff
@pytest.mark.parametrize("family", SPECDIFF_OK)
def test_specdiff_partial_exactness(family, capture):
    """A partial step with fresh K/V equals the full graph on the computed tokens."""
    case = case_of(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    _, recorded, _ = record_at(gm, region, example)
    index = assert_partial_exact(gm, region, example, recorded, k=5, seed=1)
    assert not torch.equal(index[0], index[1])
    assert region.sites and len(region.region) > 20     # the blocks are in the region


@pytest.mark.parametrize("family", SPECDIFF_OK)
def test_specdiff_cache_ratio_zero_matches_original(family):
    case = case_of(family)
    compiled, _ = compile_case(case, family, **dict(SPECDIFF, cache_ratio=0.0))
    assert_all_close(run_steps(case, compiled, STEPS), run_steps(case, case.model, STEPS))
    s = get_runtime(compiled).stats()
    assert s["fallback"] is None and s["partial_steps"] == 3


@pytest.mark.parametrize("family", SPECDIFF_OK)
def test_specdiff_partial_steps_run_over_three_trajectories(family):
    case = case_of(family)
    compiled, backend = compile_case(case, family, **SPECDIFF)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="specdiff", category=RuntimeWarning)
        for seed in range(3):
            outs = run_steps(case, compiled, STEPS, seed=seed)
            assert all(torch.isfinite(o).all() for o in outs)
    s = get_runtime(compiled).stats()
    assert s["fallback"] is None and s["partial_steps"] == 9
    assert counters["stats"]["unique_graphs"] == 1 and len(backend._runtimes) == 1


@pytest.mark.parametrize("family", SPECDIFF_FALLBACK)
def test_specdiff_falls_back_with_its_documented_reason(family):
    case = case_of(family)
    compiled, _ = compile_case(case, family, **SPECDIFF)
    outs = run_expecting_fallback(case, compiled, MATRIX[family][3])
    torch.testing.assert_close(outs, run_steps(case, case.model, STEPS[:2]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ fora
@pytest.mark.parametrize("family", FORA_OK)
def test_fora_reuses_without_fallback_or_recompiles(family):
    case = case_of(family)
    compiled, backend = compile_case(case, family, policy="fora", compiler="eager", warmup_steps=1, interval=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="specdiff", category=RuntimeWarning)
        for seed in range(3):
            run_steps(case, compiled, STEPS, seed=seed)
    s = get_runtime(compiled).stats()
    assert s["fallback"] is None and s["trajectories"] == 3 and s["cached_steps"] == 6  # 2 per trajectory
    assert counters["stats"]["unique_graphs"] == 1 and len(backend._runtimes) == 1


@pytest.mark.parametrize("family", FORA_FALLBACK)
def test_fora_falls_back_with_its_documented_reason(family):
    case = case_of(family)
    compiled, _ = compile_case(case, family, policy="fora", compiler="eager")
    outs = run_expecting_fallback(case, compiled, MATRIX[family][4])
    torch.testing.assert_close(outs, run_steps(case, case.model, STEPS[:2]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ Inductor
@pytest.mark.inductor
@pytest.mark.slow
@pytest.mark.parametrize("family", ["pixart", "chroma"])  # key-side text mask; joint mask, query side gathered
def test_specdiff_masked_attention_under_inductor_matches_eager(family):
    case = case_of(family)
    eager, _ = compile_case(case, family, **SPECDIFF)
    expected = run_steps(case, eager, STEPS)
    torch._dynamo.reset()
    compiled, _ = compile_case(case, family, **dict(SPECDIFF, compiler="inductor"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="specdiff", category=RuntimeWarning)
        got = run_steps(case, compiled, STEPS)
    assert get_runtime(compiled).stats()["partial_steps"] == 3
    assert_all_close(got, expected)
