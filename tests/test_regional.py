"""Regional compilation (specdiff_fx/regional.py): each repeated block class compiled once, its
caches on the pipeline's clock.

What must hold, through the real pipelines (their ``__call__``, schedulers and CFG):

* fora and taylor cache in every block, and give what the whole-model compile gives: fora
  exactly (the same branch outputs reused), lite taylor to float rounding (each block forecasts
  its own residual; for a forecast linear in the recorded terms they add up to the stack's);
* one dynamo graph per block class (and per block variant dynamo must trace apart, like SD3's
  last block), one runtime per block instance;
* token-level specdiff, which needs the whole model, runs uncached with exactly one warning;
* a block compiled on its own without a clock never reads a cache and says how to get one;
* blocks the user compiled (``compile_repeated_blocks(backend=make_backend(...))``) get the
  pipeline's clock from ``compile_pipeline(pipe)``; ``restore_pipeline`` undoes either path.
"""

import warnings

import pytest
import torch

from specdiff_fx import compile_pipeline, compile_regional, get_runtime, make_backend, restore_pipeline
from specdiff_fx.regional import repeated_blocks
from tiny_pipelines import build_pipeline

SCHEDULES = {"fora": dict(warmup_steps=2, interval=2), "taylor": dict(warmup_steps=2, interval=3)}


def _block_runtimes(module):
    """Every runtime behind ``module``'s compiled blocks (one per block instance)."""
    return get_runtime(module).runtimes


def _compiled(name, policy, regional, **extra):
    case = build_pipeline(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_pipeline(case.pipe, policy=policy, compiler="eager", regional=regional,
                         **{**SCHEDULES.get(policy, {}), **extra})
        outs = [case(0), case(1), case(0)]
    return case, outs, [str(w.message) for w in caught if "specdiff" in str(w.message)]


@pytest.mark.parametrize("policy", ["fora", "taylor"])
@pytest.mark.parametrize("name", ["flux", "sd3", "qwen_image"])
def test_regional_caches_every_block_and_equals_the_whole_model(name, policy):
    case, regional, warned = _compiled(name, policy, regional=True)
    assert not warned, warned
    blocks = repeated_blocks(case.pipe.transformer)
    runtimes = _block_runtimes(case.pipe.transformer)
    assert len(runtimes) == len(blocks), "one runtime per block instance"
    assert len({rt.root for rt in runtimes}) <= 2, "one graph per block class (SD3: its last block apart)"
    for rt in runtimes:
        s = rt.stats()
        assert s["fallback"] is None and s["clock"] == "pipeline"
        assert s["trajectories"] == 3 and s["steps"] == 3 * case.steps
        assert s["cached_steps"] > 0, [e["calls"] for e in s["plan"]]
    assert torch.equal(regional[0], regional[2]), "the same seed twice gives the same output"

    torch._dynamo.reset()
    _, whole, _ = _compiled(name, policy, regional=False)
    for r, w in zip(regional, whole):
        if policy == "fora":
            assert torch.equal(r, w)
        else:  # the blocks' forecasts add up to the stack's, in another order of float additions
            torch.testing.assert_close(r, w, rtol=1e-5, atol=1e-5)

    restore_pipeline(case.pipe)
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)


@pytest.mark.parametrize("name", ["pixart_sigma", "wan21", "sd15", "chroma"])
def test_regional_fora_caches_the_blocks_of_other_families(name):
    """Block classes found by diffusers' list (Wan, Chroma, the UNet's BasicTransformerBlock) or by
    the stack (PixArt): every block caches, through each pipeline's own scheduler and CFG."""
    case, outs, warned = _compiled(name, "fora", regional=True)
    assert not warned, warned
    assert torch.equal(outs[0], outs[2]) and torch.isfinite(outs[0]).all()
    runtimes = _block_runtimes(next(getattr(case.pipe, d) for d in case.denoisers))
    assert len(runtimes) >= 2
    for rt in runtimes:
        s = rt.stats()
        assert s["fallback"] is None and s["steps"] == 3 * case.steps and s["cached_steps"] > 0, s["plan"]


