"""Third-party feature caches on the same reference model: the bench's "anchors".

- diffusers 0.42.1 hooks: First Block Cache, TaylorSeer, MagCache.  The reference denoiser is an
  ``SD3Transformer2DModel``, which has no ``enable_cache`` (no ``CacheMixin``), so the hooks are
  applied directly (``diffusers.hooks.apply_*``), every sample resets the hooks' state
  (``HookRegistry.reset_stateful_hooks``) and runs inside a cache context
  (``CacheMixin.cache_context`` called on the transformer, which is what pipelines do).
- cache-dit's DBCache through a ``BlockAdapter`` (SD3's registered adapter needs a pipeline), with
  ``refresh_context`` before every sample (without it, state leaks from one sample to the next).

Each anchor caches a deep copy of the transformer, so hooks never touch the model the other rows
use.  Thresholds that depend on the model are tuned on *calibration seeds* that are not among the
evaluation seeds (``Workload.calibration_groups``), and the tuned value is reported in the row.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
from typing import Callable

import torch

from .methods import Method, Prepared, SkipMethod, StepCounts, Workload

# TaylorSeer's default module patterns expect ".attn" leaves under "transformer_blocks"; in SD3's
# JointTransformerBlock we cache the joint attention and both feed-forwards (image and text).
TAYLORSEER_IDENTIFIERS = [r"transformer_blocks\.\d+\.(attn|ff|ff_context)"]
AUTO = "auto"


# ----------------------------------------------------------------------------- helpers
def _transformer_copy(wl: Workload) -> torch.nn.Module:
    return copy.deepcopy(wl.model.transformer)


def _hooks(module: torch.nn.Module, class_name: str) -> list:
    found = []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            found += [h for h in registry.hooks.values() if type(h).__name__ == class_name]
    return found


def _diffusers_context(transformer: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """Per sample: fresh hook state, and a cache context around the whole trajectory."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    registry = HookRegistry.check_if_exists_or_initialize(transformer)

    @contextlib.contextmanager
    def context():
        registry.reset_stateful_hooks()
        with CacheMixin.cache_context(transformer, "cfg_batch"):  # one batched cond+uncond call per step
            yield

    return context


def _run_calibration(wl: Workload, prepared: Prepared) -> StepCounts:
    """Run the (uncompiled) cached denoiser over the calibration seeds; step counts of that run."""
    before = prepared.counts()
    for group in wl.calibration_groups:
        with prepared.sample_context():
            wl.run_group(prepared.denoiser, group, prepared.callback)
    return prepared.counts() - before


def skip_share(counts: StepCounts) -> float:
    return 0.0 if counts.steps == 0 else 1.0 - counts.full / counts.steps


def auto_threshold(evaluate: Callable[[float], float], target: float, lo: float = 1e-3, hi: float = 4.0,
                   iterations: int = 9) -> tuple[float, float]:
    """Smallest threshold (bisection in log space) whose skipped-step share on the calibration
    seeds reaches ``target``.  Returns (threshold, share); if even ``hi`` falls short, (hi, share)."""
    share_hi = evaluate(hi)
    if share_hi < target:
        return hi, share_hi
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        share = evaluate(mid)
        if share >= target:
            hi, share_hi = mid, share
        else:
            lo = mid
    return hi, share_hi


def _threshold_option(wl: Workload, key: str, default):
    value = wl.options.get(key, default)
    return value if value == AUTO else float(value)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _compiled(wl: Workload, transformer: torch.nn.Module, prepared: Prepared, why_breaks: str) -> Prepared:
    prepared.denoiser = wl.compile(transformer, fullgraph=False)
    prepared.uncompiled = transformer
    prepared.config += f"; {wl.compile_note}"
    if wl.compiler != "none":
        prepared.config += f" (not fullgraph: {why_breaks})"
    return prepared


def _last_block_is_context_pre_only(transformer: torch.nn.Module) -> bool:
    blocks = getattr(transformer, "transformer_blocks", None)
    return bool(blocks) and bool(getattr(blocks[-1], "context_pre_only", False))


