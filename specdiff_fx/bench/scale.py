"""``specdiff-fx scale``: what each step kind costs at real model sizes, against plain Inductor.

Why this exists: our quality numbers come from a 256-token reference model, where host work
and the model's fixed parts (embeddings, output layer) hide what token caching costs.  Users
run SD3/FLUX/PixArt at 1024² (4096 image tokens).  This command builds random-weight diffusers
transformers with the published architecture shapes (weights do not matter for speed), traces
the model once with dynamo, builds the runtimes of our policies from that one graph, and times
each compiled *variant* directly (``runtime.variants[kind]`` with the runtime's own buffers).
Calling the variants directly isolates what the graph rewrite costs; the runtime's Python
around them is reported separately (``stats()['host_ms_per_call']``).

Method (the house rule for speed): plain Inductor on the same graph in the same process,
threads pinned, warm-up calls excluded, per-call median over ``--repeats`` rounds.  Kinds are
timed round-robin in each round, and each group of kinds is timed together with the plain
step again, so load drift on shared CPUs hits the numerator and denominator alike.

Reduced CPU sizes (``--layers/--width/--text-tokens``) keep the family's block structure and
head size; ``--resolution 512`` gives 1024 image tokens for all three families (VAE factor 8,
patch 2 or FLUX's 2×2 packing).  For FLUX, ``--layers L`` means L double-stream and 2L
single-stream blocks (the real model's 19 + 38 ratio).

Policy ``taylor`` (the default policy) is timed in both forecasting modes: ``lite`` (one
residual per chain of blocks, so a forecast step skips whole blocks) and ``branch``
(``lite=False``: one forecast per residual branch; the gates and adaLN still run).  Its kinds are
``taylor_<mode>_record`` (the full step that also updates the Taylor terms) and
``taylor_<mode>_forecast`` (the cached step).

The 28-step end-to-end speed-up is computed from the per-kind medians and each policy's
default schedule (``SpecDiffConfig``): fora = full steps + reuse steps, specdiff = full+record
steps + partial steps + draft calls; taylor = F record steps + (N − F) forecast steps for its
default schedule and the schedules in ``TAYLOR_SCHEDULES`` (:func:`forecast_speedup`).  It
excludes runtime host time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..device_sync import synchronize as _sync

# published shapes: (layers, heads, head_dim, text tokens as the pipeline pads them)
FAMILIES = {
    "sd3-medium": dict(layers=24, heads=24, head_dim=64, text_tokens=333),
    "flux-dev": dict(layers=19, heads=24, head_dim=128, text_tokens=512),
    "pixart-sigma": dict(layers=28, heads=16, head_dim=72, text_tokens=300),
}
SCHEDULE_STEPS = 28
DEFAULT_RATIOS = (0.5, 0.8, 0.9)
POLICIES = ("specdiff", "fora", "taylor")
TAYLOR_MODES = ("lite", "branch")  # lite=True, lite=False
# taylor schedules whose speed-up is predicted: (label, warmup_steps, interval, reset_steps);
# None: the policy's default (SpecDiffConfig), interval 0: warm-up and reset steps only.
TAYLOR_SCHEDULES = (
    ("default", None, None, None),
    ("full=5,9,14,20", 3, 0, (5, 9, 14, 20)),  # the reference schedule: 7 full of 28
    ("full=6,13,20", 3, 0, (6, 13, 20)),       # 6 full of 28
)


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


def capture_graph(case: ScaleModel) -> tuple[torch.fx.GraphModule, list]:
    """Trace the model once with dynamo; returns its FX graph and the (real) flattened inputs."""
    store: dict[str, Any] = {}

    def recorder(gm, example_inputs, **_):
        if "gm" in store:
            raise RuntimeError("the model traced into more than one graph; use fullgraph-clean models")
        store["gm"], store["inputs"] = gm, list(example_inputs)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend=recorder, dynamic=False, fullgraph=True)
    with torch.no_grad():
        compiled(**case.inputs)
    return store["gm"], store["inputs"]


def time_round_robin(fns: dict[str, Callable[[], Any]], *, repeats: int, calls: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Per-call milliseconds of each function, ``repeats`` rounds, all functions in each round."""
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        _sync(device)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync(device)
                times[name].append((time.perf_counter() - start) * 1000.0 / calls)
    return times


