"""The one buffer description shared by passes, runtime and inspect (specdiff_fx/buffers.py):
roles are an enum that keeps its strings, history buffers carry their ring position."""

import ast
import json
from pathlib import Path

import pytest
import torch

import specdiff_fx.buffers as buffers_module
from specdiff_fx.buffers import BufferRole, BufferSpec
from specdiff_fx.passes.token_axis import analyze_token_axis
from specdiff_fx.passes.token_forecast import build_token_forecast_variant
from specdiff_fx.passes.token_variants import build_token_partial_variant, build_token_record_variant
from specdiff_fx.runtime.slots import SlotState
from specdiff_fx.testing.tiny_models import build_tiny

CPU = torch.device("cpu")


def test_roles_coerce_from_strings_and_keep_their_values():
    spec = BufferSpec("specdiff_kcache_0", "kv", (2, 4), torch.float32, CPU)
    assert spec.role is BufferRole.KV
    assert spec.role == "kv" and str(spec.role) == "kv" and f"{spec.role}" == "kv"
    assert json.dumps({"role": spec.role}) == '{"role": "kv"}'
    assert BufferSpec("c", BufferRole.BRANCH_CACHE, (1,), torch.float32, CPU).role is BufferRole.BRANCH_CACHE
    assert {r.value for r in BufferRole} >= {"branch_cache", "taylor_term", "taylor_coef", "forecast_error", "kv",
                                             "history", "importance", "index", "reuse_mask", "mix_weights",
                                             "his", "fut", "count", "line", "line_value", "line_slope",
                                             "line_stamp"}


def test_an_unknown_role_raises():
    with pytest.raises(ValueError, match="unknown role 'cache'"):
        BufferSpec("c", "cache", (1,), torch.float32, CPU)


def test_ring_goes_with_history_only():
    assert BufferSpec("h", "history", (1,), torch.float32, CPU, ring=1).ring == 1
    with pytest.raises(ValueError, match="ring"):
        BufferSpec("h", "history", (1,), torch.float32, CPU)
    with pytest.raises(ValueError, match="ring"):
        BufferSpec("k", "kv", (1,), torch.float32, CPU, ring=0)


def test_nbytes():
    assert BufferSpec("c", "kv", (2, 3, 4), torch.float16, CPU).nbytes == 2 * 3 * 4 * 2
    assert BufferSpec("i", "index", (2, 5), torch.long, CPU).nbytes == 2 * 5 * 8
    assert BufferSpec("w", "mix_weights", (3,), torch.float32, CPU).nbytes == 12


def test_passes_and_runtime_share_the_one_type():
    from specdiff_fx import passes, runtime

    assert passes.BufferSpec is runtime.BufferSpec is BufferSpec
    assert passes.BufferRole is runtime.BufferRole is BufferRole


def test_built_variants_give_history_buffers_their_ring_position(capture):
    case = build_tiny("dit")
    gm, _ = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    _, rspecs = build_token_record_variant(gm, region)
    _, pspecs = build_token_partial_variant(gm, region, 3)
    _, fspecs = build_token_forecast_variant(gm, region)
    assert [(s.name, s.ring) for s in rspecs if s.role == BufferRole.HISTORY] == [("specdiff_history_out", 2)]
    for specs in (pspecs, fspecs):
        assert [(s.name, s.ring) for s in specs if s.role == BufferRole.HISTORY] == \
            [(f"specdiff_history_{i}", i) for i in range(3)]
    assert all(s.ring is None for s in rspecs + pspecs + fspecs if s.role != BufferRole.HISTORY)


def test_slot_hands_history_by_ring_position_not_name():
    def spec(name, role, shape, dtype=torch.float32, ring=None):
        return BufferSpec(name, role, shape, dtype, CPU, ring=ring)

    record = [spec("written", "history", (1, 4, 2), ring=2), spec("imp", "importance", (1, 4))]
    partial = [spec("idx", "index", (1, 2), torch.long), spec("mask", "reuse_mask", (1, 4), torch.bool),
               spec("w", "mix_weights", (3,))] + [spec(f"ring_entry_{2 - i}", "history", (1, 4, 2), ring=i)
                                                  for i in range(3)]
    slot = SlotState(0)
    ring = slot.ring(record[0])
    assert slot.buffers(record)[0] is ring[2]
    assert all(got is want for got, want in zip(slot.buffers(partial)[3:], ring))
    slot.rotate_rings()  # the entry just written becomes the newest
    assert slot.buffers(partial)[3] is ring[2] and slot.buffers(record)[0] is ring[1]


def test_buffers_module_imports_only_torch_sympy_and_the_standard_library():
    source = Path(buffers_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import from {node.module!r}"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "dataclasses", "enum", "math", "sympy", "torch"}  # no passes, no runtime
