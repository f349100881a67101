"""One compiled pipeline serving requests of many shapes, as a service runs it.

What must hold (docs/design.md, "Shape-general variants"), through the real pipelines:

* ``compile_pipeline(pipe)`` (``dynamic=True``, the default) compiles each denoiser to a number of dynamo graphs
  that does not grow with the number of image sizes, prompt lengths and batch sizes: 2 (batch 1, dynamo's 0/1
  specialization, and larger batches), FLUX and Qwen-Image alike (Qwen-Image's latent grid,
  Python ints in ``img_shapes``, is symbolic from the first call);
* every policy caches on every call: fora and taylor with one set of variants for every size
  (buffers sized per call), token-level specdiff with a build per size inside its runtime;
* each output equals what a static compile at that shape gives (eager compiler: exactly).
"""

import warnings

import pytest
import torch

from specdiff_fx import compile_pipeline, get_runtime
from tiny_pipelines import build_pipeline

SCHEDULES = {"fora": dict(warmup_steps=2, interval=2), "taylor": dict(warmup_steps=2, interval=3),
             "specdiff": dict(warmup_steps=2, interval=2)}

# Image sizes (height, width), multiples of 16 px: ten of them, square and not, each of another
# token count (FLUX packs 2 x 2 latents per token: 96 x 192 and 192 x 96 are one shape to it).
# The first avoids a token count equal to a channel count (a static first graph would then
# specialize both).
SIZES = [(96, 64), (64, 64), (128, 96), (64, 160), (96, 96), (160, 96), (128, 128), (64, 128), (192, 96),
         (96, 224)]
PROMPT_LENGTHS = [5, 7, 3, 12, 9, 4, 16, 6, 11, 8]
BOUND = 2
"""Graphs a denoiser compiles to, whatever the number of shapes: batch 1 and larger batches."""


def _qwen_prompt(length: int, seed: int) -> dict:
    """Qwen-Image prompt embeddings of ``length`` tokens and a negative prompt's, each trimmed to
    its own tokens as QwenImagePipeline's ``encode_prompt`` trims them (all-ones masks, which it
    drops)."""
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(1, length, dtype=torch.long)
    return dict(prompt_embeds=torch.randn(1, length, 12, generator=g), prompt_embeds_mask=ones,
                negative_prompt_embeds=torch.randn(1, length, 12, generator=g), negative_prompt_embeds_mask=ones.clone())


def _flux_prompt(length: int) -> dict:
    g = torch.Generator().manual_seed(length)
    return dict(prompt_embeds=torch.randn(1, length, 12, generator=g),
                pooled_prompt_embeds=torch.randn(1, 10, generator=g))


def _requests(name: str) -> list[dict]:
    """What the service is asked, in turn: ten sizes, then ten prompt lengths, then batches of
    two and three images.  Qwen-Image's prompts are trimmed to their tokens, as its
    pipeline encodes a prompt (a padded mask, from a batch of prompts of other lengths, is
    another code path of the model: test_a_padded_text_mask_is_one_code_path_more)."""
    prompt = (lambda n: _qwen_prompt(n, seed=n)) if name == "qwen_image" else (lambda n: {})
    out = [dict(height=h, width=w, **prompt(8)) for h, w in SIZES]
    if name == "qwen_image":
        out += [dict(height=64, width=96, **prompt(n)) for n in PROMPT_LENGTHS]
    else:  # FLUX pads its T5 prompt to a fixed length; embeddings of one's own have any length
        out += [dict(height=64, width=96, **_flux_prompt(n)) for n in PROMPT_LENGTHS]
    out.append(dict(height=96, width=96, num_images_per_prompt=2, **prompt(8)))
    out.append(dict(height=64, width=128, num_images_per_prompt=3, **prompt(5)))
    return out


def _cached_steps(pipe) -> dict[int, int]:
    """Cached steps of each live runtime (specdiff's runtimes of the least recent sizes are let go)."""
    return {id(rt): rt.stats()["cached_steps"] for rt in get_runtime(pipe.transformer).runtimes}


def _serve(name, policy, requests, **compile_kwargs):
    """Each request through one compiled pipeline: outputs, and the graphs dynamo compiled."""
    case = build_pipeline(name)
    compile_pipeline(case.pipe, policy=policy, compiler="eager", **SCHEDULES[policy], **compile_kwargs)
    outs, graphs = [], []
    for request in requests:
        before = _cached_steps(case.pipe) if outs else {}
        outs.append(case(0, **request))
        after = _cached_steps(case.pipe)
        assert sum(n - before.get(rt, 0) for rt, n in after.items()) > 0, \
            f"{ {k: v for k, v in request.items() if not isinstance(v, torch.Tensor)} }: a call that cached nothing"
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return case, outs, graphs


CASES = [(name, policy) for name in ("flux", "qwen_image") for policy in ("fora", "taylor", "specdiff")]


