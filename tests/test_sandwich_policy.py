"""Policy ``sandwich`` (specdiff_fx/policies/sandwich.py): first and last blocks computed at
every step, the middle forecast.  The example policy of docs/design.md, "Adding a policy"."""

import warnings

import pytest
import torch

from specdiff_fx import compile_pipeline, get_runtime, make_backend, restore_pipeline
from specdiff_fx.inspect.capture import capture_graph
from specdiff_fx.inspect.report import inspect_runtime
from specdiff_fx.policies import POLICIES
from specdiff_fx.testing.tiny_models import build_tiny
from tiny_pipelines import build_pipeline

SCHEDULE = dict(warmup_steps=2, interval=3)


def test_registered_from_its_module_alone():
    policy = POLICIES["sandwich"]
    assert type(policy).__module__ == "specdiff_fx.policies.sandwich"
    assert make_backend(policy="sandwich").config.front_blocks == 1


@pytest.mark.parametrize("front,back", [(1, 0), (0, 1)])
def test_the_cached_step_computes_the_kept_blocks_and_skips_the_middle(front, back):
    case = build_tiny("flux")  # 2 double + 2 single blocks
    gm, example = capture_graph(case.model, case.make_inputs())
    runtime = make_backend(policy="sandwich", compiler="eager", front_blocks=front, back_blocks=back,
                           **SCHEDULE).build_runtime(gm, example)
    assert runtime.fallback is None and set(runtime.variants) == {"full", "forecast"}
    report = inspect_runtime(runtime)
    by_block: dict[str, set] = {}
    for b in report.branches:
        by_block.setdefault(b.branch.block, set()).add(b.status["forecast"])
    blocks = list(by_block)
    kept = blocks[:front] + (blocks[-back:] if back else [])
    for block, status in by_block.items():
        if block in kept:
            assert status == {"computed"}, (block, status)
        else:
            assert "computed" not in status, (block, status)
    assert all(v.runs_at != "-" for v in report.variants)


@pytest.mark.parametrize("name", ["flux", "sd3", "qwen_image"])
def test_through_the_pipeline(name):
    """Full steps reproduce the pipeline's output; cached steps forecast the middle only, so
    they stay closer to the uncached run than lite taylor, which forecasts every block."""
    case = build_pipeline(name)
    plain = case(0)
    outs = {}
    for policy, extra in (("sandwich", dict(front_blocks=1, back_blocks=0)), ("taylor", dict(lite=True))):
        compile_pipeline(case.pipe, policy=policy, compiler="eager", dynamic=False, warmup_steps=2, interval=0,
                         reset_steps=(), **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            outs[policy] = case(0)
        stats = get_runtime(getattr(case.pipe, case.denoisers[0])).stats()
        assert stats["policy"] == policy and stats["cached_steps"] > 0 and stats["fallback"] is None
        restore_pipeline(case.pipe)
    compile_pipeline(case.pipe, policy="sandwich", compiler="eager", dynamic=False, interval=1, front_blocks=1,
                     back_blocks=0)
    torch.testing.assert_close(case(0), plain, atol=1e-5, rtol=1e-5)  # every step full: exact
    restore_pipeline(case.pipe)
    err = {p: ((o - plain).norm() / plain.norm()).item() for p, o in outs.items()}
    assert 0 < err["sandwich"] < err["taylor"], err


def test_too_few_blocks_fall_back_naming_why():
    case = build_tiny("sd3")  # 2 blocks
    model = torch.compile(case.model, backend=make_backend(policy="sandwich", compiler="eager"),
                          fullgraph=True, dynamic=False)
    with pytest.warns(RuntimeWarning, match="sandwich: the graph has 2 blocks, none between the first 1 and the last 1"):
        model(**case.make_inputs())
    assert "none between" in get_runtime(model).stats()["fallback"]