# ----------------------------------------------------------------------------- diffusers: FBC
def build_first_block_cache(wl: Workload) -> Prepared:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    t = _transformer_copy(wl)
    target = t
    note = ""
    if _last_block_is_context_pre_only(t):
        # SD3's last block returns no text stream (None); FBC's tail hook subtracts from it and
        # fails. Hook blocks 0..L-2 (FBC's tail = block L-2); the last block always runs.
        target = torch.nn.Module()
        target.transformer_blocks = torch.nn.ModuleList(list(t.transformer_blocks)[:-1])
        note = "; hooks on blocks 0..L-2 (SD3's last block returns no text stream, FBC's tail hook needs it)"
    apply_first_block_cache(target, FirstBlockCacheConfig(threshold=0.05))
    head = _hooks(t, "FBCHeadBlockHook")[0]
    counts = StepCounts()

    def callback(i, t_, x):
        counts.steps += 1
        counts.full += bool(head.state_manager.get_state().should_compute)

    prepared = Prepared(t, "", sample_context=_diffusers_context(t), callback=callback, counts=lambda: copy.copy(counts))
    threshold = _threshold_option(wl, "fbc_threshold", AUTO)
    tuned = ""
    if threshold == AUTO:
        target_share = wl.options.get("skip_target", 0.5)

        def evaluate(th: float) -> float:
            head.threshold = th
            return skip_share(_run_calibration(wl, prepared))

        threshold, share = auto_threshold(evaluate, target_share)
        tuned = f" (auto: skipped {share:.0%} of calibration steps, target {target_share:.0%})"
    head.threshold = threshold
    prepared.config = f"threshold={_fmt(threshold)}{tuned}{note}"
    prepared.info = lambda: {"threshold": threshold}
    return _compiled(wl, t, prepared, "hooks call torch.compiler.disable'd code")


# ----------------------------------------------------------------------------- diffusers: TaylorSeer
def build_taylorseer(wl: Workload, interval: int | None = None, lite: bool = False) -> Prepared:
    """diffusers' TaylorSeer hook (order 1).  ``lite``: diffusers' lite mode, which skips whole
    blocks and forecasts only the output projection (its patterns override ours)."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    t = _transformer_copy(wl)
    interval = int(wl.options.get("taylorseer_interval", 3)) if interval is None else interval
    before = min(3, max(1, wl.num_steps - 1))  # the library default (3), fewer on tiny runs
    patterns = dict(cache_identifiers=TAYLORSEER_IDENTIFIERS)
    what = "attn, ff, ff_context per block"
    if lite and _last_block_is_context_pre_only(t):
        # diffusers' lite mode records every block's outputs to return zeros of their shape, and
        # SD3's last block returns no text stream (None): lite mode fails on it. The same
        # recipe with explicit patterns: blocks 0..L-2 return zeros at forecast steps, proj_out
        # is forecast, the last block still runs (on zeros; its output is replaced anyway).
        last = len(t.transformer_blocks) - 1
        patterns = dict(skip_predict_identifiers=[rf"transformer_blocks\.({'|'.join(map(str, range(last)))})"],
                        cache_identifiers=[r"proj_out"])
        lite = False
        what = "lite recipe: blocks 0..L-2 skipped, proj_out forecast (diffusers' lite mode fails on SD3's last block)"
    elif lite:
        patterns = {}
        what = "lite mode: blocks skipped, proj_out forecast"
    config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before, max_order=1,
                                   taylor_factors_dtype=torch.float32, use_lite_mode=lite, **patterns)
    apply_taylorseer_cache(t, config)
    hooks = _hooks(t, "TaylorSeerCacheHook")
    if not hooks:
        raise SkipMethod(f"TaylorSeer cache_identifiers {TAYLORSEER_IDENTIFIERS} matched no module")
    probe = hooks[0]
    counts = StepCounts()

    def callback(i, t_, x):
        state = probe.state_manager.get_state()
        counts.steps += 1
        counts.full += state.last_update_step == state.current_step

    prepared = Prepared(t, (f"cache_interval={interval} disable_cache_before_step={before} max_order=1 "
                            f"factors=float32; {len(hooks)} modules ({what})"),
                        sample_context=_diffusers_context(t), callback=callback, counts=lambda: copy.copy(counts))
    return _compiled(wl, t, prepared, "hooks call torch.compiler.disable'd code")


# ----------------------------------------------------------------------------- diffusers: MagCache
def calibrate_mag_ratios(wl: Workload) -> list[float]:
    """MagCache's own calibration mode (``MagCacheConfig(calibrate=True)``) on the calibration
    seeds at the run's step count; the ratios of the seeds are averaged per step."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    t = _transformer_copy(wl)
    apply_mag_cache(t, MagCacheConfig(calibrate=True, num_inference_steps=wl.num_steps))
    head = _hooks(t, "MagCacheHeadHook")[0]
    context = _diffusers_context(t)
    runs: list[list[float]] = []
    for group in wl.calibration_groups:
        captured: list = []

        def callback(i, t_, x):
            if i == 0:  # the state's list object; replaced (not cleared) after the last step
                captured.append(head.state_manager.get_state().calibration_ratios)

        with context(), contextlib.redirect_stdout(io.StringIO()):  # calibration prints the ratios
            wl.run_group(t, group, callback)
        runs.append([float(r) for r in captured[0]])
    if not runs or any(len(r) != wl.num_steps for r in runs):
        raise SkipMethod("MagCache calibration did not record one ratio per step")
    return [sum(col) / len(col) for col in zip(*runs)]


