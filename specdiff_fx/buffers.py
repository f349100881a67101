"""One description of a runtime-owned buffer, shared by the passes, the runtime and inspect.

A rewritten variant takes extra static inputs (caches, the history ring, scores, weights):
the passes describe them as they add the placeholders, the runtime allocates and hands them
over in that order, and inspect reports their shapes and memory.  One type for all three
means no field-by-field conversion between layers, and the runtime learns what a buffer
holds from its ``role`` and ``ring`` position, never by parsing its name.

Shapes may be symbolic.  A graph dynamo traced with dynamic shapes (``dynamic=True``, or a
second size under automatic dynamic) serves every size with one compiled variant, so a
buffer's shape is then a sympy expression of the graph's size symbols (``s0*s1//256`` image
tokens), not a number: the passes write it down as such, the build compiles against fake
buffers of the symbolic size (:attr:`BufferSpec.example_shape`), and the runtime allocates
each buffer at the sizes of the call it serves (:class:`ShapeBinding` reads them off the
call's inputs; docs/design.md, "Shape-general variants").  Comparing shapes never evaluates
a symbolic size, so no pass adds a guard that would specialize the user's graph.

Imports torch, sympy and the standard library only: ``passes`` and ``runtime`` both import it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

import sympy
import torch


RING = 3
"""Entries of the history ring of exit features (newest first).  A variant writes the oldest,
``RING - 1`` (:data:`RING_WRITE`); the runtime then rotates it to the front."""
RING_WRITE = RING - 1


class BufferRole(str, enum.Enum):
    """What a buffer holds, which tells the runtime what to pass for it.

    Values are the strings the roles always had: ``spec.role == "kv"`` holds and JSON
    output is unchanged.
    """

    # branch level (passes/branch_cache_variants.py, passes/forecast_variants.py)
    BRANCH_CACHE = "branch_cache"      # a branch's output at the last full step
    TAYLOR_TERM = "taylor_term"        # F, D1, D2 of one forecast target
    TAYLOR_COEF = "taylor_coef"        # [c0, c1, a1, a2]
    FORECAST_ERROR = "forecast_error"  # the probe's error estimate
    # token level (passes/token_variants.py, token_select.py, token_forecast.py)
    KV = "kv"                          # one attention site's keys or values
    HISTORY = "history"                # one entry of the ring of exit features
    IMPORTANCE = "importance"          # attention each image token received
    INDEX = "index"                    # the computed subset's token positions
    REUSE_MASK = "reuse_mask"          # tokens reused as is (C2)
    MIX_WEIGHTS = "mix_weights"        # weights of the history ring (C3)
    HIS = "his"                        # importance at the last full step
    FUT = "fut"                        # the draft's importance at this timestep
    COUNT = "count"                    # steps each token has gone uncomputed
    # token lines (passes/token_lines.py)
    LINE = "line"                      # [x, valid, horizon], written before each call
    LINE_VALUE = "line_value"          # each token's residual at its last computation
    LINE_SLOPE = "line_slope"          # first divided difference per entry (tokens, or a K/V cache's)
    LINE_STAMP = "line_stamp"          # where each token was last computed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BufferSpec:
    """One extra graph input: its placeholder name, what it holds, and its layout.

    ``branch``: the residual branch (or chain) a branch-level buffer belongs to.
    ``ring``: for history buffers, the position in the ring of exit features it is
    (0 newest; the entry a variant writes is 2, the oldest, which the runtime then
    rotates to the front).
    """

    name: str
    role: BufferRole
    shape: tuple[int | sympy.Expr, ...]
    dtype: torch.dtype
    device: torch.device
    branch: str = ""
    ring: int | None = None
    example_shape: tuple = field(default=(), compare=False, repr=False)
    """A symbolic spec's shape as the graph's own SymInts, to build its fake example from
    (module docstring); empty for a static spec."""

    def __post_init__(self) -> None:
        if not isinstance(self.role, BufferRole):
            try:
                role = BufferRole(self.role)
            except ValueError:
                known = ", ".join(r.value for r in BufferRole)
                raise ValueError(f"buffer {self.name!r}: unknown role {self.role!r} (known: {known})") from None
            object.__setattr__(self, "role", role)
        if (self.role == BufferRole.HISTORY) != (self.ring is not None):
            raise ValueError(f"buffer {self.name!r}: a ring position goes with role 'history' and only "
                             f"with it (role {self.role.value!r}, ring {self.ring!r})")

    @property
    def symbolic(self) -> bool:
        """The shape depends on the sizes of the call (a dynamic graph's buffer)."""
        return any(not isinstance(s, int) for s in self.shape)

    def at(self, sizes: dict) -> "BufferSpec":
        """This spec at the sizes of one call (``sizes``: size symbol -> int, from
        :meth:`ShapeBinding.sizes`); a static spec is returned as it is."""
        if not self.symbolic:
            return self
        shape = tuple(s if isinstance(s, int) else _concrete(s, sizes, self.name) for s in self.shape)
        return dataclasses.replace(self, shape=shape, example_shape=())

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer (a symbolic one: at the sizes it was built with)."""
        sizes = self.example_shape if self.symbolic else self.shape
        return math.prod(_hint(s) for s in sizes) * torch.empty((), dtype=self.dtype).element_size()


# ----------------------------------------------------------------------------- symbolic sizes
def dim_expr(size) -> int | sympy.Expr:
    """One size as an int, or as the sympy expression of a symbolic size (never evaluated, so
    reading it adds no guard)."""
    if isinstance(size, torch.SymInt):
        size = size.node.expr
    if isinstance(size, sympy.Expr):
        return int(size) if size.is_number else size
    return int(size)


def shape_exprs(shape) -> tuple[int | sympy.Expr, ...]:
    """A shape as :func:`dim_expr` of each size: hashable, comparable without guards."""
    return tuple(dim_expr(s) for s in shape)


def symbolic_example(shape) -> tuple:
    """``shape`` kept as the graph's SymInts for :attr:`BufferSpec.example_shape` where it is
    symbolic; () where it is static (nothing to keep)."""
    return tuple(shape) if any(isinstance(s, torch.SymInt) and not s.node.expr.is_number for s in shape) else ()


def same_shape(a, b) -> bool:
    """Two shapes are the same for every size the graph serves: equal as written, or, for the
    graph's own SymInts, equal by what its shape environment knows already (the guards dynamo
    recorded while tracing).  Neither way adds a guard.

    Why the second: an add of ``x`` (..., 16) and ``gate * f`` (..., E) where E is written
    ``s0*s1 - 2*((s0*s1 + 2)//3)`` (Chroma's modulation, a third of a flattened embedding)
    is traced only with E == 16 guarded: the same size, written two ways.  Compared as
    written, the block's residual branch would be missed and the block would not cache."""
    if len(a) != len(b):
        return False
    if shape_exprs(a) == shape_exprs(b):
        return True
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    for x, y in zip(a, b):
        if dim_expr(x) == dim_expr(y):
            continue
        if not (isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt)):
            return False
        if not statically_known_true(x == y):
            return False
    return True


