"""Runtime of policy ``specdiff``: draft, token scores, C1/C2/C3 classes, partial steps.

Per call slot (cond/uncond calls made separately each get one) it owns the per-layer
K/V caches, a ring of the last three exit features (the token history), the importance
recorded at the last full step (``his``), the draft's importance by timestep (``fut``)
and how many steps each token has gone uncomputed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..buffers import BufferRole, BufferSpec
from .host_values import write_values
from .runtime import FULL, SpecDiffRuntime
from .scoring import (
    draft_timesteps,
    future_importance,
    history_mix_weights,
)

PARTIAL = "partial"
DRAFT = "draft"
FORECAST_TOKENS = "forecast"
# how C3 tokens are composed: the paper's weighted history, or each token's own forecast
C3_MODES = ("history", "forecast")
# the buffers the token forecast variant takes (the partial variant's, nothing else)
_FORECAST_ROLES = (BufferRole.MIX_WEIGHTS, BufferRole.HISTORY)


def flow_matching_update(x: torch.Tensor, model_output: torch.Tensor, t: float, t_next: float,
                         scale: float) -> torch.Tensor:
    """Euler step of a velocity (rectified-flow) model: x + (t_next - t) / scale * v.

    If the model predicts more channels than the latent has (learned variance), the
    first ones are taken as the prediction.
    """
    v = model_output[:, : x.shape[1]] if model_output.shape[1] != x.shape[1] else model_output
    return x + (t_next - t) / scale * v.to(x.dtype)


def _prediction_for(x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The part of a model output a sampler steps with (learned-variance models predict more
    channels than the latent has: the first ones are the prediction)."""
    if model_output.shape != x.shape and model_output.dim() == x.dim() and model_output.shape[1] > x.shape[1]:
        model_output = model_output[:, : x.shape[1]]
    return model_output.to(x.dtype)


def _alloc(spec: BufferSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)


