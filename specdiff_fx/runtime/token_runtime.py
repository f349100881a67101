"""Runtime of policy ``specdiff``: draft, token scores, C1/C2/C3 classes, partial steps.

Per call slot (cond/uncond calls made separately each get one) it owns the per-layer
K/V caches, a ring of the last three exit features (the token history), the importance
recorded at the last full step (``his``), the draft's importance by timestep (``fut``)
and how many steps each token has gone uncomputed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .cache_slots import BufferSpec
from .runtime import FULL, SpecDiffRuntime
from .scoring import (
    classify_tokens,
    draft_timesteps,
    forecast_mix_weights,
    future_importance,
    history_mix_weights,
    token_scores,
)

PARTIAL = "partial"
DRAFT = "draft"
# how C3 tokens are composed from the ring of the last outputs
C3_MODES = {"history": history_mix_weights, "forecast": forecast_mix_weights}


def flow_matching_update(x: torch.Tensor, model_output: torch.Tensor, t: float, t_next: float,
                         scale: float) -> torch.Tensor:
    """Euler step of a velocity (rectified-flow) model: x + (t_next - t) / scale * v.

    If the model predicts more channels than the latent has (learned variance), the
    first ones are taken as the prediction.
    """
    v = model_output[:, : x.shape[1]] if model_output.shape[1] != x.shape[1] else model_output
    return x + (t_next - t) / scale * v.to(x.dtype)


def _alloc(spec: BufferSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)


class TokenSlot:
    """Buffers and token state of one call slot."""

    def __init__(self, record: Sequence[BufferSpec], partial: Sequence[BufferSpec], draft: Sequence[BufferSpec]):
        self.kv = {s.name: _alloc(s) for s in list(record) + list(partial) if s.role == "kv"}
        hist = next(s for s in record if s.role == "history")
        self.ring = [_alloc(hist) for _ in range(3)]           # newest first
        self.ring_timesteps: list[float] = []
        self.importance = _alloc(next(s for s in record if s.role == "importance"))
        by_role = {s.role: s for s in partial}
        self.index = _alloc(by_role["index"])
        self.reuse_mask = _alloc(by_role["reuse_mask"])
        self.mix_weights = _alloc(by_role["mix_weights"])
        self.count = torch.zeros(self.importance.shape, dtype=torch.long, device=self.importance.device)
        self.his: torch.Tensor | None = None
        self.fut: list[tuple[float, torch.Tensor]] = []
        self.trajectory: int | None = None

    def buffers_for(self, specs: Sequence[BufferSpec]) -> list[torch.Tensor]:
        out = []
        for s in specs:
            if s.role == "kv":
                out.append(self.kv[s.name])
            elif s.role == "history":
                # the record variant writes its one history input; the partial variant reads
                # history_0..2 (newest first) and writes the oldest, history_2
                out.append(self.ring[2] if s.name.endswith("_out") else self.ring[int(s.name.rsplit("_", 1)[1])])
            elif s.role == "importance":
                out.append(self.importance)
            else:
                out.append({"index": self.index, "reuse_mask": self.reuse_mask,
                            "mix_weights": self.mix_weights}[s.role])
        return out

    def push_history(self, timestep: float) -> None:
        """The oldest ring entry was just overwritten with this step's features."""
        self.ring = [self.ring[2], self.ring[0], self.ring[1]]
        self.ring_timesteps = [timestep] + self.ring_timesteps[:2]

    @property
    def nbytes(self) -> int:
        tensors = list(self.kv.values()) + self.ring + [self.importance, self.index, self.reuse_mask,
                                                        self.mix_weights, self.count]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())


