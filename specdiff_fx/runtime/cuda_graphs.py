"""CUDA graphs for the compiled variants: ``SpecDiffConfig(cudagraphs=True)``.

Why: on a GPU a cached step of a small or mid-size model is bound by kernel launches and
host work, not by arithmetic (docs/scale.md). Replaying a captured graph launches a whole
variant at once.

How it fits the runtime: every variant is called as ``fn(*graph_inputs, *buffers)``, where
the buffers are the runtime's cache slot (runtime/slots.py), allocated once per slot
and only ever written in place. So a variant is captured once per cache slot, keyed by the
addresses of its buffers, with those very buffers as the graph's static inputs: the
variant's in-place cache writes land where the runtime reads them, and nothing is copied.
Graph inputs that are ``nn.Parameter`` are used in place too (their addresses are checked
at every replay; a moved parameter means a new capture). Every other tensor input
(latents, timestep, text embeddings) is copied into a static tensor before each replay,
and outputs are cloned out of the graph's memory, so a caller may keep them across calls
(separate cond/uncond calls do).

The first call of a (variant, slot) runs uncaptured: it is the warm-up Inductor and cuBLAS
need before capture, and it computes that call's result. The second call captures and then
replays. A capture that fails (an op that syncs with the host) is a loud, documented
fallback: that variant runs uncaptured from then on.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

MAX_CAPTURES = 8
"""Captures kept per variant (a new cache slot or a new input signature makes a new one)."""


class _Capture:
    __slots__ = ("graph", "static_args", "copied", "params", "outputs", "replays")

    def __init__(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_args: list[Any] = []
        self.copied: list[int] = []                 # arg positions copied in before each replay
        self.params: list[tuple[int, int]] = []      # (position, data_ptr) used in place
        self.outputs: Any = None
        self.replays = 0


class CudaGraphVariant:
    """A compiled variant replayed from CUDA graphs, one capture per cache slot.

    ``num_inputs``: how many leading arguments are the dynamo graph's inputs; the rest are
    the runtime's cache buffers (static by construction). None: all of them are inputs.
    """

    def __init__(self, fn: Callable, num_inputs: int | None, name: str = "variant") -> None:
        self.fn, self.num_inputs, self.name = fn, num_inputs, name
        self._captures: OrderedDict[tuple, _Capture] = OrderedDict()
        self._warm: set[tuple] = set()
        self.failed: str | None = None

    @property
    def captures(self) -> int:
        return len(self._captures)

    @property
    def replays(self) -> int:
        return sum(c.replays for c in self._captures.values())

    def _is_input(self, i: int) -> bool:
        return self.num_inputs is None or i < self.num_inputs

    def _key(self, args: Sequence[Any]) -> tuple:
        key = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                stable = not self._is_input(i) or isinstance(a, torch.nn.Parameter)
                key.append((a.data_ptr() if stable else None, tuple(a.shape), a.dtype, a.device))
            else:
                key.append(("const", a))
        return tuple(key)

    def __call__(self, *args: Any) -> Any:
        if self.failed is not None:
            return self.fn(*args)
        if any(isinstance(a, torch.Tensor) and not a.is_cuda for a in args):
            self.failed = "an input is not on a CUDA device"
            warnings.warn(f"specdiff: cudagraphs off for the {self.name} variant: {self.failed}",
                          RuntimeWarning, stacklevel=2)
            return self.fn(*args)
        key = self._key(args)
        cap = self._captures.get(key)
        if cap is None:
            if key not in self._warm:  # warm-up: the real call, uncaptured
                self._warm.add(key)
                return self.fn(*args)
            cap = self._capture(args)
            if cap is None:
                return self.fn(*args)
            self._captures[key] = cap
            while len(self._captures) > MAX_CAPTURES:
                self._captures.popitem(last=False)
        else:
            self._captures.move_to_end(key)
        for i in cap.copied:
            cap.static_args[i].copy_(args[i])
        cap.graph.replay()
        cap.replays += 1
        return _clone_out(cap.outputs)

    def _capture(self, args: Sequence[Any]) -> _Capture | None:
        cap = _Capture()
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and self._is_input(i) and not isinstance(a, torch.nn.Parameter):
                cap.static_args.append(a.clone())
                cap.copied.append(i)
            else:
                cap.static_args.append(a)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                cap.outputs = self.fn(*cap.static_args)
        except Exception as exc:  # a host sync inside the variant, an uncapturable op
            self.failed = f"capture failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"specdiff: cudagraphs off for the {self.name} variant: {self.failed}",
                          RuntimeWarning, stacklevel=3)
            self._captures.clear()
            return None
        cap.graph = graph
        log.info("specdiff: captured the %s variant (%d copied inputs)", self.name, len(cap.copied))
        return cap


def _clone_out(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_out(o) for o in out)
    return out
