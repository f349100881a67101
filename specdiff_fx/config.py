"""Every knob of the backend, validated up front so bad values fail before dynamo runs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

CACHE_DTYPES = ("bfloat16", "float16", "float32")
POLICIES = ("off", "fora", "taylor", "specdiff")
# Schedule defaults per policy (warm-up full steps, interval, reset steps).
_SCHEDULE_DEFAULTS = {
    "off": (1, 1, ()),
    "fora": (2, 3, ()),
    # Measured on the reference model (specdiff-fx bench): see README "Results".
    "taylor": (3, 5, ()),
    # Measured on the reference model at 28 steps (examples/tune_specdiff.py): three warm-up
    # full steps and one reset mid-way keep PSNR ~29 dB at cache_ratio 0.7 with 4 full steps.
    "specdiff": (3, 1, (14,)),
}
COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class SpecDiffConfig:
    """Configuration of the specdiff backend.

    policy:        ``"off"`` (plain compile, step tracking only), ``"fora"`` (recompute every
                   residual branch at full steps, reuse every branch output in between),
                   ``"specdiff"`` (token-level: only the most important image tokens are
                   computed at partial steps; see docs/design.md), ``"taylor"`` (full steps
                   record finite differences, cached steps *forecast* as ``F + k·ΔF (+ k²/2·Δ²F)``;
                   with ``lite`` one residual per stream, else every branch).  Default:
                   ``"taylor"`` (lite): the best of our policies at about 3x on the reference
                   model (README, Results); see docs/forecasting.md.
    warmup_steps:  full steps at the start of each trajectory (default per policy).
    interval:      fora/taylor: after warm-up, one full step every ``interval`` steps (1 = all
                   full; 0 = no periodic full steps: warm-up and ``reset_steps`` only).
    reset_steps:   extra steps that are always full (default per policy).
    cache_ratio:   specdiff: share of image tokens *not* computed at partial steps
                   (C2 + C3); the computed subset has k = round((1 - cache_ratio) * N).
    c2_share:      specdiff: score-mass share of the lowest-scoring tokens that reuse
                   their last value as is (C2); the rest of the cached tokens mix history (C3).
    c3:            specdiff: how cached tokens other than C2 are composed: ``"history"`` (the
                   paper's weighted average of the last three outputs) or ``"forecast"``
                   (per-token linear extrapolation through the last two outputs).
    partial_every: specdiff with ``c3="forecast"``: every n-th step after a full step is partial
                   (computes the top tokens, which correct their forecast); the others compute
                   no token at all (every token forecast, blocks skipped).  1: all partial.
    kv_forecast:   specdiff with ``c3="forecast"``: keep each K/V cache entry as a line through
                   its last two computed values, so a partial step attends to the forecast
                   keys/values of the tokens it does not compute (the computed tokens write
                   their fresh ones over them and start a new line).  Off by default: on the
                   reference model it adds up to 1.3 dB but its per-entry updates are eager ops
                   that cost more than they save on CPU (docs/forecasting.md).
    kv_horizon:    specdiff with ``kv_forecast``: the most steps a K/V entry is extrapolated
                   (beyond it the entry holds its value at the horizon; None: no limit).
                   Default 1: measured on the reference model (docs/forecasting.md), longer
                   extrapolation of keys/values loses quality when full steps are far apart.
    score_lambda:  specdiff: λ in exp(λ · cached_count), the anti-starvation term.
    draft_steps:   specdiff: steps of the self-speculative draft (0 or 1 disables it).
    draft_update:  specdiff: ``f(x, model_output, t, t_next, scale) -> x_next`` advancing
                   the draft; default: Euler step of a velocity (flow-matching) model.
    importance_query_stride: specdiff: s > 1 estimates the attention each token receives
                   from one query in every s (jittered within each block of s, so no lattice
                   aliases with the image grid) at 1/s of the cost; 1 together with
                   ``importance_queries=None`` scores it exactly.
    importance_queries: specdiff: at most this many queries sampled per attention site; at
                   large sizes the stride grows to stay under it.  None: no cap.  Default 64:
                   on the reference model 16 queries per site keep PSNR within 0.3 dB of
                   exact importance (docs/scale.md, "Importance sampling"), and the record
                   step's cost stops growing with N².
    importance_sites: specdiff: score at most this many attention sites, spread evenly over
                   the stack.  None: every self/joint attention site.
    taylor_order:  taylor: 1 (default) or 2, the order of the Taylor terms recorded (2 keeps a
                   second difference, which ``newton`` and a fitted order-2 forecaster use).
    forecaster:    taylor: how cached steps weigh the recorded terms (runtime/forecasters.py):
                   ``"taylor"`` (default), ``"newton"`` (order 2), ``"hermite"`` (damped, option
                   ``sigma``) or ``"fitted"`` (per-step coefficients from
                   :func:`specdiff_fx.fit_forecaster`, option ``coefficients``).  Every choice
                   runs the same compiled graphs (docs/forecasting.md, "Forecasters").
    forecaster_options: taylor: the forecaster's options, e.g. ``{"sigma": 0.7}`` or
                   ``{"coefficients": {step: (a1, a2), ...}}``.
    forecast_variable: taylor: ``"step"`` (k counts steps) or ``"timestep"`` (k is the
                   timestep distance, following a sampler's uneven spacing).
    probe:         taylor: the cached-step graph still computes the first block and compares
                   it with its forecast: a forecast-error estimate per step in ``stats()``.
                   Per branch, every branch of that block; with ``lite``, the first block's
                   residual in each stream it writes (a chain of its own; docs/forecasting.md).
    tolerance:     taylor: when the probe's error estimate exceeds the threshold, the next step
                   is full (needs ``probe``; turned on with it).  ``None``: fixed schedule only.
    tolerance_growth: taylor: the threshold at step s is ``tolerance · (1 + tolerance_growth · s)``,
                   looser late in the trajectory, where a forecast error matters less (>= 0;
                   default 0: the same threshold at every step; needs ``tolerance``).
    lite:          taylor: forecast one residual per chain of blocks (``output − input`` of a
                   group of ``group_blocks`` consecutive blocks per stream; None: the whole
                   stack) instead of every branch: cached steps skip whole blocks.  Default
                   (None): on, unless the probe is asked for; then per branch.  ``lite=True``
                   with the probe computes the first block as a chain of its own.
    group_blocks:  taylor lite: blocks per forecast group (None: one group per stream).
    compiler:      ``"inductor"`` (default) or ``"eager"`` to run the rewritten graphs
                   uncompiled, for fast tests and debugging.
    cudagraphs:    replay each variant from a CUDA graph, captured once per cache slot with the
                   runtime's own buffers as static inputs (runtime/cuda_graphs.py). CUDA only:
                   a clear error where CUDA is unavailable.
    cache_dtype:   fora/taylor: hold branch caches and Taylor terms in ``"bfloat16"`` or
                   ``"float16"`` (None: the model's dtype); reads cast back, so only the stored
                   values are rounded.  Halves cache memory for an fp32 model.
    inductor_config: ``config_patches`` passed to Inductor's ``compile_fx``.
    timestep_input: substring naming the timestep input if it is not called ``timestep``.
    timestep_direction: ``"auto"`` (default: learned from the first move of the first
                   trajectory), ``"down"`` (the timestep falls along a trajectory, most
                   samplers) or ``"up"`` (it rises, e.g. Lumina2's ``1 − t/1000``).  Only the
                   raw path reads it: through compile_pipeline the pipeline says where
                   trajectories start.
    """

    policy: str = "taylor"
    warmup_steps: int | None = None
    interval: int | None = None
    reset_steps: tuple[int, ...] | None = None
    cache_ratio: float = 0.7
    c2_share: float = 0.3
    c3: str = "history"
    partial_every: int = 1
    kv_forecast: bool = False
    kv_horizon: float | None = 1.0
    score_lambda: float = 1.0
    draft_steps: int = 2
    draft_update: Callable | None = None
    importance_query_stride: int = 4
    importance_queries: int | None = 64
    importance_sites: int | None = None
    taylor_order: int = 1
    forecaster: str = "taylor"
    forecaster_options: dict = field(default_factory=dict)
    forecast_variable: str = "step"
    probe: bool = False
    lite: bool | None = None
    group_blocks: int | None = None
    tolerance: float | None = None
    tolerance_growth: float = 0.0
    compiler: str = "inductor"
    cudagraphs: bool = False
    cache_dtype: str | None = None
    inductor_config: dict = field(default_factory=dict)
    timestep_input: str | None = None
    timestep_direction: str = "auto"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"SpecDiffConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        warmup, interval, reset = _SCHEDULE_DEFAULTS[self.policy]
        for name, default in (("warmup_steps", warmup), ("interval", interval), ("reset_steps", reset)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.cudagraphs:
            import torch

            if not torch.cuda.is_available():
                raise ValueError("SpecDiffConfig(cudagraphs=True) needs a CUDA device; this machine has none "
                                 "(torch.cuda.is_available() is False). Leave cudagraphs off on CPU.")
        if self.cache_dtype is not None:
            if self.cache_dtype not in CACHE_DTYPES:
                raise ValueError(f"SpecDiffConfig.cache_dtype must be one of {CACHE_DTYPES} or None, "
                                 f"got {self.cache_dtype!r}")
            if self.policy not in ("fora", "taylor"):
                raise ValueError("SpecDiffConfig.cache_dtype applies to the fora and taylor caches; "
                                 f"policy {self.policy!r} keeps its caches in the model's dtype")
        if self.compiler not in COMPILERS:
            raise ValueError(f"SpecDiffConfig.compiler must be one of {COMPILERS}, got {self.compiler!r}")
        for name in ("warmup_steps", "interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"SpecDiffConfig.{name} must be an int, got {value!r}")
        if self.warmup_steps < 1:
            raise ValueError(
                f"SpecDiffConfig.warmup_steps must be >= 1 (step 0 fills the caches), got {self.warmup_steps}"
            )
        if self.interval < 0:
            raise ValueError(f"SpecDiffConfig.interval must be >= 0 (0: warm-up and reset steps only), "
                             f"got {self.interval}")
        reset = tuple(self.reset_steps)
        if any(not isinstance(s, int) or s < 0 for s in reset):
            raise ValueError(f"SpecDiffConfig.reset_steps must be non-negative ints, got {self.reset_steps!r}")
        object.__setattr__(self, "reset_steps", reset)
        if not isinstance(self.cache_ratio, (int, float)) or not 0.0 <= float(self.cache_ratio) < 1.0:
            raise ValueError(f"SpecDiffConfig.cache_ratio must be in [0, 1), got {self.cache_ratio!r}")
        if not isinstance(self.c2_share, (int, float)) or not 0.0 <= float(self.c2_share) < 1.0:
            raise ValueError(f"SpecDiffConfig.c2_share must be in [0, 1), got {self.c2_share!r}")
        if self.timestep_direction not in ("auto", "down", "up"):
            raise ValueError("SpecDiffConfig.timestep_direction must be 'auto', 'down' or 'up', "
                             f"got {self.timestep_direction!r}")
        if self.c3 not in ("history", "forecast"):
            raise ValueError(f"SpecDiffConfig.c3 must be 'history' or 'forecast', got {self.c3!r}")
        if not isinstance(self.partial_every, int) or isinstance(self.partial_every, bool) or self.partial_every < 1:
            raise ValueError(f"SpecDiffConfig.partial_every must be an int >= 1, got {self.partial_every!r}")
        if self.partial_every > 1 and self.c3 != "forecast":
            raise ValueError("SpecDiffConfig.partial_every > 1 makes steps where no token is computed; "
                             "they need c3='forecast'")
        if self.kv_forecast and self.c3 != "forecast":
            raise ValueError("SpecDiffConfig.kv_forecast forecasts keys/values alongside the tokens' own "
                             "forecast; it needs c3='forecast'")
        if self.kv_horizon is not None and (not isinstance(self.kv_horizon, (int, float)) or self.kv_horizon <= 0):
            raise ValueError(f"SpecDiffConfig.kv_horizon must be > 0 or None, got {self.kv_horizon!r}")
        if not isinstance(self.score_lambda, (int, float)) or self.score_lambda < 0:
            raise ValueError(f"SpecDiffConfig.score_lambda must be >= 0, got {self.score_lambda!r}")
        if not isinstance(self.draft_steps, int) or self.draft_steps < 0:
            raise ValueError(f"SpecDiffConfig.draft_steps must be an int >= 0, got {self.draft_steps!r}")
        if not isinstance(self.importance_query_stride, int) or self.importance_query_stride < 1:
            raise ValueError(
                f"SpecDiffConfig.importance_query_stride must be an int >= 1, got {self.importance_query_stride!r}")
        for name in ("importance_queries", "importance_sites"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"SpecDiffConfig.{name} must be an int >= 1 or None, got {value!r}")
        if self.taylor_order not in (1, 2):
            raise ValueError(f"SpecDiffConfig.taylor_order must be 1 or 2, got {self.taylor_order!r}")
        self._check_forecaster()
        if self.forecast_variable not in ("step", "timestep"):
            raise ValueError(
                f"SpecDiffConfig.forecast_variable must be 'step' or 'timestep', got {self.forecast_variable!r}")
        if self.tolerance is not None:
            if not isinstance(self.tolerance, (int, float)) or isinstance(self.tolerance, bool) \
                    or not self.tolerance > 0:
                raise ValueError(f"SpecDiffConfig.tolerance must be a number > 0 or None, got {self.tolerance!r}")
            object.__setattr__(self, "probe", True)  # the tolerance is checked against the probe
        if not isinstance(self.tolerance_growth, (int, float)) or isinstance(self.tolerance_growth, bool) \
                or not self.tolerance_growth >= 0 or self.tolerance_growth == float("inf"):
            raise ValueError(f"SpecDiffConfig.tolerance_growth must be a finite number >= 0, "
                             f"got {self.tolerance_growth!r}")
        if self.tolerance_growth and self.tolerance is None:
            raise ValueError("SpecDiffConfig.tolerance_growth scales the tolerance; set tolerance too")
        if self.group_blocks is not None and (not isinstance(self.group_blocks, int) or self.group_blocks < 1):
            raise ValueError(f"SpecDiffConfig.group_blocks must be an int >= 1 or None, got {self.group_blocks!r}")
        if self.lite is None:
            object.__setattr__(self, "lite", not self.probe)
        if not isinstance(self.lite, bool):
            raise TypeError(f"SpecDiffConfig.lite must be a bool or None, got {self.lite!r}")
        if not isinstance(self.probe, bool):
            raise TypeError(f"SpecDiffConfig.probe must be a bool, got {self.probe!r}")
        if self.draft_update is not None and not callable(self.draft_update):
            raise TypeError("SpecDiffConfig.draft_update must be callable")
        if not isinstance(self.inductor_config, dict):
            raise TypeError("SpecDiffConfig.inductor_config must be a dict of Inductor config patches")

    def _check_forecaster(self) -> None:
        from .runtime.forecasters import FORECASTERS

        if self.forecaster not in FORECASTERS:
            raise ValueError(f"SpecDiffConfig.forecaster must be one of {sorted(FORECASTERS)}, got {self.forecaster!r}")
        need = FORECASTERS[self.forecaster].min_order
        if need > self.taylor_order:
            raise ValueError(f"SpecDiffConfig.forecaster={self.forecaster!r} reads the second difference: "
                             f"set taylor_order={need}")
        options = self.forecaster_options
        if not isinstance(options, dict):
            raise TypeError(f"SpecDiffConfig.forecaster_options must be a dict, got {options!r}")
        allowed = FORECASTERS[self.forecaster].options
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"SpecDiffConfig.forecaster_options {sorted(unknown)} do not apply to forecaster "
                             f"{self.forecaster!r} (it takes {sorted(allowed) or 'none'})")
        if "sigma" in options:
            sigma = options["sigma"]
            if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma <= 2:
                raise ValueError(f"SpecDiffConfig.forecaster_options['sigma'] must be in (0, 2], got {sigma!r}")
        if self.forecaster == "fitted":
            table = options.get("coefficients")
            if not isinstance(table, dict) or not table:
                raise ValueError("SpecDiffConfig.forecaster='fitted' needs forecaster_options={'coefficients': "
                                 "{step: (a1, a2)}} (from specdiff_fx.fit_forecaster)")
            try:  # JSON turns the step keys into strings
                clean = {int(step): (float(a[0]), float(a[1])) for step, a in table.items()}
            except (TypeError, ValueError, IndexError) as exc:
                raise ValueError("SpecDiffConfig.forecaster_options['coefficients'] must map step -> (a1, a2), "
                                 f"got {table!r}") from exc
            object.__setattr__(self, "forecaster_options", dict(options, coefficients=clean))

    def replace(self, **changes) -> "SpecDiffConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown SpecDiffConfig field(s): {sorted(unknown)}")
        if "lite" not in changes and not self.probe and ("probe" in changes or "tolerance" in changes):
            changes["lite"] = None  # re-resolved: a probe asked for now turns it off
        if "policy" in changes:  # schedule fields not given follow the new policy's defaults
            for name in ("warmup_steps", "interval", "reset_steps"):
                changes.setdefault(name, None)
        return replace(self, **changes)
