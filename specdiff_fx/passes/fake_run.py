"""One fake-tensor run of a graph, for every reader: build-time verification, shapes after a
rewrite, FLOP counts.

Why one: verification (passes/verify.py), the inspection report's costs (inspect/cost.py) and
the runtime's FLOP estimates (policies/flops.py) each ran their own interpreter over fake
tensors, with three ways to fail.  :class:`FakeRun` is torch's ``FakeTensorProp`` (the pass
Inductor and export use to keep ``meta["val"]`` true) plus what they need:

* the first node that fails is named (:class:`VariantVerificationError`), so a fallback says
  where a rewrite went wrong;
* every node's fake value is kept by name, and, when asked, its FLOPs (``FlopCounterMode``,
  attention counted as the two matmuls of the math kernel);
* the graph's metadata is left as it was unless ``write_meta`` (input graphs are never
  mutated; a variant the caller just built may take the new values).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

_MISSING = object()
_COMPUTE = ("call_function", "call_method", "call_module")


class VariantVerificationError(Exception):
    """A graph does not run on fake tensors, or does not return what the original graph returns.

    ``node`` is the name of the first node that failed (or ``"output"``)."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


class FakeRun(FakeTensorProp):
    """Run a graph node by node on fake tensors (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, *, count_flops: bool = False, write_meta: bool = False,
                 mode: FakeTensorMode | None = None) -> None:
        super().__init__(gm, mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True))
        self.extra_traceback = False  # our error names the node already
        self.count_flops, self.write_meta = count_flops, write_meta
        self.values: dict[str, Any] = {}
        self.flops: dict[str, int] = {}

    @property
    def mode(self) -> FakeTensorMode:
        return self._mode

    def run_node(self, n: fx.Node) -> Any:
        before = n.meta.get("val", _MISSING)
        try:
            if self.count_flops and n.op in _COMPUTE:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    result = super().run_node(n)
                self.flops[n.name] = int(counter.get_total_flops())
            else:
                result = super().run_node(n)
        except VariantVerificationError:
            raise
        except Exception as exc:  # any error of any op is the finding we report
            message = str(exc).splitlines()[0] if str(exc) else ""
            raise VariantVerificationError(n.name, f"{n.format_node()} raised {type(exc).__name__}: {message}") from exc
        finally:
            if not self.write_meta:
                if before is _MISSING:
                    n.meta.pop("val", None)
                else:
                    n.meta["val"] = before
        if n.op != "output":
            self.values[n.name] = result
        return result

    def run_fake(self, inputs: Sequence[Any], convert: bool = True) -> Any:
        """The graph's output on ``inputs`` (real tensors converted to fake ones unless
        ``convert`` is False: they were made under :attr:`mode`)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # the math kernel makes attention two counted matmuls; fused CPU kernels count 0
        kernel = sdpa_kernel(SDPBackend.MATH) if self.count_flops else contextlib.nullcontext()
        with torch.no_grad(), kernel:
            return self.propagate(*inputs) if convert else self.propagate_dont_convert_inputs(*inputs)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())
