"""Every knob of the backend, validated once, up front, so bad values fail before dynamo runs.

``SpecDiffConfig`` is built from sections: the shared fields below and each registered policy's
own (:attr:`specdiff_fx.policies.Policy.fields`).  Why built and not written out: a policy's
knobs live in its module, so a new policy adds its fields without an edit here, and the table
that checks a field is the one that documents it.  The checks run in three stages:

1. every field's own check (type, range), whatever the policy;
2. the active policy's cross-field rules (:meth:`Policy.resolve`: e.g. a tolerance turns the
   probe on; a forecaster reading second differences needs ``taylor_order=2``);
3. a field of another policy's section set away from its default is an error naming the policy
   that owns it: ``SpecDiffConfig(policy="taylor", cache_ratio=0.5)`` would silently do nothing.

Passes and runtimes take the values a policy hands them and do not check them again.

Imports: the policies package (for the sections).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .policies import POLICIES, owners
from .policies.base import CACHE_DTYPES, Field
from .policies.checks import a_bool, a_dict, an_int, one_of, step_list

COMPILERS = ("inductor", "eager")
DIRECTIONS = ("auto", "down", "up")
SCHEDULE = ("warmup_steps", "interval", "reset_steps")
"""The schedule fields every policy gives a default for (``full_at`` defaults to none)."""


def _policy(value: Any) -> Any:
    if value not in POLICIES:
        raise ValueError(f"must be one of {tuple(POLICIES)}, got {value!r}")
    return value


def _cudagraphs(value: Any) -> Any:
    a_bool()(value)
    if value:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("SpecDiffConfig(cudagraphs=True) needs a CUDA device; this machine has none "
                             "(torch.cuda.is_available() is False). Leave cudagraphs off on CPU.")
    return value


def _progress_points(value: Any) -> Any:
    """Points in (0, 1), stored sorted as a tuple of floats."""
    try:
        points = tuple(float(u) for u in value)
    except (TypeError, ValueError):
        points = None
    if points is None or any(not 0.0 < u < 1.0 for u in points):
        raise ValueError(f"must be progress points in (0, 1) (0: pure noise, 1: the clean sample), got {value!r}")
    return tuple(sorted(set(points)))


def _timestep_input(value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"must be a str or None, got {value!r}")
    return value


COMMON_FIELDS: tuple[Field, ...] = (
    Field("policy", "taylor", _policy,
          "the caching policy (``specdiff_fx.policies``): ``\"off\"``, ``\"fora\"``, ``\"taylor\"`` "
          "(default: lite forecasting, the best of ours at 3-4x on the reference model) or "
          "``\"specdiff\"`` (token level).", "str"),
    Field("warmup_steps", None, an_int(1, none=True),
          "full steps at the start of each trajectory, >= 1: step 0 fills the caches (None: the "
          "policy's default).", "int | None"),
    Field("interval", None, an_int(0, none=True),
          "after warm-up, one full step every ``interval`` steps (1 = all full; 0 = warm-up and "
          "``reset_steps`` only; None: the policy's default).", "int | None"),
    Field("reset_steps", None, step_list,
          "extra steps that are always full (None: the policy's default).", "tuple[int, ...] | None"),
    Field("full_at", (), _progress_points,
          "full steps in the sampler's time: progress points in (0, 1) through the noise schedule (read "
          "from the timesteps); the first step to reach each is full, at any step count or scheduler shift "
          "(runtime/schedule.py).  Combine with ``interval=0`` for a schedule of warm-up plus these points.",
          "tuple[float, ...]"),
    Field("compiler", "inductor", one_of(*COMPILERS),
          "``\"inductor\"`` or ``\"eager\"`` (the rewritten graphs uncompiled, for tests and debugging).", "str"),
    Field("cudagraphs", False, _cudagraphs,
          "replay each variant from a CUDA graph captured once per cache slot (runtime/cuda_graphs.py); "
          "CUDA only.", "bool"),
    Field("inductor_config", {}, a_dict, "``config_patches`` passed to Inductor's ``compile_fx``.", "dict"),
    Field("timestep_input", None, _timestep_input,
          "substring naming the timestep input if it is not called ``timestep``.", "str | None"),
    Field("timestep_direction", "auto", one_of(*DIRECTIONS),
          "``\"auto\"`` (learned from the first move of the first trajectory), ``\"down\"`` or ``\"up\"`` "
          "(Lumina2's ``1 − t/1000``).  Only the raw path reads it: through compile_pipeline the "
          "pipeline says where trajectories start.", "str"),
)


def _all_fields() -> dict[str, Field]:
    table: dict[str, Field] = {f.name: f for f in COMMON_FIELDS}
    for policy in POLICIES.values():
        for f in policy.fields:
            if f.name in table and table[f.name] is not f:
                raise ValueError(f"config field {f.name!r} of policy {policy.name!r} clashes with another field")
            table[f.name] = f
    return table


FIELDS: dict[str, Field] = _all_fields()
"""Every config field by name: the shared ones, then each policy's section."""


