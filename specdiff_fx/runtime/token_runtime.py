"""Runtime of policy ``specdiff``: draft, token scores, C1/C2/C3 classes, partial steps.

Per call slot (cond/uncond calls made separately each get one) it owns the per-layer
K/V caches, a ring of the last three exit features (the token history), the importance
recorded at the last full step (``his``), the draft's importance by timestep (``fut``)
and how many steps each token has gone uncomputed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..buffers import RING, BufferRole, BufferSpec
from .draft import default_draft_plan, pipeline_draft_plan, timestep_scale
from .host_values import write_values
from ..variants import DRAFT, FORECAST, FULL, PARTIAL
from .runtime import CachingRuntime
from .scoring import future_importance, history_mix_weights

# how C3 tokens are composed: the paper's weighted history, or each token's own forecast
C3_MODES = ("history", "forecast")
_LINE_ROLES = (BufferRole.LINE_VALUE, BufferRole.LINE_SLOPE, BufferRole.LINE_STAMP)


def _alloc(spec: BufferSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)


class TokenSlot:
    """Buffers and token state of one call slot."""

    def __init__(self, record: Sequence[BufferSpec], partial: Sequence[BufferSpec],
                 forecast: Sequence[BufferSpec] = (), kv_horizon: float | None = None):
        specs = list(record) + list(partial) + list(forecast)
        self.kv = {s.name: _alloc(s) for s in list(record) + list(partial) if s.role == BufferRole.KV}
        hist = next(s for s in record if s.role == BufferRole.HISTORY)
        self.ring = [_alloc(hist) for _ in range(RING)]        # newest first
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
        # token lines (c3="forecast": each token's residual; kv_forecast: each K/V entry): value,
        # slope and stamp per line, by buffer name, updated by the variants themselves
        # (passes/token_lines.py) from ``line`` = [x, valid, horizon], written before each call
        self.lines = {s.name: _alloc(s) for s in specs if s.role in _LINE_ROLES}
        line = [s for s in specs if s.role == BufferRole.LINE]
        self.line = _alloc(line[0]) if line else None
        self.kv_horizon: float | None = kv_horizon   # K/V lines extrapolate at most this many steps

    def set_line(self, x: float, valid: bool) -> None:
        """Before a call of a variant with token lines: this step's position ``x``, whether the
        lines hold this trajectory's values (False on its first full step), and the K/V horizon."""
        horizon = math.inf if self.kv_horizon is None else float(self.kv_horizon)
        write_values(self.line, [x, 1.0 if valid else 0.0, horizon])

    def buffers_for(self, specs: Sequence[BufferSpec]) -> list[torch.Tensor]:
        """Buffers in the order of ``specs`` (a variant's, as its pass described them)."""
        by_role = {BufferRole.IMPORTANCE: self.importance,
                   BufferRole.HIS: self.his, BufferRole.FUT: self.fut_now, BufferRole.COUNT: self.count,
                   BufferRole.INDEX: self.index, BufferRole.REUSE_MASK: self.reuse_mask,
                   BufferRole.MIX_WEIGHTS: self.mix_weights, BufferRole.LINE: self.line}
        out = []
        for s in specs:
            if s.role == BufferRole.KV:
                out.append(self.kv[s.name])
            elif s.role in _LINE_ROLES:
                out.append(self.lines[s.name])
            elif s.role == BufferRole.HISTORY:
                # the record variant writes its one history input (ring 2); the partial variant
                # reads history_0..2 (newest first) and writes the oldest, ring 2
                out.append(self.ring[s.ring])
            else:
                out.append(by_role[s.role])
        return out

    def push_history(self, timestep: float) -> None:
        """The oldest ring entry was just overwritten with this step's features."""
        self.ring = [self.ring[-1]] + self.ring[:-1]
        self.ring_timesteps = [timestep] + self.ring_timesteps[:RING - 1]

    @property
    def nbytes(self) -> int:
        tensors = list(self.kv.values()) + self.ring + [self.importance, self.index, self.reuse_mask,
                                                        self.mix_weights, self.count]
        tensors += [*self.lines.values()] + ([self.line] if self.line is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())