def peak_memory_mb(fn: Callable[[], Any], device: torch.device, held_bytes: int) -> float | None:
    from .metrics import peak_memory_mb as measure

    with torch.no_grad():
        return measure(fn, device, held_bytes=held_bytes)


@dataclass
class Group:
    """Kinds timed together (with the plain step) after one compile."""
    name: str
    kinds: dict[str, Callable[[], Any]] = field(default_factory=dict)
    ideal: dict[str, float] = field(default_factory=dict)
    held_bytes: int = 0
    info: dict = field(default_factory=dict)


def _raw(runtime, kind: str) -> Callable:
    """The compiled variant itself, without the runtime's host-time clock around it."""
    fn = runtime.variants[kind]
    return getattr(fn, "fn", fn)


def fora_group(gm, inputs, compiler: str, cfg_extra: dict) -> Group:
    from ..backend import make_backend

    runtime = make_backend(policy="fora", compiler=compiler, **cfg_extra).build_runtime(gm, inputs)
    if runtime.fallback:
        raise RuntimeError(f"fora fell back: {runtime.fallback}")
    record, cached = runtime.buffers_for("full", 0), runtime.buffers_for("reuse", 0)
    full, reuse = _raw(runtime, "full"), _raw(runtime, "reuse")
    with torch.no_grad():
        full(*inputs, *record)
    held = runtime.slot(0).nbytes
    return Group("fora", {"fora_full_record": lambda: full(*inputs, *record),
                          "fora_reuse": lambda: reuse(*inputs, *cached)},
                 {"fora_full_record": 1.0, "fora_reuse": 0.0}, held_bytes=held,
                 info={"cache_bytes": held, "branches": runtime.info.get("branches")})


def specdiff_group(gm, inputs, compiler: str, ratio: float, with_full: bool, draft: bool,
                   cfg_extra: dict) -> Group:
    from ..backend import make_backend

    runtime = make_backend(policy="specdiff", compiler=compiler, cache_ratio=ratio,
                           draft_steps=2 if draft else 0, **cfg_extra).build_runtime(gm, inputs)
    if runtime.fallback:
        raise RuntimeError(f"specdiff fell back: {runtime.fallback}")
    slot = runtime.slot(0)
    record, partial = runtime.buffers_for("full", 0), runtime.buffers_for("partial", 0)
    full_fn, partial_fn = _raw(runtime, "full"), _raw(runtime, "partial")
    with torch.no_grad():
        full_fn(*inputs, *record)  # fills the K/V caches and history, as a full step would
    # the partial variant picks its own tokens (passes/token_select.py) from the scores just recorded
    slot.find("mix_weights").copy_(torch.tensor([0.6, 0.3, 0.1]))
    tag = f"specdiff_partial_cr{ratio:g}"
    group = Group(f"specdiff cr {ratio:g}", {tag: lambda: partial_fn(*inputs, *partial)},
                  {tag: runtime.k / runtime.n}, held_bytes=slot.nbytes,
                  info={"cache_bytes": slot.nbytes, "kv_cache_bytes": slot.nbytes_of("kv"), "subset_tokens": runtime.k,
                        "image_tokens": runtime.n, "flops": dict(runtime.flops)})
    if with_full:
        group.kinds["specdiff_full_record"] = lambda: full_fn(*inputs, *record)
        group.ideal["specdiff_full_record"] = 1.0
    if draft and "draft" in runtime.variants:
        draft_fn, draft_buffers = _raw(runtime, "draft"), runtime.buffers_for("draft", 0)
        group.kinds["specdiff_draft"] = lambda: draft_fn(*inputs, *draft_buffers)
        group.ideal["specdiff_draft"] = 1.0
    return group


