"""Every knob of the backend, validated up front so bad values fail before dynamo runs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

POLICIES = ("off", "fora", "specdiff")
IMPLEMENTED_POLICIES = ("off", "fora")
COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class SpecDiffConfig:
    """Configuration of the specdiff backend.

    policy:        ``"off"`` (plain compile, step tracking only), ``"fora"`` (recompute every
                   residual branch at full steps, reuse every branch output in between).
                   ``"specdiff"`` (token-level SpecDiff) is reserved and not implemented yet.
    warmup_steps:  full steps at the start of each trajectory.
    interval:      after warm-up, one full step every ``interval`` steps (1 = all full).
    reset_steps:   extra steps that are always full.
    cache_ratio:   share of tokens served from caches at partial steps (token policies).
    compiler:      ``"inductor"`` (default) or ``"eager"`` to run the rewritten graphs
                   uncompiled, for fast tests and debugging.
    inductor_config: ``config_patches`` passed to Inductor's ``compile_fx``.
    timestep_input: substring naming the timestep input if it is not called ``timestep``.
    """

    policy: str = "fora"
    warmup_steps: int = 2
    interval: int = 3
    reset_steps: tuple[int, ...] = ()
    cache_ratio: float = 0.0
    compiler: str = "inductor"
    inductor_config: dict = field(default_factory=dict)
    timestep_input: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"SpecDiffConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy not in IMPLEMENTED_POLICIES:
            raise NotImplementedError(
                f"SpecDiffConfig.policy={self.policy!r} is not implemented yet; "
                f"available: {IMPLEMENTED_POLICIES}"
            )
        if self.compiler not in COMPILERS:
            raise ValueError(f"SpecDiffConfig.compiler must be one of {COMPILERS}, got {self.compiler!r}")
        for name in ("warmup_steps", "interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"SpecDiffConfig.{name} must be an int, got {value!r}")
        if self.warmup_steps < 1:
            raise ValueError(
                f"SpecDiffConfig.warmup_steps must be >= 1 (step 0 fills the caches), got {self.warmup_steps}"
            )
        if self.interval < 1:
            raise ValueError(f"SpecDiffConfig.interval must be >= 1, got {self.interval}")
        reset = tuple(self.reset_steps)
        if any(not isinstance(s, int) or s < 0 for s in reset):
            raise ValueError(f"SpecDiffConfig.reset_steps must be non-negative ints, got {self.reset_steps!r}")
        object.__setattr__(self, "reset_steps", reset)
        if not isinstance(self.cache_ratio, (int, float)) or not 0.0 <= float(self.cache_ratio) < 1.0:
            raise ValueError(f"SpecDiffConfig.cache_ratio must be in [0, 1), got {self.cache_ratio!r}")
        if not isinstance(self.inductor_config, dict):
            raise TypeError("SpecDiffConfig.inductor_config must be a dict of Inductor config patches")

    def replace(self, **changes) -> "SpecDiffConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown SpecDiffConfig field(s): {sorted(unknown)}")
        return replace(self, **changes)
