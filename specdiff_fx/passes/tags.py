"""Every tag a rewrite writes into ``node.meta["specdiff"]``, and its caching level.

Why one table built from the passes' own: the inspection report names what each variant
caches per branch (``branch``, ``token``, ...) from these tags, and a hand list there fell
behind every new pass.  A pass that tags nodes declares ``CACHING_LEVELS`` next to its tag
constants and is listed in ``_PASSES``; ``tests/test_inspect.py`` builds every policy's
variants and fails on a tag no pass declared.
"""

from __future__ import annotations

from . import (
    branch_cache_variants,
    forecast_variants,
    rank_partials,
    token_forecast,
    token_lines,
    token_select,
    token_variants,
)

_PASSES = (branch_cache_variants, forecast_variants, token_variants, token_forecast, token_select, token_lines,
           rank_partials)


def _merge() -> dict[str, str]:
    levels: dict[str, str] = {}
    for module in _PASSES:
        for tag, level in module.CACHING_LEVELS.items():
            if levels.get(tag, level) != level:
                raise AssertionError(f"tag {tag!r}: level {level!r} in {module.__name__}, {levels[tag]!r} elsewhere")
            levels[tag] = level
    return levels


CACHING_LEVELS: dict[str, str] = _merge()
"""tag -> caching level, over every pass."""