def taylor_group(gm, inputs, compiler: str, lite: bool, cfg_extra: dict) -> Group:
    """Record and forecast steps of policy taylor, lite (chains of blocks) or per branch."""
    from ..backend import make_backend

    mode = "lite" if lite else "branch"
    runtime = make_backend(policy="taylor", lite=lite, compiler=compiler, **cfg_extra).build_runtime(gm, inputs)
    if runtime.fallback:
        raise RuntimeError(f"taylor ({mode}) fell back: {runtime.fallback}")
    recorded, forecast_buffers = runtime.buffers_for("full", 0), runtime.buffers_for("forecast", 0)
    record, forecast = _raw(runtime, "full"), _raw(runtime, "forecast")
    with torch.no_grad():
        record(*inputs, *recorded)  # fills the Taylor terms, as a full step would
    rec, fc = f"taylor_{mode}_record", f"taylor_{mode}_forecast"
    held = runtime.slot(0).nbytes
    return Group(f"taylor {mode}", {rec: lambda: record(*inputs, *recorded),
                                    fc: lambda: forecast(*inputs, *forecast_buffers)},
                 {rec: 1.0, fc: 0.0}, held_bytes=held,
                 info={"cache_bytes": held, "lite": lite,
                       "branches": runtime.info.get("branches"),
                       "forecast_targets": runtime.info.get("forecast_targets")})


def forecast_speedup(record_share: float, forecast_share: float, full_steps: int,
                     steps: int = SCHEDULE_STEPS) -> float:
    """Speed-up of a ``steps``-step trajectory with ``full_steps`` record steps and forecast
    steps in between, from their shares of a plain step: N / (F·record + (N − F)·forecast)."""
    if not 0 < full_steps <= steps:
        raise ValueError(f"full_steps must be in 1..{steps}, got {full_steps}")
    return steps / (full_steps * record_share + (steps - full_steps) * forecast_share)


def taylor_full_steps(warmup_steps: int | None, interval: int | None, reset_steps: tuple[int, ...] | None,
                      steps: int = SCHEDULE_STEPS) -> int:
    """Full steps of ``steps`` under a taylor schedule (None fields: the policy's default)."""
    from ..config import SpecDiffConfig
    from ..runtime import FullStepSchedule

    cfg = SpecDiffConfig(policy="taylor", warmup_steps=warmup_steps, interval=interval, reset_steps=reset_steps)
    sched = FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps)
    return sum(sched.is_full(s) for s in range(steps))


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


def schedule_costs(share: dict[str, float], ratios, steps: int = SCHEDULE_STEPS) -> dict:
    """End-to-end speed-up of a ``steps``-step trajectory from per-kind shares of a plain step."""
    from ..config import SpecDiffConfig
    from ..runtime import FullStepSchedule

    out = {}
    fora_cfg = SpecDiffConfig(policy="fora")
    sched = FullStepSchedule(fora_cfg.warmup_steps, fora_cfg.interval, fora_cfg.reset_steps)
    full = sum(sched.is_full(s) for s in range(steps))
    if "fora_full_record" in share and "fora_reuse" in share:
        cost = full * share["fora_full_record"] + (steps - full) * share["fora_reuse"]
        out["fora"] = {"full_steps": full, "speedup": steps / cost, "ideal_speedup": steps / full}
    sd_cfg = SpecDiffConfig(policy="specdiff")
    sched = FullStepSchedule(sd_cfg.warmup_steps, None, sd_cfg.reset_steps)
    full = sum(sched.is_full(s) for s in range(steps))
    drafts = max(sd_cfg.draft_steps - 1, 0)
    for ratio in ratios:
        tag = f"specdiff_partial_cr{ratio:g}"
        if tag not in share or "specdiff_full_record" not in share:
            continue
        draft = share.get("specdiff_draft", share["specdiff_full_record"])
        cost = full * share["specdiff_full_record"] + (steps - full) * share[tag] + drafts * draft
        ideal = full + (steps - full) * (1.0 - ratio) + drafts
        out[f"specdiff_cr{ratio:g}"] = {"full_steps": full, "draft_calls": drafts, "speedup": steps / cost,
                                        "ideal_speedup": steps / ideal}
    for mode in TAYLOR_MODES:
        rec, fc = f"taylor_{mode}_record", f"taylor_{mode}_forecast"
        if rec not in share or fc not in share:
            continue
        for label, warmup, interval, reset in TAYLOR_SCHEDULES:
            full = taylor_full_steps(warmup, interval, reset, steps)
            out[f"taylor_{mode} {label}"] = {"full_steps": full, "speedup": forecast_speedup(
                share[rec], share[fc], full, steps), "ideal_speedup": steps / full}
    return out