class TokenRuntime(CachingRuntime):
    """SpecDiff: full+record, partial and draft variants chosen per call."""

    def __init__(
        self,
        *,
        record_specs: Sequence[BufferSpec],
        partial_specs: Sequence[BufferSpec],
        draft_specs: Sequence[BufferSpec],
        subset_size: int,
        forecast_specs: Sequence[BufferSpec] = (),
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
        self.c3 = c3
        self.kv_forecast, self.kv_horizon = kv_forecast, kv_horizon
        self.record_specs, self.partial_specs, self.draft_specs = list(record_specs), list(partial_specs), list(draft_specs)
        self.forecast_specs = list(forecast_specs)
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
            self.token_slots[index] = TokenSlot(self.record_specs, self.partial_specs, self.forecast_specs,
                                                kv_horizon=self.kv_horizon)
        return self.token_slots[index]

    # ------------------------------------------------------------------ steps
    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        slot = self.slot(event.slot)
        fresh_trajectory = slot.trajectory != event.trajectory
        if fresh_trajectory or self.schedule.is_full(event.step) or not slot.ring_timesteps:
            return self._full_step(args, event, slot, fresh_trajectory)
        if self.schedule.kind(event.step) == "cached" and FORECAST in self.variants:
            return self._forecast_step(args, event, slot)
        return self._partial_step(args, event, slot)

    def _full_step(self, args, event, slot: TokenSlot, fresh_trajectory: bool):
        if slot.line is not None:
            slot.set_line(float(event.step), valid=not fresh_trajectory)
        out = self.variants[FULL](*args, *slot.buffers_for(self.record_specs))
        slot.push_history(event.timestep)
        slot.his.copy_(slot.importance)
        slot.count.zero_()
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
        """The draft's timesteps (as the model receives them) and its update (runtime/draft.py)."""
        draft = None
        if self.draft_update is None and self.pipeline_clock is not None and self.clock_source == "pipeline":
            draft = self.pipeline_clock.draft(self.draft_steps)
        plan = pipeline_draft_plan(t0, draft)
        if plan is not None:
            return plan
        if self._timestep_scale is None:
            self._timestep_scale = timestep_scale(t0)
        return default_draft_plan(t0, self.draft_steps, self.draft_update, self._timestep_scale)

    def _partial_step(self, args, event, slot: TokenSlot):
        """The variant scores and picks the tokens itself (passes/token_select.py) from ``his``,
        ``fut`` and the counts, and writes its choice into ``index`` / ``reuse_mask``."""
        fut = future_importance(slot.fut[1:], event.timestep) if len(slot.fut) > 1 else None
        if fut is None:
            slot.fut_now.fill_(1.0)
        else:
            slot.fut_now.copy_(fut)
        if self.c3 == "forecast":
            # every token not computed takes its own forecast, which the variant computes from
            # its line (passes/token_lines.py), for C2 and C3 alike (C3 weights [1, 0, 0])
            slot.set_line(float(event.step), valid=True)
            write_values(slot.mix_weights, [1.0, 0.0, 0.0])
        else:
            write_values(slot.mix_weights, history_mix_weights(slot.ring_timesteps, event.timestep))
        out = self.variants[PARTIAL](*args, *slot.buffers_for(self.partial_specs))
        self._partial_calls += 1
        slot.push_history(event.timestep)
        index, reuse = slot.index, slot.reuse_mask
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
        slot.set_line(float(event.step), valid=True)
        out = self.variants[FORECAST](*args, *slot.buffers_for(self.forecast_specs))
        self._forecast_calls += 1
        slot.push_history(event.timestep)
        slot.count += 1
        return out, FORECAST, {"c1": 0, "c2": self.n, "c3": 0, "refresh_ratio": 0.0,
                                      "est_flops_saved": 1.0 - self.flops[FORECAST] / self.flops[FULL]
                                      if self.flops.get(FULL) and self.flops.get(FORECAST) else 1.0}

    def buffer_specs_for(self, variant: str) -> list[BufferSpec]:
        specs = {FULL: self.record_specs, PARTIAL: self.partial_specs, DRAFT: self.draft_specs,
                 FORECAST: self.forecast_specs}
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