class TokenSlot:
    """Buffers and token state of one call slot."""

    def __init__(self, record: Sequence[BufferSpec], partial: Sequence[BufferSpec], draft: Sequence[BufferSpec],
                 kv_horizon: float | None = None):
        self.kv = {s.name: _alloc(s) for s in list(record) + list(partial) if s.role == BufferRole.KV}
        hist = next(s for s in record if s.role == BufferRole.HISTORY)
        self.ring = [_alloc(hist) for _ in range(3)]           # newest first
        self.ring_timesteps: list[float] = []
        self.importance = _alloc(next(s for s in record if s.role == BufferRole.IMPORTANCE))
        by_role = {s.role: s for s in partial}
        self.index = _alloc(by_role[BufferRole.INDEX])
        self.reuse_mask = _alloc(by_role[BufferRole.REUSE_MASK])
        self.mix_weights = _alloc(by_role[BufferRole.MIX_WEIGHTS])
        self.count = torch.zeros(self.importance.shape, dtype=torch.long, device=self.importance.device)
        # importance the partial variant selects from (stable buffers: copied into, never rebound)
        self.his = torch.zeros(self.importance.shape, dtype=torch.float32, device=self.importance.device)
        self.fut_now = torch.ones_like(self.his)
        self.fut: list[tuple[float, torch.Tensor]] = []
        self.trajectory: int | None = None
        # c3="forecast": per-token Taylor terms of each token's residual over the blocks
        # (exit − entry; the variants write the entry features here) and each token's stamp
        entry = [s for s in record if s.role == BufferRole.ENTRY]
        self.entry = _alloc(entry[0]) if entry else None
        self.value: torch.Tensor | None = None      # F: last computed value per token
        self.slope: torch.Tensor | None = None      # D1 per token (per step of position)
        self.stamp: torch.Tensor | None = None      # position where each token was computed
        # kv_forecast: each K/V cache entry is a line through its last two computed values,
        # with its own stamp; a partial step attends to the forecast keys/values of the tokens
        # it does not compute, and the entries it computes start a new line
        self.kv_value: dict[str, torch.Tensor] = {}
        self.kv_slope: dict[str, torch.Tensor] = {}
        self.kv_stamp: dict[str, torch.Tensor] = {}
        self.kv_horizon: float | None = kv_horizon   # extrapolate at most this many steps

    def record_kv(self, x: float) -> None:
        """After a full step wrote every cache entry: each entry's new base and slope."""
        if not self.kv_value:
            self.kv_value = {name: kv.clone() for name, kv in self.kv.items()}
            self.kv_slope = {name: torch.zeros_like(kv) for name, kv in self.kv.items()}
            self.kv_stamp = {name: torch.full_like(kv, x) for name, kv in self.kv.items()}
            return
        for name, kv in self.kv.items():
            dist = (x - self.kv_stamp[name]).clamp_min_(1e-6)
            torch.sub(kv, self.kv_value[name], out=self.kv_slope[name]).div_(dist)
            self.kv_value[name].copy_(kv)
            self.kv_stamp[name].fill_(x)

    def _kv_distance(self, name: str, x: float) -> torch.Tensor:
        dist = x - self.kv_stamp[name]
        return dist if self.kv_horizon is None else dist.clamp_max(float(self.kv_horizon))

    def forecast_kv(self, x: float) -> None:
        """Before a partial step: every cache entry holds its forecast at ``x``; the variant then
        writes the keys/values of the tokens it computes over theirs (token_ops.complete_kv)."""
        for name, kv in self.kv.items():
            torch.addcmul(self.kv_value[name], self._kv_distance(name, x), self.kv_slope[name], out=kv)

    def rebase_kv(self, x: float) -> None:
        """After a partial step: the entries the variant wrote (computed tokens, text tokens)
        differ from the forecast left there; they start a new line at ``x``."""
        for name, kv in self.kv.items():
            value, slope, stamp = self.kv_value[name], self.kv_slope[name], self.kv_stamp[name]
            fresh = kv != torch.addcmul(value, self._kv_distance(name, x), slope)
            dist = x - stamp
            slope.copy_(torch.where(fresh, (kv - value) / dist.clamp_min(1e-6), slope))
            value.copy_(torch.where(fresh, kv, value))
            stamp.masked_fill_(fresh, x)

    def forecast_into(self, target: torch.Tensor, x: float) -> None:
        """Write every token's forecast ``F + (x − stamp)·D1`` into ``target``."""
        k = (x - self.stamp).unsqueeze(-1).to(self.value.dtype)
        torch.addcmul(self.value, k, self.slope, out=target)

    def residual(self, exit_features: torch.Tensor) -> torch.Tensor:
        return exit_features if self.entry is None else exit_features - self.entry

    def record_all(self, exit_features: torch.Tensor, x: float) -> None:
        """A full step computed every token: re-base all of them (their own distances)."""
        exit_features = self.residual(exit_features)
        if self.value is None:
            self.value = exit_features.clone()
            self.slope = torch.zeros_like(exit_features)
            self.stamp = torch.full(exit_features.shape[:2], x, device=exit_features.device)
            return
        dist = (x - self.stamp).clamp_min(1e-6).unsqueeze(-1).to(exit_features.dtype)
        torch.div(exit_features - self.value, dist, out=self.slope)
        self.value.copy_(exit_features)
        self.stamp.fill_(x)

    def record_subset(self, exit_features: torch.Tensor, index: torch.Tensor, x: float) -> None:
        """A partial step computed the tokens ``index`` (B, k): they correct their forecast
        and start a new line from their fresh value, at their own step stamp."""
        rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
        fresh = exit_features[rows, index]
        if self.entry is not None:
            fresh = fresh - self.entry[rows, index]
        dist = (x - self.stamp[rows, index]).clamp_min(1e-6).unsqueeze(-1).to(fresh.dtype)
        self.slope[rows, index] = (fresh - self.value[rows, index]) / dist
        self.value[rows, index] = fresh
        self.stamp[rows, index] = x

    def buffers_for(self, specs: Sequence[BufferSpec], forecast: bool = False) -> list[torch.Tensor]:
        """Buffers in the order of ``specs``; ``forecast``: the token forecast variant's
        (the partial variant's weights and history ring, nothing else)."""
        if forecast:
            specs = [s for s in specs if s.role in _FORECAST_ROLES]
        by_role = {BufferRole.IMPORTANCE: self.importance, BufferRole.ENTRY: self.entry,
                   BufferRole.HIS: self.his, BufferRole.FUT: self.fut_now, BufferRole.COUNT: self.count,
                   BufferRole.INDEX: self.index, BufferRole.REUSE_MASK: self.reuse_mask,
                   BufferRole.MIX_WEIGHTS: self.mix_weights}
        out = []
        for s in specs:
            if s.role == BufferRole.KV:
                out.append(self.kv[s.name])
            elif s.role == BufferRole.HISTORY:
                # the record variant writes its one history input (ring 2); the partial variant
                # reads history_0..2 (newest first) and writes the oldest, ring 2
                out.append(self.ring[s.ring])
            else:
                out.append(by_role[s.role])
        return out

    def push_history(self, timestep: float) -> None:
        """The oldest ring entry was just overwritten with this step's features."""
        self.ring = [self.ring[2], self.ring[0], self.ring[1]]
        self.ring_timesteps = [timestep] + self.ring_timesteps[:2]

    @property
    def nbytes(self) -> int:
        tensors = list(self.kv.values()) + self.ring + [self.importance, self.index, self.reuse_mask,
                                                        self.mix_weights, self.count]
        tensors += [*self.kv_value.values(), *self.kv_slope.values(), *self.kv_stamp.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())


