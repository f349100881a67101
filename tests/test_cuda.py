"""CUDA graphs and host syncs (issue: fast at real sizes).  The GPU tests skip without a GPU;
the CPU test checks the clear error ``cudagraphs=True`` gives where CUDA is unavailable."""

import warnings

import pytest
import torch

from specdiff_fx import SpecDiffConfig, get_runtime, make_backend
from specdiff_fx.testing.tiny_models import TinyCase, build_tiny

from helpers import TIMESTEPS_10, assert_all_close

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is unavailable")
def test_cudagraphs_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="cudagraphs=True.*needs a CUDA device"):
        SpecDiffConfig(cudagraphs=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_backend(cudagraphs=True)


def on_cuda(case: TinyCase) -> TinyCase:
    model = case.model.to("cuda")

    def make_inputs(**kw):
        return {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in case.make_inputs(**kw).items()}

    return TinyCase(case.family, model, make_inputs)


def run(case, model, trajectories=2):
    outs = []
    with torch.no_grad():
        for seed in range(trajectories):
            for t in TIMESTEPS_10:
                outs.append(case.output(model(**case.make_inputs(batch=2, timestep=t, seed=seed))).clone())
    return outs


CONFIGS = {
    "fora": dict(policy="fora", warmup_steps=2, interval=3),
    "taylor": dict(policy="taylor", warmup_steps=2, interval=3),
    "taylor-lite": dict(policy="taylor", lite=True, warmup_steps=2, interval=3),
    "specdiff": dict(policy="specdiff", cache_ratio=0.5, warmup_steps=2, reset_steps=(), draft_steps=2),
}


@needs_cuda
@pytest.mark.parametrize("family", ["dit", "sd3"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cudagraphs_equal_uncaptured_runs(family, name):
    """Each variant is captured once per cache slot and replayed; the outputs equal the same
    trajectory run uncaptured (same kernels: eager compiler), over two trajectories."""
    case = on_cuda(build_tiny(family))
    plain = torch.compile(case.model, backend=make_backend(compiler="eager", **CONFIGS[name]),
                          fullgraph=True, dynamic=False)
    want = run(case, plain)
    torch._dynamo.reset()
    graphed = torch.compile(case.model, backend=make_backend(compiler="eager", cudagraphs=True, **CONFIGS[name]),
                            fullgraph=True, dynamic=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="specdiff", category=RuntimeWarning)
        got = run(case, graphed)
    assert_all_close(got, want, atol=1e-4, rtol=1e-4)
    graphs = get_runtime(graphed).stats()["cuda_graphs"]
    assert all(g["off"] is None for g in graphs.values()), graphs
    assert sum(g["replays"] for g in graphs.values()) >= 10, graphs


@needs_cuda
def test_cudagraphs_under_inductor():
    case = on_cuda(build_tiny("sd3"))
    plain = torch.compile(case.model, backend=make_backend(**CONFIGS["taylor"]), fullgraph=True, dynamic=False)
    want = run(case, plain, trajectories=1)
    torch._dynamo.reset()
    graphed = torch.compile(case.model, backend=make_backend(cudagraphs=True, **CONFIGS["taylor"]),
                            fullgraph=True, dynamic=False)
    got = run(case, graphed, trajectories=1)
    assert_all_close(got, want, atol=1e-4, rtol=1e-4)
    assert sum(g["replays"] for g in get_runtime(graphed).stats()["cuda_graphs"].values()) > 0


@needs_cuda
@pytest.mark.parametrize("name", ["fora", "taylor", "specdiff"])
def test_at_most_one_host_sync_per_call(name):
    """The timestep read is the one device-to-host transfer a call may make
    (torch.cuda.set_sync_debug_mode warns on every synchronising call)."""
    case = on_cuda(build_tiny("sd3"))
    config = dict(CONFIGS[name], draft_steps=0) if name == "specdiff" else CONFIGS[name]
    model = torch.compile(case.model, backend=make_backend(compiler="eager", **config), fullgraph=True, dynamic=False)
    run(case, model, trajectories=1)  # builds, warms up
    torch.cuda.synchronize()
    counts, where = [], []
    with torch.no_grad():
        for t in TIMESTEPS_10:
            inputs = case.make_inputs(batch=2, timestep=t, seed=1)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model(**inputs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            # "called a synchronizing CUDA operation"; not the notice set_sync_debug_mode gives once
            syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
            counts.append(len(syncs))
            where.append([f"{w.filename}:{w.lineno}" for w in syncs])
    assert max(counts) <= 1, (counts, where)