def _checked(f: Field, value: Any) -> Any:
    try:
        return f.check(value)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        raise type(exc)(text if text.startswith("SpecDiffConfig") else f"SpecDiffConfig.{f.name} {text}") from None


def _post_init(self) -> None:
    values = {name: _checked(f, getattr(self, name)) for name, f in FIELDS.items()}
    policy = POLICIES[values["policy"]]
    for name, default in zip(SCHEDULE, policy.schedule):
        if values[name] is None:
            values[name] = default
    policy.resolve(values)
    for name, f in FIELDS.items():
        holders = owners(name)
        if holders and policy.name not in holders and values[name] != f.default:
            who = " and ".join(repr(h) for h in holders)
            raise ValueError(f"SpecDiffConfig.{name} belongs to policy {who}, and this config's policy is "
                             f"{policy.name!r}: set policy={holders[0]!r}, or leave {name} out")
    for name, value in values.items():
        object.__setattr__(self, name, value)


def _replace(self, **changes: Any) -> "SpecDiffConfig":
    """A copy with ``changes``.  A new policy brings its own schedule defaults, and another
    policy's fields not given here go back to their defaults."""
    unknown = set(changes) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown SpecDiffConfig field(s): {sorted(unknown)}")
    policy = POLICIES.get(changes.get("policy", self.policy))
    if "policy" in changes and policy is not None:
        for name in SCHEDULE:
            changes.setdefault(name, None)
        for name, f in FIELDS.items():
            holders = owners(name)
            if holders and policy.name not in holders:
                changes.setdefault(name, f.default)
    if policy is not None:
        policy.on_replace(self, changes)
    return dataclasses.replace(self, **changes)


def section(self, policy: str | None = None) -> dict[str, Any]:
    """The fields of ``policy``'s section (default: the config's policy), by name."""
    p = POLICIES[policy or self.policy]
    return {f.name: getattr(self, f.name) for f in p.fields}


def _doc() -> str:
    def block(fields) -> str:
        return "\n".join(f"    {f.name}: {f.doc}" for f in fields)

    parts = ["Configuration of the specdiff backend: the shared fields, then each policy's section.",
             "", "Shared:", block(COMMON_FIELDS)]
    for p in POLICIES.values():
        if p.fields:
            parts += ["", f"Policy {p.name!r} ({p.summary}):", block(p.fields)]
    return "\n".join(parts) + "\n"


def _spec(f: Field) -> tuple:
    if isinstance(f.default, (dict, list, set)):
        default = f.default
        return f.name, f.type, dataclasses.field(default_factory=lambda: type(default)(default))
    return f.name, f.type, dataclasses.field(default=f.default)


SpecDiffConfig = dataclasses.make_dataclass(
    "SpecDiffConfig", [_spec(f) for f in FIELDS.values()], frozen=True,
    namespace={"__post_init__": _post_init, "replace": _replace, "section": section, "__doc__": _doc()},
)
SpecDiffConfig.__module__ = __name__  # pickles and reprs as specdiff_fx.config.SpecDiffConfig

POLICY_NAMES = tuple(POLICIES)
"""Every registered policy's name."""
__all__ = ["CACHE_DTYPES", "COMMON_FIELDS", "COMPILERS", "FIELDS", "POLICY_NAMES", "SpecDiffConfig"]