def build_magcache(wl: Workload) -> Prepared:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = calibrate_mag_ratios(wl)
    threshold = float(wl.options.get("magcache_threshold", 0.06))
    max_skip = int(wl.options.get("magcache_max_skip", 3))
    t = _transformer_copy(wl)
    apply_mag_cache(t, MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, retention_ratio=0.2,
                                      num_inference_steps=wl.num_steps, mag_ratios=ratios))
    head = _hooks(t, "MagCacheHeadHook")[0]
    counts = StepCounts()

    def callback(i, t_, x):
        counts.steps += 1
        counts.full += bool(head.state_manager.get_state().should_compute)

    prepared = Prepared(t, (f"threshold={_fmt(threshold)} max_skip_steps={max_skip} retention_ratio=0.2; "
                            f"mag_ratios calibrated (calibrate=True) on {len(wl.calibration_groups)} other seeds"),
                        sample_context=_diffusers_context(t), callback=callback, counts=lambda: copy.copy(counts),
                        info=lambda: {"mag_ratios": [round(r, 5) for r in ratios]})
    return _compiled(wl, t, prepared, "MagCache's block hooks are torch.compiler.disable'd: blocks run eager")


# ----------------------------------------------------------------------------- cache-dit: DBCache
def _import_cache_dit():
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read at import: it logs every context
    try:
        import cache_dit
    except ImportError as exc:
        raise SkipMethod(f"cache-dit is not installed ({exc}); `pip install cache-dit` "
                         "(its hard deps are only packaging, pyyaml, torch, diffusers, transformers)") from exc
    return cache_dit


def quiet_cache_dit() -> contextlib.AbstractContextManager:
    import logging

    from .metrics import quiet_logs

    names = [n for n in logging.root.manager.loggerDict if n.startswith("cache_dit")]
    return quiet_logs(*names)