def symbolic_inputs(values) -> bool:
    """Some input is a SymInt or a tensor with a symbolic size (dynamo traced a dynamic graph)."""
    for x in values:
        if isinstance(x, torch.SymInt):
            return True
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return True
    return False


def _hint(size) -> int:
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else 1
    return int(size)


def _concrete(expr: sympy.Expr, sizes: dict, name: str) -> int:
    value = sympy.sympify(expr.xreplace(sizes))
    if not value.is_number:
        missing = sorted(str(s) for s in value.free_symbols)
        raise ValueError(f"buffer {name!r}: size {expr} needs {', '.join(missing)}, which no input of the call gives")
    return int(value)


@dataclass(frozen=True)
class ShapeBinding:
    """Where each size symbol of a dynamic graph is read at call time: ``(symbol, input index,
    dim)``, dim None for a SymInt input.  Built from the graph's placeholders (their fake
    values carry the symbols; every place a symbol appears), then narrowed by :meth:`only` to
    one source per symbol the buffers use, read on every call (a few attribute reads)."""

    sources: tuple[tuple[sympy.Symbol, int, int | None], ...]

    @classmethod
    def of(cls, example_values) -> "ShapeBinding":
        """The binding of a graph whose placeholders' fake values are ``example_values``."""
        found = []
        for i, v in enumerate(example_values):
            if isinstance(v, torch.SymInt):
                e = v.node.expr
                if isinstance(e, sympy.Symbol):
                    found.append((e, i, None))
            elif isinstance(v, torch.Tensor):
                for d, s in enumerate(v.shape):
                    e = s.node.expr if isinstance(s, torch.SymInt) else None
                    if isinstance(e, sympy.Symbol):
                        found.append((e, i, d))
        return cls(tuple(found))

    @property
    def symbols(self) -> frozenset:
        """Every symbol the binding can read."""
        return frozenset(s for s, _, _ in self.sources)

    def only(self, specs) -> "ShapeBinding":
        """The binding of the symbols ``specs`` use, each read from a tensor's size where one
        gives it (ValueError naming a size no input gives)."""
        self.check(specs)
        used = frozenset(sym for spec in specs for s in spec.shape if not isinstance(s, int) for sym in s.free_symbols)
        return ShapeBinding(tuple(src for src in self.each_once().sources if src[0] in used))

    def each_once(self) -> "ShapeBinding":
        """One source per symbol, a tensor's size where one gives it."""
        chosen: dict = {}
        for sym, i, d in sorted(self.sources, key=lambda src: src[2] is None):
            chosen.setdefault(sym, (sym, i, d))
        return ShapeBinding(tuple(chosen.values()))

    def sizes(self, args) -> dict:
        """Each symbol's value in this call."""
        return {sym: int(args[i]) if d is None else int(args[i].shape[d]) for sym, i, d in self.sources}

    def key(self, args) -> tuple:
        """The call's sizes as a tuple (a change means buffers of other sizes)."""
        return tuple(int(args[i]) if d is None else int(args[i].shape[d]) for _, i, d in self.sources)

    def check(self, specs) -> None:
        """Every size symbol in ``specs`` is read from an input (ValueError naming the first one not)."""
        for spec in specs:
            for s in spec.shape:
                if not isinstance(s, int) and not s.free_symbols <= self.symbols:
                    raise ValueError(f"buffer {spec.name!r} has size {s}, and no input of the graph gives "
                                     f"{', '.join(sorted(map(str, s.free_symbols - self.symbols)))}")