def test_regional_serves_other_sizes_and_each_equals_a_fresh_compile():
    case, _, _ = _compiled("flux", "taylor", regional=True)
    sizes = (96, 64, 128)
    served = [case(0, height=size, width=size) for size in sizes]
    assert all(rt.stats()["cached_steps"] > 0 for rt in _block_runtimes(case.pipe.transformer))
    for size, out in zip(sizes, served):
        torch._dynamo.reset()
        fresh, _, _ = _compiled("flux", "taylor", regional=True)
        assert torch.equal(out, fresh(0, height=size, width=size)), size


def test_regional_serves_prompt_lengths_each_equal_to_a_fresh_compile():
    """Qwen-Image trims the text to each prompt's own length: a new text length per prompt."""
    def prompt(length):
        g = torch.Generator().manual_seed(length)
        return dict(prompt_embeds=torch.randn(1, length, 12, generator=g),
                    prompt_embeds_mask=torch.ones(1, length, dtype=torch.long))

    case, _, _ = _compiled("qwen_image", "taylor", regional=True)  # its fixed prompts are padded
    lengths = (3, 7, 5)
    served, graphs = [], []
    for length in lengths:
        before = {id(rt): rt.stats() for rt in _block_runtimes(case.pipe.transformer)}
        served.append(case(0, **prompt(length)))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        after = {id(rt): rt.stats() for rt in _block_runtimes(case.pipe.transformer)}
        used = [(before.get(k), s) for k, s in after.items() if s["calls"] > (before[k]["calls"] if k in before else 0)]
        # the first prompt without a mask is another code path: dynamo traces the blocks anew
        # (a graph whose guard then reads ``encoder_hidden_states._base`` of an input that is
        # no view, and raises, so the first step of one block goes through a graph of its
        # own); every later length runs through the same graphs, every block caching
        if length != lengths[0]:
            assert used and all(s["cached_steps"] > (b["cached_steps"] if b else 0) for b, s in used), length
    assert graphs[1] == graphs[-1], f"graphs grew with the prompt lengths: {graphs}"
    # each later length equals a fresh compile that served one unmasked prompt first (the
    # retrace above settles in that first call, which is why the first length is not compared)
    for length, out in zip(lengths[1:], served[1:]):
        torch._dynamo.reset()
        fresh, _, _ = _compiled("qwen_image", "taylor", regional=True)
        fresh(0, **prompt(4))
        assert torch.equal(out, fresh(0, **prompt(length))), length


def _lora(transformer, seed, rank=2):
    """A LoRA state dict for the attention projections of ``transformer`` (diffusers' peft format)."""
    g = torch.Generator().manual_seed(seed)
    return {f"transformer.{name}.{part}.weight": torch.randn(*shape, generator=g) * 0.3
            for name, mod in transformer.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v")
            for part, shape in (("lora_A", (rank, mod.in_features)), ("lora_B", (mod.out_features, rank)))}


@pytest.mark.slow
def test_regional_lora_changes_each_equal_a_fresh_compile():
    pytest.importorskip("peft")
    loras = [_lora(build_pipeline("flux").pipe.transformer, seed) for seed in (1, 2)]
    changes = [
        lambda p: p.load_lora_weights(dict(loras[0]), adapter_name="a"),
        lambda p: p.set_adapters(["a"], [0.5]),
        lambda p: p.load_lora_weights(dict(loras[1]), adapter_name="b"),
        lambda p: p.fuse_lora(),
        lambda p: (p.unfuse_lora(), p.unload_lora_weights()),
    ]

    def compiled(applied):
        """A pipeline in the LoRA state ``applied`` leaves, then compiled (reset dynamo first)."""
        torch._dynamo.reset()
        case = build_pipeline("flux")
        for change in applied:
            change(case.pipe)
        compile_pipeline(case.pipe, policy="taylor", compiler="eager", regional=True, **SCHEDULES["taylor"])
        return case

    case = compiled([])
    served = []
    for change in changes:
        change(case.pipe)
        served.append(case(0))
    assert not torch.equal(served[0], served[-1]), "the LoRA changed the output"
    assert all(rt.stats()["cached_steps"] > 0 for rt in _block_runtimes(case.pipe.transformer))
    for i in range(len(changes)):  # (each compile resets dynamo: the served pipeline's runtimes go)
        assert torch.equal(served[i], compiled(changes[: i + 1])(0)), i