class TokenRuntime(SpecDiffRuntime):
    """SpecDiff: full+record, partial and draft variants chosen per call."""

    RUNS_AT = {FULL: "full steps (record)", PARTIAL: "partial steps (k tokens computed)", DRAFT: "draft trajectory",
               FORECAST_TOKENS: "forecast steps between partial steps (no token computed)"}

    def __init__(
        self,
        *,
        record_specs: Sequence[BufferSpec],
        partial_specs: Sequence[BufferSpec],
        draft_specs: Sequence[BufferSpec],
        subset_size: int,
        num_tokens: int,
        c2_share: float,
        score_lambda: float,
        draft_steps: int,
        draft_update: Callable | None = None,
        flops: dict | None = None,
        c3: str = "history",
        kv_forecast: bool = False,
        kv_horizon: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if c3 not in C3_MODES:
            raise ValueError(f"c3 must be one of {C3_MODES}, got {c3!r}")
        self.c3 = c3
        self.kv_forecast, self.kv_horizon = kv_forecast, kv_horizon
        self.record_specs, self.partial_specs, self.draft_specs = list(record_specs), list(partial_specs), list(draft_specs)
        self.k, self.n = subset_size, num_tokens
        self.c2_share, self.lam = c2_share, score_lambda
        self.draft_steps = draft_steps if self.latent_index is not None else 0
        self.draft_update = draft_update  # None: the pipeline's sampler, else flow matching
        self.flops = dict(flops or {})

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        super()._init_state()
        self.token_slots: dict[int, TokenSlot] = {}
        self._timestep_scale: float | None = None

    def _drop_caches(self) -> None:
        self.token_slots.clear()

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self._draft_calls = 0
        self._partial_calls = 0
        self._forecast_calls = 0

    def slot(self, index: int) -> TokenSlot:
        """The state of call slot ``index`` (made on first use): its buffers and token history."""
        if index not in self.token_slots:
            self.token_slots[index] = TokenSlot(self.record_specs, self.partial_specs, self.draft_specs,
                                                kv_horizon=self.kv_horizon)
        return self.token_slots[index]

    # ------------------------------------------------------------------ steps
    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        slot = self.slot(event.slot)
        fresh_trajectory = slot.trajectory != event.trajectory
        if fresh_trajectory or self.schedule.is_full(event.step) or not slot.ring_timesteps:
            return self._full_step(args, event, slot, fresh_trajectory)
        if self.schedule.kind(event.step) == "cached" and FORECAST_TOKENS in self.variants:
            return self._forecast_step(args, event, slot)
        return self._partial_step(args, event, slot)

    def _full_step(self, args, event, slot: TokenSlot, fresh_trajectory: bool):
        out = self.variants[FULL](*args, *slot.buffers_for(self.record_specs))
        slot.push_history(event.timestep)
        slot.his.copy_(slot.importance)
        slot.count.zero_()
        if fresh_trajectory:
            slot.value = slot.slope = slot.stamp = None
            slot.kv_value, slot.kv_slope, slot.kv_stamp = {}, {}, {}
        if self.c3 == "forecast":
            slot.record_all(slot.ring[0], float(event.step))
        if self.kv_forecast:
            slot.record_kv(float(event.step))
        if fresh_trajectory:
            slot.trajectory = event.trajectory
            slot.ring_timesteps = [event.timestep]
            slot.fut = [(event.timestep, slot.his.clone())]
            self._run_draft(args, out, event.timestep, slot)
        return out, FULL, {"c1": self.n, "c2": 0, "c3": 0, "est_flops_saved": 0.0}

    def _run_draft(self, args, first_out, t0: float, slot: TokenSlot) -> None:
        """Speculate a short trajectory with the same model; step 0 is the main step 0.

        It advances with the pipeline's own sampler where the pipeline's clock lends one
        (runtime/pipeline_clock.py), else with ``draft_update`` (default: a flow-matching Euler
        step).  The draft variant is compiled for contiguous latents and timestep, and gets
        them so, whatever strides the pipeline passes (``t.expand(B)`` has stride 0)."""
        if self.draft_steps < 2 or DRAFT not in self.variants:
            return
        plan = self._draft_plan(t0)
        if plan is None:
            return
        ts, advance = plan
        x = args[self.latent_index]
        prediction = first_out[0] if isinstance(first_out, (tuple, list)) else first_out
        t_arg = args[self.timestep_index]
        for j in range(1, len(ts)):
            x = advance(x, prediction, j - 1).contiguous()
            draft_args = list(args)
            draft_args[self.latent_index] = x
            draft_args[self.timestep_index] = (torch.full(t_arg.shape, ts[j], dtype=t_arg.dtype, device=t_arg.device)
                                               if isinstance(t_arg, torch.Tensor) else ts[j])
            out = self.variants[DRAFT](*draft_args, *slot.buffers_for(self.draft_specs))
            prediction = out[0] if isinstance(out, (tuple, list)) else out
            slot.fut.append((ts[j], slot.importance.clone()))
            self._draft_calls += 1

    def _draft_plan(self, t0: float):
        """The draft's timesteps (as the model receives them) and its update."""
        draft = None
        if self.draft_update is None and self.pipeline_clock is not None and self._source == "pipeline":
            draft = self.pipeline_clock.draft(self.draft_steps)
        if draft is not None and len(draft.timesteps) > 1:
            first = draft.timesteps[0]
            # model units per scheduler unit (FLUX passes t / 1000); a trajectory at 0 (inverted
            # sigmas) starts at 0 in both
            scale = t0 / first if first != 0 and t0 != 0 else 1.0 if first == t0 else None
            if scale is not None:
                ts = [t0] + [scale * t for t in draft.timesteps[1:]]
                return ts, lambda x, pred, i: draft.advance(x, _prediction_for(x, pred), i)
        if self._timestep_scale is None:
            self._timestep_scale = 1000.0 if t0 > 1.5 else 1.0
        ts = draft_timesteps(t0, self.draft_steps)
        update = self.draft_update or flow_matching_update
        return ts, lambda x, pred, i: update(x, pred, ts[i], ts[i + 1], self._timestep_scale)

    def _partial_step(self, args, event, slot: TokenSlot):
        """The variant scores and picks the tokens itself (passes/token_select.py) from ``his``,
        ``fut`` and the counts, and writes its choice into ``index`` / ``reuse_mask``."""
        fut = future_importance(slot.fut[1:], event.timestep) if len(slot.fut) > 1 else None
        if fut is None:
            slot.fut_now.fill_(1.0)
        else:
            slot.fut_now.copy_(fut)
        if self.c3 == "forecast":
            # every token not computed takes its own forecast, written into history_0, which
            # C2 reads as is and C3 reads with weights [1, 0, 0]
            slot.forecast_into(slot.ring[0], float(event.step))
            write_values(slot.mix_weights, [1.0, 0.0, 0.0])
            if self.kv_forecast:
                slot.forecast_kv(float(event.step))
        else:
            write_values(slot.mix_weights, history_mix_weights(slot.ring_timesteps, event.timestep))
        out = self.variants[PARTIAL](*args, *slot.buffers_for(self.partial_specs))
        if self.kv_forecast:
            slot.rebase_kv(float(event.step))
        self._partial_calls += 1
        slot.push_history(event.timestep)
        index, reuse = slot.index, slot.reuse_mask
        if self.c3 == "forecast":
            slot.record_subset(slot.ring[0], index, float(event.step))
        # counts stay tensors until stats() is read: no device sync per step
        c2 = reuse.sum() / index.shape[0]
        details = {
            "c1": self.k, "c2": c2, "c3": self.n - self.k - c2,
            "refresh_ratio": self.k / self.n,
            "est_flops_saved": 1.0 - self.flops[PARTIAL] / self.flops[FULL]
            if self.flops.get(FULL) and self.flops.get(PARTIAL) else 1.0 - self.k / self.n,
        }
        return out, PARTIAL, details

    def _forecast_step(self, args, event, slot: TokenSlot):
        """No token computed: every token's own forecast, blocks skipped (token forecast variant)."""
        slot.forecast_into(slot.ring[0], float(event.step))
        write_values(slot.mix_weights, [1.0, 0.0, 0.0])
        out = self.variants[FORECAST_TOKENS](*args, *slot.buffers_for(self.partial_specs, forecast=True))
        self._forecast_calls += 1
        slot.push_history(event.timestep)
        slot.count += 1
        return out, FORECAST_TOKENS, {"c1": 0, "c2": self.n, "c3": 0, "refresh_ratio": 0.0,
                                      "est_flops_saved": 1.0 - self.flops[FORECAST_TOKENS] / self.flops[FULL]
                                      if self.flops.get(FULL) and self.flops.get(FORECAST_TOKENS) else 1.0}

    def buffer_specs_for(self, variant: str) -> list[BufferSpec]:
        if variant == FORECAST_TOKENS and variant in self.variants:
            return [s for s in self.partial_specs if s.role in _FORECAST_ROLES]
        specs = {FULL: self.record_specs, PARTIAL: self.partial_specs, DRAFT: self.draft_specs}
        if variant not in self.variants:
            raise KeyError(f"no variant {variant!r}; have {sorted(self.variants)}")
        return list(specs[variant])

    # ------------------------------------------------------------------ stats
    def _extra_stats(self) -> dict:
        slots = list(self.token_slots.values())
        return {
            "draft_steps": self._draft_calls,
            "c3": self.c3,
            "kv_forecast": self.kv_forecast,
            "kv_horizon": self.kv_horizon,
            "partial_steps": self._partial_calls,
            "forecast_steps": self._forecast_calls,
            "image_tokens": self.n,
            "subset_tokens": self.k,
            "cache_slots": len(slots),
            "cache_bytes": sum(s.nbytes for s in slots),
            "kv_cache_bytes": sum(s.kv_bytes for s in slots),
            "flops": dict(self.flops),
        }