@pytest.mark.slow
@pytest.mark.parametrize("name, policy", CASES)
def test_one_compiled_pipeline_serves_every_shape_caching_each_call(name, policy):
    requests = _requests(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case, served, graphs = _serve(name, policy, requests)
    assert not [str(w.message) for w in caught if "specdiff" in str(w.message)]
    # one graph for every size and prompt length (tensor sizes, and Qwen-Image's latent grid of
    # Python ints traced as symbols from the first call), and one for batches of 2 and 3 (dynamo
    # specializes a size of 1)
    assert graphs[-1] <= BOUND, f"{graphs[-1]} graphs for {len(requests)} shapes: {graphs}"
    assert graphs[-3] == 1, f"graphs grew with the sizes and prompt lengths served: {graphs}"
    assert graphs[-2] == graphs[-1], f"graphs grew with the batch sizes served: {graphs}"
    if policy == "specdiff":  # built at each size in its runtime, never in dynamo
        assert len(get_runtime(case.pipe.transformer).runtimes) >= 8

    # the same requests, each compiled static at its shape (a graph per shape)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        _, static, _ = _serve(name, policy, requests, dynamic=False)
    for request, got, want in zip(requests, served, static):
        assert torch.equal(got, want), {k: v for k, v in request.items() if not isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_a_padded_text_mask_is_one_code_path_more():
    """A batch of prompts of several lengths pads them and keeps their mask; the model then
    takes another code path (an attention mask), one graph more, once: not one per shape."""
    case = build_pipeline("qwen_image")  # its fixed prompts are padded
    compile_pipeline(case.pipe, policy="fora", compiler="eager", dynamic=True, **SCHEDULES["fora"])
    for h, w in SIZES[:3]:
        case(0, height=h, width=w)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for n in PROMPT_LENGTHS[:3]:
        case(0, height=64, width=96, **_qwen_prompt(n, seed=n))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    case(0, height=SIZES[4][0], width=SIZES[4][1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_a_list_of_layer_indices_stays_constant():
    """SD3's skip-layer guidance passes ``skip_layers=[i]``: traced as a symbol, dynamo 2.13
    answers ``index in [s0]`` wrongly and skips no layer (a wrong image, no error).  Served with
    other layers in turn, every output equals the uncompiled pipeline's."""
    case = build_pipeline("sd3_slg")
    layers = [[0], [1], [0, 1], [0]]
    plain = [case(0, skip_guidance_layers=skip) for skip in layers]
    assert not torch.equal(plain[0], plain[1])  # the layers skipped change the image
    compile_pipeline(case.pipe, policy="off", compiler="eager")  # the default: dynamic=True
    for skip, want in zip(layers, plain):
        assert torch.equal(case(0, skip_guidance_layers=skip), want), skip


def test_a_static_compile_is_an_option():
    """``dynamic=False``: a graph per shape, each static."""
    case = build_pipeline("flux")
    compile_pipeline(case.pipe, policy="fora", compiler="eager", dynamic=False, **SCHEDULES["fora"])
    for h, w in SIZES[:3]:
        case(0, height=h, width=w)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert all(rt.shape_binding is None for rt in get_runtime(case.pipe.transformer).runtimes)


def test_buffers_are_sized_per_call_and_never_carried_across_sizes():
    """A dynamic graph's caches are allocated at each call's sizes; a new size starts a new
    trajectory in fresh buffers (no cache of another size is read)."""
    case = build_pipeline("flux")
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=True, **SCHEDULES["taylor"])
    case(0, height=64, width=64)
    runtime = get_runtime(case.pipe.transformer).primary
    assert runtime.shape_binding is not None and any(s.symbolic for s in runtime.buffer_specs)
    tokens = {tuple(t.shape)[1] for t in runtime.slot(0).named().values() if t.dim() == 3}
    assert 16 in tokens, tokens  # 64 x 64 px: 4 x 4 patches of 2 x 2 latents
    case(0, height=128, width=96)
    tokens = {tuple(t.shape)[1] for t in runtime.slot(0).named().values() if t.dim() == 3}
    assert 48 in tokens and 16 not in tokens, tokens
    assert runtime.stats()["invalidations"] >= 1


@pytest.mark.inductor
@pytest.mark.slow
def test_dynamic_taylor_under_inductor_equals_static_compiles():
    """One Inductor compile of each variant serves every size, to float tolerance of static ones."""
    requests = [dict(height=h, width=w) for h, w in SIZES[:3]]
    case = build_pipeline("flux")
    compile_pipeline(case.pipe, policy="taylor", dynamic=True, **SCHEDULES["taylor"])
    served = [case(0, **r) for r in requests]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(rt.stats()["fallback"] is None for rt in get_runtime(case.pipe.transformer).runtimes)
    torch._dynamo.reset()
    case = build_pipeline("flux")
    compile_pipeline(case.pipe, policy="taylor", dynamic=False, **SCHEDULES["taylor"])
    for request, got in zip(requests, served):
        torch.testing.assert_close(got, case(0, **request), rtol=1e-5, atol=1e-5)