def test_specdiff_regional_warns_once_and_runs_uncached():
    case = build_pipeline("flux")
    plain = case(0)
    case, outs, warned = _compiled("flux", "specdiff", regional=True)
    assert len(warned) == 1 and "needs the whole model's graph" in warned[0], warned
    assert torch.equal(outs[0], plain)
    assert all(rt.stats()["cached_steps"] == 0 for rt in _block_runtimes(case.pipe.transformer))


def test_blocks_compiled_without_a_clock_never_cache_and_say_how():
    case = build_pipeline("flux")
    plain = case(0)
    case.pipe.transformer.compile_repeated_blocks(backend=make_backend(policy="fora", compiler="eager"))
    with pytest.warns(RuntimeWarning, match=r"compile_pipeline\(pipe, regional=True\)"):
        out = case(0)
    assert torch.equal(out, plain)


def test_compile_pipeline_puts_the_users_compiled_blocks_on_its_clock():
    case, regional, _ = _compiled("flux", "fora", regional=True)
    torch._dynamo.reset()
    user = build_pipeline("flux")
    user.pipe.transformer.compile_repeated_blocks(
        backend=make_backend(policy="fora", compiler="eager", **SCHEDULES["fora"]))
    compile_pipeline(user.pipe)
    assert torch.equal(user(0), regional[0])
    assert all(rt.stats()["cached_steps"] > 0 for rt in _block_runtimes(user.pipe.transformer))
    restore_pipeline(user.pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # off the clock: no event, no cache read, no warning
        user(0)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(user.pipe.transformer))


def test_regional_is_rejected_for_blocks_compiled_already():
    case = build_pipeline("flux")
    case.pipe.transformer.compile_repeated_blocks(backend="eager")
    with pytest.raises(ValueError, match="another backend"):
        compile_pipeline(case.pipe)
    with pytest.raises(ValueError, match="compiled blocks already"):
        compile_pipeline(case.pipe, regional=True)


