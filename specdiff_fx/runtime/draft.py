"""The samplers that advance the self-speculative draft (policy ``specdiff``).

At a trajectory's first full step, ``TokenRuntime`` runs a short draft trajectory with the same
model to learn which tokens will matter (``fut``).  The draft must step its sample as the
pipeline does, so its sampler comes from one of two places, both here:

* the pipeline's own sampler, lent by the pipeline's clock (runtime/pipeline_clock.py) as a
  :class:`Draft`: ``compile_pipeline`` builds it from a copy of the pipeline's scheduler
  (DPM-Solver, DDPM with epsilon or v prediction, PNDM, flow matching);
* else an update function of the user's (``draft_update``) or, by default,
  :func:`flow_matching_update`, an Euler step of a velocity model over
  :func:`~specdiff_fx.runtime.scoring.draft_timesteps`.

The runtime tries :func:`pipeline_draft_plan`, then :func:`default_draft_plan`.  Knows torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .scoring import draft_timesteps

Advance = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Draft:
    """A short trajectory of the pipeline's own sampler: ``timesteps`` (as the model receives
    them) and ``advance(x, model_output, i) -> x`` moving a sample from ``timesteps[i]`` to
    ``timesteps[i + 1]``."""

    timesteps: list[float]
    advance: Advance


def flow_matching_update(x: torch.Tensor, model_output: torch.Tensor, t: float, t_next: float,
                         scale: float) -> torch.Tensor:
    """Euler step of a velocity (rectified-flow) model: x + (t_next - t) / scale * v.

    If the model predicts more channels than the latent has (learned variance), the
    first ones are taken as the prediction.
    """
    v = model_output[:, : x.shape[1]] if model_output.shape[1] != x.shape[1] else model_output
    return x + (t_next - t) / scale * v.to(x.dtype)


def prediction_for(x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The part of a model output a sampler steps with (learned-variance models predict more
    channels than the latent has: the first ones are the prediction)."""
    if model_output.shape != x.shape and model_output.dim() == x.dim() and model_output.shape[1] > x.shape[1]:
        model_output = model_output[:, : x.shape[1]]
    return model_output.to(x.dtype)


def timestep_scale(t0: float) -> float:
    """Model timestep units per unit of the default update's step: 1000 for models that take
    timesteps in [0, 1000], 1 for those that take [0, 1]."""
    return 1000.0 if t0 > 1.5 else 1.0


def pipeline_draft_plan(t0: float, draft: Draft | None) -> tuple[list[float], Advance] | None:
    """The draft's timesteps (as the model receives them, from ``t0``) and its ``advance`` on
    the pipeline's sampler ``draft``; None where there is none or its first timestep does not
    map onto ``t0`` (model units per scheduler unit: FLUX passes t / 1000; a trajectory at 0,
    inverted sigmas, starts at 0 in both)."""
    if draft is None or len(draft.timesteps) < 2:
        return None
    first = draft.timesteps[0]
    ratio = t0 / first if first != 0 and t0 != 0 else 1.0 if first == t0 else None
    if ratio is None:
        return None
    ts = [t0] + [ratio * t for t in draft.timesteps[1:]]
    return ts, lambda x, pred, i: draft.advance(x, prediction_for(x, pred), i)


def default_draft_plan(t0: float, steps: int, update: Callable | None,
                       scale: float) -> tuple[list[float], Advance]:
    """``steps`` evenly spaced timesteps from ``t0`` (:func:`draft_timesteps`) and ``update``
    (default :func:`flow_matching_update`) between them, ``scale`` model units per step unit."""
    ts = draft_timesteps(t0, steps)
    update = update or flow_matching_update
    return ts, lambda x, pred, i: update(x, pred, ts[i], ts[i + 1], scale)