def build_dbcache(wl: Workload, calibrator: bool = False, skip_target: float | None = None) -> Prepared:
    """cache-dit's DBCache (F1B0).  ``calibrator``: with its TaylorSeer calibrator (order 1), its
    strongest documented setting: cached steps forecast the residual instead of reusing it."""
    cache_dit = _import_cache_dit()
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

    t = _transformer_copy(wl)
    warmup = min(8, max(1, wl.num_steps // 7))  # cache-dit's default is 8 (for 28-50 steps)

    # cache-dit 1.5.3's TaylorSeer calibrator reads the Bn residual: it needs Bn_compute_blocks >= 1
    back = 1 if calibrator else 0

    def config(threshold: float) -> DBCacheConfig:
        return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=back, residual_diff_threshold=threshold,
                             max_warmup_steps=warmup, num_inference_steps=wl.num_steps)

    current = {"config": config(0.08)}
    with quiet_cache_dit():
        cache_dit.enable_cache(
            BlockAdapter(transformer=t, blocks=t.transformer_blocks, forward_pattern=ForwardPattern.Pattern_1,
                         check_forward_pattern=True),
            cache_config=current["config"],
            calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=1) if calibrator else None)
    counts = StepCounts()

    @contextlib.contextmanager
    def context():
        with quiet_cache_dit():
            cache_dit.refresh_context(t, cache_config=copy.deepcopy(current["config"]))
        try:
            yield
        finally:
            with quiet_cache_dit():
                stats = cache_dit.summary(t, details=False, logging=False)
            cached = len(stats[0].cached_steps) if stats else 0
            counts.steps += wl.num_steps
            counts.full += wl.num_steps - cached

    prepared = Prepared(t, "", sample_context=context, counts=lambda: copy.copy(counts))
    threshold = _threshold_option(wl, "dbcache_threshold", AUTO)
    tuned = ""
    if threshold == AUTO:
        target_share = wl.options.get("skip_target", 0.5) if skip_target is None else skip_target

        def evaluate(th: float) -> float:
            current["config"] = config(th)
            return skip_share(_run_calibration(wl, prepared))

        threshold, share = auto_threshold(evaluate, target_share)
        tuned = f" (auto: skipped {share:.0%} of calibration steps, target {target_share:.0%})"
    current["config"] = config(threshold)
    prepared.config = (f"F1B{back} residual_diff_threshold={_fmt(threshold)}{tuned} max_warmup_steps={warmup}"
                       f"{' calibrator=TaylorSeer(order 1)' if calibrator else ''}; "
                       f"cache-dit {getattr(cache_dit, '__version__', '?')}")
    prepared.info = lambda: {"threshold": threshold}
    return _compiled(wl, t, prepared, "cache-dit's cached blocks break the graph")


def anchor_methods(taylorseer_intervals: tuple[int, ...] = (), fast_skip_target: float | None = None) -> list[Method]:
    """The anchor rows.  ``taylorseer_intervals``: extra diffusers-TaylorSeer rows (full and lite)
    at these intervals; ``fast_skip_target``: an extra DBCache+TaylorSeer row tuned to skip this
    share of steps (to reach our speeds where its knobs allow)."""
    methods = [
        Method("diffusers-firstblockcache", "diffusers-firstblockcache", "diffusers", build_first_block_cache),
        Method("diffusers-taylorseer", "diffusers-taylorseer", "diffusers", build_taylorseer),
        Method("diffusers-taylorseer-lite", "diffusers-taylorseer-lite", "diffusers",
               lambda wl: build_taylorseer(wl, lite=True)),
    ]
    for iv in taylorseer_intervals:
        methods += [
            Method("diffusers-taylorseer", f"diffusers-taylorseer interval={iv}", "diffusers",
                   lambda wl, iv=iv: build_taylorseer(wl, interval=iv)),
            Method("diffusers-taylorseer-lite", f"diffusers-taylorseer-lite interval={iv}", "diffusers",
                   lambda wl, iv=iv: build_taylorseer(wl, interval=iv, lite=True)),
        ]
    methods += [
        Method("diffusers-magcache", "diffusers-magcache", "diffusers", build_magcache),
        Method("cache-dit-dbcache", "cache-dit-dbcache", "cache-dit", build_dbcache),
        Method("cache-dit-dbcache-taylorseer", "cache-dit-dbcache-taylorseer", "cache-dit",
               lambda wl: build_dbcache(wl, calibrator=True)),
    ]
    if fast_skip_target is not None:
        methods.append(Method("cache-dit-dbcache-taylorseer", f"cache-dit-dbcache-taylorseer skip={fast_skip_target:g}",
                              "cache-dit", lambda wl: build_dbcache(wl, calibrator=True, skip_target=fast_skip_target)))
    return methods
