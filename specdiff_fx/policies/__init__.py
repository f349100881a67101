"""The caching policies, one module each, and their registry.

A policy (``policies/<name>.py``, a :class:`Policy` subclass) holds its config section, builds
the runtime of a graph from the passes' variants, and says when each variant runs.  The config
(``SpecDiffConfig``'s fields and checks), the backend, ``inspect`` and the bench iterate
:data:`POLICIES`; adding a policy is one module here plus its tests (docs/design.md, "Adding a
policy").

Imports: passes/, runtime/, buffers; the config and the backend import this package, never the
other way round.
"""

from __future__ import annotations

from .base import BuildContext, Field, Policy, UnsupportedGraph

POLICIES: dict[str, Policy] = {}
"""name -> policy, in registration order (``off`` first)."""


def register(policy: Policy) -> Policy:
    """Add ``policy`` to the registry.  Its fields may share a name with another policy's only
    if declared alike (same default and check): ``SpecDiffConfig`` has one field per name."""
    if policy.name in POLICIES:
        raise ValueError(f"policy {policy.name!r} is registered twice")
    for f in policy.fields:
        for other in POLICIES.values():
            for g in other.fields:
                if g.name == f.name and g is not f:
                    raise ValueError(f"policy {policy.name!r} declares field {f.name!r} that policy "
                                     f"{other.name!r} declares differently; share one Field object")
    POLICIES[policy.name] = policy
    return policy


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {tuple(POLICIES)}") from None


def owners(field_name: str) -> tuple[str, ...]:
    """The policies whose section holds ``field_name`` (empty for the shared fields)."""
    return tuple(p.name for p in POLICIES.values() if any(f.name == field_name for f in p.fields))


def _discover() -> None:
    """Register the ``POLICY`` of every module of this package, by ``Policy.order`` then name:
    a new policy module needs no edit here."""
    import importlib
    import pkgutil

    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "POLICY", None), Policy):
            found.append(module.POLICY)
    for policy in sorted(found, key=lambda p: (p.order, p.name)):
        register(policy)


_discover()

__all__ = ["POLICIES", "BuildContext", "Field", "Policy", "UnsupportedGraph", "get_policy", "owners", "register"]
