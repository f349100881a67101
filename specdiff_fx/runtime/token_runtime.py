"""Runtime of policy ``specdiff``: draft, token scores, C1/C2/C3 classes, partial steps.

Per call slot (cond/uncond calls made separately each get one; runtime/slots.py) it owns the
per-layer K/V caches, a ring of the last three exit features (the token history), the
importance recorded at the last full step (``his``), the draft's importance by timestep
(``fut``) and how many steps each token has gone uncomputed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..buffers import RING, BufferRole, BufferSpec
from ..variants import DRAFT, FORECAST, FULL, PARTIAL
from .draft import default_draft_plan, pipeline_draft_plan, timestep_scale
from .host_values import write_values
from .runtime import CachingRuntime
from .scoring import future_importance, history_mix_weights
from .slots import SlotState

# how C3 tokens are composed: the paper's weighted history, or each token's own forecast
C3_MODES = ("history", "forecast")


class TokenSlotState:
    """What a call slot keeps for specdiff beyond its buffers (``SlotState.policy_state``): the
    timesteps of the history ring's entries (newest first) and the draft's importance by
    timestep (``fut``: the first entry is the trajectory's first full step)."""

    def __init__(self) -> None:
        self.ring_timesteps: list[float] = []
        self.fut: list[tuple[float, torch.Tensor]] = []


class TokenRuntime(CachingRuntime):
    """SpecDiff: full+record, partial and draft variants chosen per call.

    Per call slot (runtime/slots.py) the variants' buffers (K/V caches, the history ring,
    importance, ``his``/``fut``/``count``, token lines) and a :class:`TokenSlotState`."""

    slot_state = TokenSlotState

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
        specs = {FULL: self.record_specs, PARTIAL: self.partial_specs, DRAFT: self.draft_specs,
                 FORECAST: self.forecast_specs}
        self._variant_specs = {name: specs[name] for name in self.variants if name in specs}
        # the buffers this runtime reads or writes itself, found by their spec's role
        roles: dict[BufferRole, BufferSpec] = {}
        for spec in self.record_specs + self.partial_specs + self.forecast_specs:
            roles.setdefault(spec.role, spec)
        self._importance = roles[BufferRole.IMPORTANCE]
        # the partial variant's selection inputs; as the importance's layout where it takes none
        shape, device = self._importance.shape, self._importance.device
        self._his = roles.get(BufferRole.HIS) or BufferSpec("specdiff_his", BufferRole.HIS, shape, torch.float32, device)
        self._fut = roles.get(BufferRole.FUT) or BufferSpec("specdiff_fut", BufferRole.FUT, shape, torch.float32, device)
        self._count = roles.get(BufferRole.COUNT) or BufferSpec("specdiff_count", BufferRole.COUNT, shape, torch.long,
                                                                device)
        self._index, self._reuse_mask = roles[BufferRole.INDEX], roles[BufferRole.REUSE_MASK]
        self._mix_weights = roles[BufferRole.MIX_WEIGHTS]
        self._line = roles.get(BufferRole.LINE)  # [x, valid, horizon] of the token lines, if any
        self.k, self.n = subset_size, num_tokens
        self.c2_share, self.lam = c2_share, score_lambda
        self.draft_steps = draft_steps if self.latent_index is not None else 0
        self.draft_update = draft_update  # None: the pipeline's sampler, else flow matching
        self.flops = dict(flops or {})

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        super()._init_state()
        self._timestep_scale: float | None = None

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self._draft_calls = 0
        self._partial_calls = 0
        self._forecast_calls = 0

    def _set_line(self, slot: SlotState, x: float, valid: bool) -> None:
        """Before a call of a variant with token lines: this step's position ``x``, whether the
        lines hold this trajectory's values (False on its first full step), and the K/V horizon
        (K/V lines extrapolate at most this many steps)."""
        horizon = math.inf if self.kv_horizon is None else float(self.kv_horizon)
        write_values(slot.buffer(self._line), [x, 1.0 if valid else 0.0, horizon])

    @staticmethod
    def _push_history(slot: SlotState, timestep: float) -> None:
        """The oldest ring entry was just overwritten with this step's features."""
        slot.rotate_rings()
        state: TokenSlotState = slot.policy_state
        state.ring_timesteps = [timestep] + state.ring_timesteps[:RING - 1]

    # ------------------------------------------------------------------ steps
    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        slot = self.slots[event.slot]
        fresh_trajectory = not slot.valid_for(event.trajectory)
        if fresh_trajectory:
            slot.invalidate()  # another trajectory's ring timesteps and draft: start afresh
        progress, previous = self._progress(event)
        if (fresh_trajectory or self.schedule.is_full(event.step, progress, previous)
                or not slot.policy_state.ring_timesteps):
            return self._full_step(args, event, slot, fresh_trajectory)
        since_full = event.step - slot.step if slot.step is not None else None
        if self.schedule.kind(event.step, progress, previous, since_full) == "cached" and FORECAST in self.variants:
            return self._forecast_step(args, event, slot)
        return self._partial_step(args, event, slot)

    def _full_step(self, args, event, slot: SlotState, fresh_trajectory: bool):
        if self._line is not None:
            self._set_line(slot, float(event.step), valid=not fresh_trajectory)
        out = self.variants[FULL](*args, *slot.buffers(self.record_specs))
        self._push_history(slot, event.timestep)
        his = slot.buffer(self._his)
        his.copy_(slot.buffer(self._importance))
        slot.buffer(self._count).zero_()
        slot.stamp(event.trajectory, event.step)
        if fresh_trajectory:
            state: TokenSlotState = slot.policy_state
            state.ring_timesteps = [event.timestep]
            state.fut = [(event.timestep, his.clone())]
            self._run_draft(args, out, event.timestep, slot)
        return out, FULL, {"c1": self.n, "c2": 0, "c3": 0, "est_flops_saved": 0.0}

    def _run_draft(self, args, first_out, t0: float, slot: SlotState) -> None:
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
            out = self.variants[DRAFT](*draft_args, *slot.buffers(self.draft_specs))
            prediction = out[0] if isinstance(out, (tuple, list)) else out
            slot.policy_state.fut.append((ts[j], slot.buffer(self._importance).clone()))
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

    def _partial_step(self, args, event, slot: SlotState):
        """The variant scores and picks the tokens itself (passes/token_select.py) from ``his``,
        ``fut`` and the counts, and writes its choice into ``index`` / ``reuse_mask``."""
        state: TokenSlotState = slot.policy_state
        fut = future_importance(state.fut[1:], event.timestep) if len(state.fut) > 1 else None
        fut_now = slot.buffer(self._fut)
        if fut is None:
            fut_now.fill_(1.0)
        else:
            fut_now.copy_(fut)
        mix_weights = slot.buffer(self._mix_weights)
        if self.c3 == "forecast":
            # every token not computed takes its own forecast, which the variant computes from
            # its line (passes/token_lines.py), for C2 and C3 alike (C3 weights [1, 0, 0])
            self._set_line(slot, float(event.step), valid=True)
            write_values(mix_weights, [1.0, 0.0, 0.0])
        else:
            write_values(mix_weights, history_mix_weights(state.ring_timesteps, event.timestep))
        out = self.variants[PARTIAL](*args, *slot.buffers(self.partial_specs))
        self._partial_calls += 1
        self._push_history(slot, event.timestep)
        index, reuse = slot.buffer(self._index), slot.buffer(self._reuse_mask)
        # counts stay tensors until stats() is read: no device sync per step
        c2 = reuse.sum() / index.shape[0]
        details = {
            "c1": self.k, "c2": c2, "c3": self.n - self.k - c2,
            "refresh_ratio": self.k / self.n,
            "est_flops_saved": 1.0 - self.flops[PARTIAL] / self.flops[FULL]
            if self.flops.get(FULL) and self.flops.get(PARTIAL) else 1.0 - self.k / self.n,
        }
        return out, PARTIAL, details

    def _forecast_step(self, args, event, slot: SlotState):
        """No token computed: every token's own forecast, blocks skipped (token forecast variant)."""
        self._set_line(slot, float(event.step), valid=True)
        out = self.variants[FORECAST](*args, *slot.buffers(self.forecast_specs))
        self._forecast_calls += 1
        self._push_history(slot, event.timestep)
        slot.buffer(self._count).add_(1)
        return out, FORECAST, {"c1": 0, "c2": self.n, "c3": 0, "refresh_ratio": 0.0,
                                      "est_flops_saved": 1.0 - self.flops[FORECAST] / self.flops[FULL]
                                      if self.flops.get(FULL) and self.flops.get(FORECAST) else 1.0}

    # ------------------------------------------------------------------ stats
    def _extra_stats(self) -> dict:
        slots = self.slots.values()
        return {
            "draft_steps": self._draft_calls,
            "c3": self.c3,
            "kv_forecast": self.kv_forecast,
            "kv_horizon": self.kv_horizon,
            "partial_steps": self._partial_calls,
            "forecast_steps": self._forecast_calls,
            "image_tokens": self.n,
            "subset_tokens": self.k,
            "kv_cache_bytes": sum(s.nbytes_of(BufferRole.KV) for s in slots),
            "flops": dict(self.flops),
        }
