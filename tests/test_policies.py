"""The policy registry and the config built from its sections (specdiff_fx/policies, config.py).

Table-driven over whatever is registered: a new policy module is covered here without an edit.
"""

import dataclasses

import pytest

from specdiff_fx import SpecDiffConfig, make_backend
from specdiff_fx import policies as registry
from specdiff_fx.config import COMMON_FIELDS, FIELDS
from specdiff_fx.policies import POLICIES, Field, Policy, get_policy, owners, register
from specdiff_fx.policies.checks import an_int


def test_builtin_policies_are_registered_in_order():
    names = list(POLICIES)
    assert names[:4] == ["off", "fora", "taylor", "specdiff"]
    assert all(isinstance(p, Policy) and p.name == n for n, p in POLICIES.items())


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_declares_what_the_tools_read(name):
    policy = POLICIES[name]
    assert policy.summary and policy.runs_at, "inspect shows when each variant runs"
    assert "full" in policy.runs_at
    warmup, interval, reset = policy.schedule
    cfg = SpecDiffConfig(policy=name)
    assert (cfg.warmup_steps, cfg.interval, cfg.reset_steps) == (warmup, interval, tuple(reset))
    for f in policy.fields:
        assert FIELDS[f.name] is f and f.doc
        assert f.name in SpecDiffConfig.__doc__, "the config's docstring is built from the sections"
        if f.default is not None:  # None: derived from other fields by the policy's resolve()
            assert getattr(cfg, f.name) == f.default


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_rejects_a_value_of_the_wrong_kind(name):
    """Each field's own check (or its policy's cross-field rule) names the field."""
    holders = owners(name) or ("taylor",)
    values = {"policy": holders[0], name: object()}
    with pytest.raises((ValueError, TypeError), match=rf"SpecDiffConfig\.?\(?{name}"):
        SpecDiffConfig(**values)


@pytest.mark.parametrize("name", sorted(n for n in FIELDS if owners(n)))
def test_a_field_of_another_policy_is_an_error_naming_its_owner(name):
    holders = owners(name)
    other = next(p for p in POLICIES if p not in holders)
    value, extra = _a_valid_non_default(FIELDS[name], holders[0])
    assert getattr(SpecDiffConfig(policy=holders[0], **extra, **{name: value}), name) == value
    # the field itself when alone, else the first of the fields it needs (same owner)
    field = name if not extra else r"\w+"
    with pytest.raises(ValueError, match=rf"SpecDiffConfig\.{field} belongs to policy '{holders[0]}'"):
        SpecDiffConfig(policy=other, **extra, **{name: value})


# fields valid only together with another (the policy's cross-field rules)
_NEEDS = {"forecaster": {"taylor_order": 2}, "forecaster_options": {"forecaster": "hermite"},
          "kv_forecast": {"c3": "forecast"}, "partial_every": {"c3": "forecast"}, "tolerance_growth": {"tolerance": 0.1}}


def _a_valid_non_default(field: Field, policy: str):
    """A value the field accepts that differs from its default (found by trying), and the other
    fields it needs."""
    extra = _NEEDS.get(field.name, {})
    for value in (True, 2, 0.5, 1, 0, "forecast", "timestep", "bfloat16", "newton", {"sigma": 0.5}, None,
                  lambda *a: a[0], (3,)):
        if value == field.default and type(value) is type(field.default):
            continue
        try:
            SpecDiffConfig(policy=policy, **extra, **{field.name: value})
        except (ValueError, TypeError):
            continue
        return value, extra
    raise AssertionError(f"no valid non-default value found for {field.name}")


def test_replace_to_another_policy_drops_the_old_policys_fields():
    spec = SpecDiffConfig(policy="specdiff", cache_ratio=0.5, c3="forecast")
    taylor = spec.replace(policy="taylor", lite=True)
    assert taylor.cache_ratio == 0.7 and taylor.c3 == "history" and taylor.lite
    assert taylor.replace(policy="specdiff", cache_ratio=0.4).cache_ratio == 0.4
    with pytest.raises(TypeError, match="unknown SpecDiffConfig field"):
        spec.replace(cache_ration=0.4)
    with pytest.raises(TypeError, match="unknown"):
        make_backend(policy="fora", intervall=3)


def test_the_section_of_a_config():
    cfg = SpecDiffConfig(policy="specdiff", cache_ratio=0.5)
    section = cfg.section()
    assert section["cache_ratio"] == 0.5 and "taylor_order" not in section and "policy" not in section
    assert set(cfg.section("taylor")) == {f.name for f in POLICIES["taylor"].fields}
    assert {f.name for f in COMMON_FIELDS} | {n for p in POLICIES.values() for n in cfg.section(p.name)} == \
        {f.name for f in dataclasses.fields(cfg)}


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="policy must be one of"):
        SpecDiffConfig(policy="teacache")
    with pytest.raises(ValueError, match="unknown policy 'teacache'"):
        get_policy("teacache")


def test_register_refuses_a_second_policy_of_a_name_and_a_clashing_field(monkeypatch):
    monkeypatch.setattr(registry, "POLICIES", dict(POLICIES))

    class Twin(Policy):
        name = "fora"

    with pytest.raises(ValueError, match="registered twice"):
        register(Twin())

    class Clash(Policy):
        name = "clash"
        fields = (Field("cache_ratio", 0.5, an_int(0), "another cache_ratio"),)

    with pytest.raises(ValueError, match="declares field 'cache_ratio'.*differently"):
        register(Clash())


def test_the_backends_decisions_are_logged(caplog):
    """Branches found, variants built and fallbacks go to the ``specdiff_fx`` logger."""
    import logging
    import warnings

    from specdiff_fx.inspect.capture import capture_graph
    from specdiff_fx.testing.tiny_models import build_tiny

    case = build_tiny("sd3")
    gm, example = capture_graph(case.model, case.make_inputs())
    with caplog.at_level(logging.INFO, logger="specdiff_fx"):
        make_backend(policy="fora", compiler="eager").build_runtime(gm, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            make_backend(policy="sandwich", compiler="eager")(gm, example)  # 2 blocks: nothing between
    text = caplog.text
    assert "residual branches found" in text and "policy fora built variants ['full', 'reuse']" in text
    assert "fallback to a plain compile: sandwich: the graph has 2 blocks" in text