def test_repeated_blocks_without_diffusers_list():
    sd3 = build_pipeline("sd3").pipe.transformer
    assert not getattr(sd3, "_repeated_blocks", None)
    assert repeated_blocks(sd3) == list(sd3.transformer_blocks)
    flux = build_pipeline("flux").pipe.transformer
    assert [type(b).__name__ for b in repeated_blocks(flux)] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    with pytest.raises(ValueError, match="no repeated blocks"):
        repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compile_regional_in_a_loop_of_ones_own():
    """The raw path: the loop tells the steps; calls outside a trajectory never read a cache."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    case = build_pipeline("sd3")
    model = case.pipe.transformer
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    enc = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, 10, generator=torch.Generator().manual_seed(2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    def run(denoise, on_begin=lambda: None, on_step=lambda: None):
        scheduler.set_timesteps(6)
        on_begin()
        latents = x.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                v = denoise(hidden_states=latents, encoder_hidden_states=enc, pooled_projections=pooled,
                            timestep=t.expand(2), return_dict=False)[0]
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
                on_step()
        return latents

    plain = run(model)
    with torch.no_grad():
        one = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                    timestep=torch.tensor([1000.0, 1000.0]), return_dict=False)[0]
    rc = compile_regional(model, policy="taylor", compiler="eager", warmup_steps=2, interval=3)
    first = run(model, rc.begin_trajectory, rc.end_step)
    again = run(model, rc.begin_trajectory, rc.end_step)
    assert torch.equal(first, again) and not torch.equal(first, plain)
    assert all(rt.stats()["cached_steps"] > 0 for rt in get_runtime(model).runtimes)
    rc.clock.stop()
    with torch.no_grad():  # no trajectory running: the full graph, as the plain model
        out = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                    timestep=torch.tensor([1000.0, 1000.0]), return_dict=False)[0]
    assert torch.equal(out, one)
    rc.restore()
    assert torch.equal(run(model), plain)


@pytest.mark.inductor
@pytest.mark.slow
def test_regional_taylor_under_inductor_matches_eager():
    _, eager, _ = _compiled("flux", "taylor", regional=True)
    torch._dynamo.reset()
    case = build_pipeline("flux")
    compile_pipeline(case.pipe, policy="taylor", regional=True, fullgraph=True, **SCHEDULES["taylor"])
    out = case(0)
    torch.testing.assert_close(out, eager[0], rtol=1e-4, atol=1e-4)
    assert all(rt.stats()["cached_steps"] > 0 for rt in _block_runtimes(case.pipe.transformer))


@pytest.mark.parametrize("regional", [False, True])
def test_caching_that_stops_at_the_recompile_limit_says_so_once(regional):
    """Past dynamo's recompile limit a frame runs eagerly, uncompiled and uncached, with one torch
    log line as its only sign; the pipeline's clock sees scheduler steps that reached no compiled
    graph and warns once, and report() counts them."""
    case = build_pipeline("flux")  # static graphs (dynamic=False): a graph per size
    compile_pipeline(case.pipe, policy="fora", compiler="eager", regional=regional, dynamic=False, **SCHEDULES["fora"])
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in (64, 96):  # two graphs per code object: both compiled, both cache
            case(0, height=size, width=size)
        assert not [w for w in caught if "specdiff" in str(w.message)]
        case(0, height=128, width=128)  # a third: dynamo runs it uncompiled
        case(0, height=128, width=128)
    said = [str(w.message) for w in caught if "specdiff" in str(w.message)]
    assert len(said) == 1 and "recompile limit" in said[0], said
    view = get_runtime(case.pipe.transformer)
    assert view.stats()["uncompiled_steps"] == 2 * case.steps
    assert "steps run uncompiled" in view.report()


def test_an_eager_stance_says_caching_stopped():
    case = build_pipeline("sd3")
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", **SCHEDULES["taylor"])
    case(0)
    with torch.compiler.set_stance("force_eager"), pytest.warns(RuntimeWarning, match="runs eagerly"):
        case(0)
    assert get_runtime(case.pipe.transformer).stats()["uncompiled_steps"] == case.steps


@pytest.mark.parametrize("regional", [False, True])
def test_lora_hotswap_compiles_nothing_and_equals_a_fresh_compile(regional):
    """diffusers' hotswap (``enable_lora_hotswap`` before the first load, then
    ``load_lora_weights(..., hotswap=True)``) swaps weights in place: no new graph, the caches of
    the new trajectory are the new LoRA's; ``joint_attention_kwargs={"scale": s}`` scales it (a
    whole-model graph guards on the scale's value, so a new scale is a new graph there)."""
    pytest.importorskip("peft")
    loras = [_lora(build_pipeline("flux").pipe.transformer, seed) for seed in (1, 2)]

    def pipeline(lora):
        case = build_pipeline("flux")
        case.pipe.enable_lora_hotswap(target_rank=4)
        case.pipe.load_lora_weights(dict(lora), adapter_name="a")
        compile_pipeline(case.pipe, policy="taylor", compiler="eager", regional=regional, **SCHEDULES["taylor"])
        return case

    served = pipeline(loras[0])
    first = served(0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    served.pipe.load_lora_weights(dict(loras[1]), adapter_name="a", hotswap=True)
    swapped = served(0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a hotswap compiled a graph"
    scaled = served(0, joint_attention_kwargs={"scale": 0.5})  # (the whole model guards on the scale)
    assert not torch.equal(first, swapped)
    assert all(rt.stats()["cached_steps"] > 0 for rt in _block_runtimes(served.pipe.transformer))
    torch._dynamo.reset()
    fresh = pipeline(loras[1])
    assert torch.equal(swapped, fresh(0))
    assert torch.equal(scaled, fresh(0, joint_attention_kwargs={"scale": 0.5}))