class TokenRuntime(SpecDiffRuntime):
    """SpecDiff: full+record, partial and draft variants chosen per call."""

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
        latent_index: int | None,
        draft_update: Callable | None = None,
        flops: dict | None = None,
        c3: str = "history",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if c3 not in C3_MODES:
            raise ValueError(f"c3 must be one of {tuple(C3_MODES)}, got {c3!r}")
        self.c3 = c3
        self.record_specs, self.partial_specs, self.draft_specs = list(record_specs), list(partial_specs), list(draft_specs)
        self.k, self.n = subset_size, num_tokens
        self.c2_share, self.lam = c2_share, score_lambda
        self.draft_steps = draft_steps if latent_index is not None else 0
        self.latent_index = latent_index
        self.draft_update = draft_update or flow_matching_update
        self.flops = dict(flops or {})
        self.token_slots: dict[int, TokenSlot] = {}
        self._timestep_scale: float | None = None

    # ------------------------------------------------------------------ state
    def invalidate(self) -> None:
        self.token_slots.clear()
        super().invalidate()

    def reset(self) -> None:
        self.token_slots.clear()
        super().reset()

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self._draft_calls = 0

    def _slot(self, index: int) -> TokenSlot:
        if index not in self.token_slots:
            self.token_slots[index] = TokenSlot(self.record_specs, self.partial_specs, self.draft_specs)
        return self.token_slots[index]

    # ------------------------------------------------------------------ steps
    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        slot = self._slot(event.slot)
        fresh_trajectory = slot.trajectory != event.trajectory
        if fresh_trajectory or self.schedule.is_full(event.step) or not slot.ring_timesteps:
            return self._full_step(args, event, slot, fresh_trajectory)
        return self._partial_step(args, event, slot)

    def _full_step(self, args, event, slot: TokenSlot, fresh_trajectory: bool):
        out = self.variants[FULL](*args, *slot.buffers_for(self.record_specs))
        slot.push_history(event.timestep)
        slot.his = slot.importance.clone()
        slot.count.zero_()
        if fresh_trajectory:
            slot.trajectory = event.trajectory
            slot.ring_timesteps = [event.timestep]
            slot.fut = [(event.timestep, slot.his)]
            self._run_draft(args, out, event.timestep, slot)
        return out, FULL, {"c1": self.n, "c2": 0, "c3": 0, "est_flops_saved": 0.0}

    def _run_draft(self, args, first_out, t0: float, slot: TokenSlot) -> None:
        """Speculate a short trajectory with the same model; step 0 is the main step 0."""
        if self.draft_steps < 2 or DRAFT not in self.variants:
            return
        if self._timestep_scale is None:
            self._timestep_scale = 1000.0 if t0 > 1.5 else 1.0
        ts = draft_timesteps(t0, self.draft_steps)
        x = args[self.latent_index]
        prediction = first_out[0] if isinstance(first_out, (tuple, list)) else first_out
        t_arg = args[self.timestep_index]
        for j in range(1, self.draft_steps):
            x = self.draft_update(x, prediction, ts[j - 1], ts[j], self._timestep_scale)
            draft_args = list(args)
            draft_args[self.latent_index] = x
            draft_args[self.timestep_index] = torch.full_like(t_arg, ts[j]) if isinstance(t_arg, torch.Tensor) else ts[j]
            out = self.variants[DRAFT](*draft_args, *slot.buffers_for(self.draft_specs))
            prediction = out[0] if isinstance(out, (tuple, list)) else out
            slot.fut.append((ts[j], slot.importance.clone()))
            self._draft_calls += 1

    def _partial_step(self, args, event, slot: TokenSlot):
        fut = future_importance(slot.fut[1:], event.timestep) if len(slot.fut) > 1 else None
        scores = token_scores(slot.his, fut, slot.count, self.lam)
        index, reuse = classify_tokens(scores, self.k, self.c2_share)
        slot.index.copy_(index)
        slot.reuse_mask.copy_(reuse)
        slot.mix_weights.copy_(C3_MODES[self.c3](slot.ring_timesteps, event.timestep))
        out = self.variants[PARTIAL](*args, *slot.buffers_for(self.partial_specs))
        slot.push_history(event.timestep)
        slot.count += 1
        slot.count.scatter_(1, index, 0)
        # counts stay tensors until stats() is read: no device sync per step
        c2 = reuse.sum() / index.shape[0]
        details = {
            "c1": self.k, "c2": c2, "c3": self.n - self.k - c2,
            "refresh_ratio": self.k / self.n,
            "est_flops_saved": 1.0 - self.flops[PARTIAL] / self.flops[FULL]
            if self.flops.get(FULL) and self.flops.get(PARTIAL) else 1.0 - self.k / self.n,
        }
        return out, PARTIAL, details

    def buffer_specs_for(self, variant: str) -> list[BufferSpec]:
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
            "partial_steps": self._cached_steps,
            "image_tokens": self.n,
            "subset_tokens": self.k,
            "cache_slots": len(slots),
            "cache_bytes": sum(s.nbytes for s in slots),
            "kv_cache_bytes": sum(s.kv_bytes for s in slots),
            "flops": dict(self.flops),
        }