def run_scale(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    torch.set_num_threads(args.threads)
    if args.cudagraphs and (device.type != "cuda" or args.compiler != "inductor"):
        raise ValueError("--cudagraphs needs --device cuda and the inductor compiler")
    case = build_model(args.family, args.resolution, batch=args.batch, layers=args.layers, width=args.width,
                       head_dim=args.head_dim, text_tokens=args.text_tokens, dtype=dtype, device=device)
    ratios = list(args.ratios)
    result: dict = {
        "command": getattr(args, "command_line", None),
        "model": case.describe(), "batch": args.batch, "resolution": args.resolution, "dtype": args.dtype,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({os.cpu_count()} cores)", "threads": args.threads, "torch": torch.__version__,
        "compiler": args.compiler, "repeats": args.repeats, "calls": args.calls, "warmup": args.warmup,
        "kinds": {}, "groups": {}, "errors": {},
        "kv_cache_formula_mb": kv_cache_formula_bytes(case, args.batch, torch.empty((), dtype=dtype).element_size()) / 2**20,
    }
    log(f"scale: {case.describe()} batch {args.batch} {args.dtype} on {result['device_name']}")
    start = time.perf_counter()
    gm, inputs = capture_graph(case)
    log(f"  traced in {time.perf_counter() - start:.1f}s ({len(inputs)} graph inputs)")
    patches = dict(args.inductor_config or {})
    # CUDA graphs: plain gets Inductor's own (cudagraph trees); our variants get
    # SpecDiffConfig(cudagraphs=True), one capture per cache slot (runtime/cuda_graphs.py)
    plain_patches = dict(patches, **{"triton.cudagraphs": True}) if args.cudagraphs else patches
    result["cudagraphs"] = bool(args.cudagraphs)
    cfg_extra = dict(inductor_config=patches, cudagraphs=bool(args.cudagraphs))

    start = time.perf_counter()
    plain = gm if args.compiler == "eager" else _inductor(gm, inputs, plain_patches)
    result["compile_s"] = {"plain": time.perf_counter() - start}
    plain_fn = lambda: plain(*inputs)  # noqa: E731

    policies = [p for p in args.policies if not (p == "fora" and args.no_fora)]
    result["policies"], result["taylor_modes"] = policies, list(args.taylor_modes)
    builders: list[tuple[str, Callable[[], Group]]] = []
    first = ratios[0] if 0.8 not in ratios else 0.8
    if "specdiff" in policies:
        builders.append((f"specdiff cr {first:g}", lambda: specdiff_group(
            gm, inputs, args.compiler, first, with_full=True, draft=not args.no_draft, cfg_extra=cfg_extra)))
    if "fora" in policies:
        builders.append(("fora", lambda: fora_group(gm, inputs, args.compiler, cfg_extra)))
    if "taylor" in policies:
        for mode in args.taylor_modes:
            builders.append((f"taylor {mode}", lambda mode=mode: taylor_group(
                gm, inputs, args.compiler, mode == "lite", cfg_extra)))
    for ratio in ratios if "specdiff" in policies else ():
        if ratio != first:
            builders.append((f"specdiff cr {ratio:g}", lambda ratio=ratio: specdiff_group(
                gm, inputs, args.compiler, ratio, with_full=False, draft=False, cfg_extra=cfg_extra)))

    shares: dict[str, float] = {}
    paired_shares: dict[str, float] = {}
    for name, build in builders:
        start = time.perf_counter()
        try:
            group = build()
        except Exception as exc:  # a family we cannot rewrite is a result too, not a crash
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"  {name}: FAILED {result['errors'][name]}")
            continue
        result["compile_s"][name] = time.perf_counter() - start
        fns = {"plain": plain_fn, **group.kinds}
        if args.cudagraphs:  # each call is a new cudagraph-tree step (outputs are not kept)
            fns = {k: _new_step(fn) for k, fn in fns.items()}
        times = time_round_robin(fns, repeats=args.repeats, calls=args.calls, warmup=args.warmup, device=device)
        plain_ms = statistics.median(times["plain"])
        result["groups"][name] = {"plain_ms": plain_ms, **group.info}
        for kind, fn in group.kinds.items():
            ms = statistics.median(times[kind])
            shares[kind] = ms / plain_ms
            # per-round ratio (same round, adjacent in time): robust to load drift on shared machines
            paired = statistics.median(t / p for t, p in zip(times[kind], times["plain"]))
            paired_shares[kind] = paired
            row = {"ms": ms, "share": ms / plain_ms, "share_paired": paired, "ideal_share": group.ideal[kind],
                   "plain_ms": plain_ms,
                   "times_ms": times[kind], "plain_times_ms": times["plain"], "group": name}
            if not args.no_memory:
                row["peak_mem_mb"] = peak_memory_mb(fn, device, group.held_bytes + _param_bytes(case.model))
            if kind.startswith("specdiff_partial") and "subset_tokens" in group.info:
                # joint attention computes every text token too: the share of tokens computed
                text = 0 if case.family == "pixart-sigma" else case.text_tokens
                row["token_share"] = (group.info["subset_tokens"] + text) / (case.image_tokens + text)
            result["kinds"][kind] = row
            log(f"  {kind:28s} {ms:9.2f} ms  share {ms / plain_ms:5.3f} (paired {paired:5.3f})  (ideal {group.ideal[kind]:.2f}, "
                f"plain {plain_ms:.2f} ms)")
        result["kinds"].setdefault("plain", {"ms": plain_ms, "share": 1.0, "share_paired": 1.0, "ideal_share": 1.0,
                                             "times_ms": times["plain"]})
        if not args.no_memory and "peak_mem_mb" not in result["kinds"]["plain"]:
            result["kinds"]["plain"]["peak_mem_mb"] = peak_memory_mb(plain_fn, device, _param_bytes(case.model))
        del group, fns
        result["schedule"] = schedule_costs(shares, ratios)
        result["schedule_paired"] = schedule_costs(paired_shares, ratios)
        if args.out:
            _write(result, args.out)
    result["schedule"] = schedule_costs(shares, ratios)
    result["schedule_paired"] = schedule_costs(paired_shares, ratios)
    for name, row in result["schedule"].items():
        paired = result["schedule_paired"][name]["speedup"]
        log(f"  28-step {name:28s} {row['full_steps']:2d} full: speed-up {row['speedup']:.2f}x "
            f"(paired {paired:.2f}x, ideal {row['ideal_speedup']:.2f}x)")
    if args.out:
        _write(result, args.out)
    if args.plot:
        scale_plot(result, args.plot)
    return result


