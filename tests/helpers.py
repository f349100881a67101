"""Shared helpers for trajectory-level tests."""

import torch

from specdiff_fx import make_backend

TIMESTEPS_10 = [1000.0 - 100.0 * i for i in range(10)]


def compile_with(model, **config):
    backend = make_backend(**config)
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False), backend


def run_steps(case, model, timesteps, *, batch=2, seed=0):
    """One output per timestep; the latents are fixed so outputs isolate the cache behaviour."""
    outs = []
    with torch.no_grad():
        for t in timesteps:
            outs.append(case.output(model(**case.make_inputs(batch=batch, timestep=t, seed=seed))).clone())
    return outs


def assert_all_close(a, b, atol=1e-5, rtol=1e-5):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"step {i}: {m}")
