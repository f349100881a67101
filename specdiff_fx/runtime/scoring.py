"""SpecDiff's host-side step arithmetic: history mix weights, draft timesteps, the future lookup.

The token scores and the C1/C2/C3 classes are computed *inside* the compiled partial variant
(``passes/token_select.py``, math in ``passes/token_ops.py``): the runtime only hands it the
importance buffers.  What stays here depends on timesteps, which the runtime already holds
on the host.
"""

from __future__ import annotations

import math

import torch


def history_mix_weights(history_timesteps: list[float], timestep: float) -> torch.Tensor:
    """C3 weights over the last three outputs, as reported by the paper:

        W_i = e^{-i} (T_{t+i} - T_t) / sum_j e^{-j} (T_{t+j} - T_t),  i = 1..3,

    where T_{t+i} is the timestep of the i-th most recent stored output (earlier in
    sampling, so larger) and T_t the current one.  Our reading: a convex combination
    whose weights grow with the time gap and decay exponentially with age; it is an
    average of past features, not an extrapolation.  Missing entries get weight 0.
    """
    raw = [math.exp(-(i + 1)) * max(t_hist - timestep, 0.0) for i, t_hist in enumerate(history_timesteps[:3])]
    total = sum(raw)
    if total <= 0:
        raw, total = [1.0], 1.0
    weights = [r / total for r in raw] + [0.0] * (3 - len(raw))
    return torch.tensor(weights[:3], dtype=torch.float32)


def draft_timesteps(first: float, steps: int) -> list[float]:
    """Timesteps of a ``steps``-step draft starting where the trajectory starts, ending at 0."""
    return [first * (1.0 - j / steps) for j in range(steps)]


def future_importance(records: list[tuple[float, torch.Tensor]], timestep: float) -> torch.Tensor | None:
    """The draft record at the nearest draft timestep after ``timestep`` in sampling order."""
    if not records:
        return None
    later = [imp for t, imp in records if t < timestep]
    return later[0] if later else records[-1][1]