def _new_step(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()
    return call


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _inductor(gm, inputs, patches: dict):
    from torch._inductor.compile_fx import compile_fx

    from ..passes.graph_copy import copy_graph_module

    with torch.no_grad():
        return compile_fx(copy_graph_module(gm), list(inputs), config_patches=dict(patches) or None)


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def scale_plot(result: dict, path: str) -> None:
    """Bars: measured share of a plain step per kind, with the compute-share (ideal) line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kinds = sorted(result["kinds"], key=lambda k: (k != "plain", k))
    # the paired share (same-round ratio) where the run has it: robust to load drift
    measured = [result["kinds"][k].get("share_paired", result["kinds"][k]["share"]) for k in kinds]
    ideal = [result["kinds"][k]["ideal_share"] for k in kinds]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
    xs = range(len(kinds))
    ax.bar(xs, measured, color="tab:red", alpha=0.8, label="measured")
    ax.scatter(xs, ideal, color="black", marker="_", s=400, zorder=3, label="compute share (ideal)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [k.replace("specdiff_", "sd_") for k in kinds], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("time / plain Inductor step")
    ax.legend(fontsize=8)
    m = result["model"]
    ax.set_title(f"{m['family']} {m['layers']}L x {m['width']}, {m['image_tokens']}+{m['text_tokens']} tokens, "
                 f"batch {result['batch']}, {result['dtype']}, {result['device_name']}", fontsize=9)
    sched = result.get("schedule", {})
    names = list(sched)
    ax2.barh(range(len(names)), [sched[n]["speedup"] for n in names], color="tab:red", alpha=0.8, label="measured")
    ax2.scatter([sched[n]["ideal_speedup"] for n in names], range(len(names)), color="black", marker="|", s=300,
                zorder=3, label="ideal")
    ax2.set_yticks(range(len(names)), names, fontsize=8)
    ax2.set_xlabel(f"{SCHEDULE_STEPS}-step speed-up")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = ["| step kind | ms | share of plain | share, paired rounds | compute share (image tokens) | "
             "token share (with text) | peak MiB |", "|---|---|---|---|---|---|---|"]
    for kind, row in result["kinds"].items():
        mem, tokens = row.get("peak_mem_mb"), row.get("token_share")
        paired = row.get("share_paired")
        lines.append(f"| {kind} | {row['ms']:.2f} | {row['share']:.3f} | "
                     f"{'-' if paired is None else f'{paired:.3f}'} | {row['ideal_share']:.2f} | "
                     f"{'-' if tokens is None else f'{tokens:.3f}'} | {'-' if mem is None else f'{mem:.0f}'} |")
    paired_rows = result.get("schedule_paired", {})
    for name, row in result.get("schedule", {}).items():
        paired = paired_rows.get(name, {}).get("speedup")
        lines.append(f"| 28-step {name}, {row['full_steps']} full | | speed-up {row['speedup']:.2f}x | "
                     f"{'' if paired is None else f'speed-up {paired:.2f}x'} | ideal {row['ideal_speedup']:.2f}x | | |")
    return "\n".join(lines)


def _ratios(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="sd3-medium", choices=sorted(FAMILIES))
    parser.add_argument("--resolution", type=int, help="image side in pixels (default 1024; quick 128)")
    parser.add_argument("--layers", type=int, help="blocks (FLUX: double blocks; singles = 2x) (default: real)")
    parser.add_argument("--width", type=int, help="model width, a multiple of the head size (default: real)")
    parser.add_argument("--head-dim", type=int, help="head size (default: real)")
    parser.add_argument("--text-tokens", type=int, help="text tokens (default: the pipeline's)")
    parser.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = one image with CFG)")
    parser.add_argument("--ratios", type=_ratios, default=list(DEFAULT_RATIOS), help="specdiff cache ratios")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compiler", choices=["inductor", "eager"], help="default inductor; quick eager")
    parser.add_argument("--threads", type=int, help="torch threads, pinned (default 2; quick 1)")
    parser.add_argument("--repeats", type=int, help="timed rounds; the median is reported (default 5; quick 1)")
    parser.add_argument("--calls", type=int, default=1, help="calls per timed round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per kind first")
    parser.add_argument("--no-draft", action="store_true", help="skip the draft variant")
    parser.add_argument("--no-fora", action="store_true", help="skip the fora variants")
    parser.add_argument("--policies", type=_choices(POLICIES), default=list(POLICIES),
                        help="policies whose step kinds are timed (default: specdiff,fora,taylor)")
    parser.add_argument("--taylor-modes", type=_choices(TAYLOR_MODES), default=list(TAYLOR_MODES),
                        help="taylor forecasting modes: lite (lite=True: one residual per chain of blocks), "
                             "branch (lite=False: every residual branch) (default: lite,branch)")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="CUDA only: Inductor's CUDA graphs (triton.cudagraphs) for plain, "
                             "SpecDiffConfig(cudagraphs=True) for every variant")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke test: 128 px (64 tokens), 1 layer x 64, 8 text tokens, eager, "
                             "1 repeat, 1 thread; explicit options still win")
    parser.add_argument("--out", default="out/scale.json", help="JSON path")
    parser.add_argument("--plot", default="out/scale.png", help="plot path ('' for none)")
    parser.set_defaults(inductor_config=None)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        for name, value in (("resolution", 128), ("layers", 1), ("width", 64), ("text_tokens", 8)):
            if getattr(args, name) is None:
                setattr(args, name, value)
        for name, value in (("compiler", "eager"), ("repeats", 1), ("threads", 1)):
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in (("resolution", 1024), ("compiler", "inductor"), ("repeats", 5), ("threads", 2)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.width is not None and args.head_dim is None and args.width < FAMILIES[args.family]["head_dim"]:
        args.head_dim = args.width
    return args


def run(args: argparse.Namespace) -> int:
    import sys

    args.command_line = "specdiff-fx scale " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else None
    args = resolve(args)
    result = run_scale(args)
    print(format_table(result))
    return 1 if result["errors"] and not result["kinds"] else 0
