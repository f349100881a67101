"""The names of a graph's compiled variants, shared by the policies, the runtime and inspect.

A policy builds variants under these names, the runtime picks one per call by name, and the
inspection report and the bench read them back: one spelling for all of them.  Plain strings
(``"full"`` …), so stats, plans and JSON output show them as they always were.

Imports nothing: ``runtime`` and ``policies`` both import it (and ``passes`` may).
"""

FULL = "full"
"""Every block computed; caching policies also record what later steps read (caches, terms,
token history)."""
REUSE = "reuse"
"""fora: every cached branch output reused as stored at the last full step."""
FORECAST = "forecast"
"""taylor/sandwich: the cached residuals forecast from recorded terms; specdiff
(``partial_every`` > 1): every token's own forecast, no token computed."""
PARTIAL = "partial"
"""specdiff: the most important tokens computed, the others composed from their history."""
DRAFT = "draft"
"""specdiff: the self-speculative draft's steps (they record the importance only)."""

VARIANTS = (FULL, REUSE, FORECAST, PARTIAL, DRAFT)
