"""Shared helpers for trajectory-level tests."""

import torch

from specdiff_fx import make_backend

TIMESTEPS_10 = [1000.0 - 100.0 * i for i in range(10)]


def compile_with(model, **config):
    backend = make_backend(**config)
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False), backend


def run_steps(case, model, timesteps, *, batch=2, seed=0):
    """One output per timestep; the latents are fixed so outputs isolate the cache behaviour."""
    outs = []
    with torch.no_grad():
        for t in timesteps:
            outs.append(case.output(model(**case.make_inputs(batch=batch, timestep=t, seed=seed))).clone())
    return outs


def assert_all_close(a, b, atol=1e-5, rtol=1e-5):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"step {i}: {m}")


HOOKED_MODULES = {
    "dit": ("attn1", "ff"),
    "pixart": ("attn1", "attn2", "ff"),
    "sd3": ("attn", "ff", "ff_context"),
}


class BranchOutputReplay:
    """Eager reference built with forward hooks, independent of the graph rewrite:
    at full steps it records each branch module's output, at cached steps it returns
    the recorded output instead of the freshly computed one."""

    def __init__(self, model, names, lists=("transformer_blocks",)):
        self.replay = False
        self.store = {}
        self.handles = []
        for block_name, block in model.named_children():
            if block_name not in lists:
                continue
            for i, blk in enumerate(block):
                for name in names:  # a child of the block, or a dotted path below it
                    try:
                        mod = blk.get_submodule(name)
                    except AttributeError:
                        continue
                    self.handles.append(mod.register_forward_hook(self._hook(f"{block_name}.{i}.{name}")))

    def _hook(self, key):
        def hook(module, args, output):
            if self.replay:
                return self.store[key]
            self.store[key] = output
            return None
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def hook_reference(case, names, timesteps, plan, *, batch=2, seed=0, lists=("transformer_blocks",)):
    """Eager outputs where the branch modules replay their last full-step output at "reuse" steps."""
    hooks = BranchOutputReplay(case.model, names, lists)
    try:
        outs = []
        with torch.no_grad():
            for t, kind in zip(timesteps, plan):
                hooks.replay = kind == "reuse"
                outs.append(case.output(case.model(**case.make_inputs(batch=batch, timestep=t, seed=seed))).clone())
        return outs
    finally:
        hooks.remove()


class PlainMLP(torch.nn.Module):
    """A timestep-conditioned model with no residual branch."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x, timestep):
        return self.net(x) * timestep


def stack_forecast_reference(case, plan, timesteps, first: int):
    """DiT outputs when, at a forecast step of ``plan``, blocks ``first``.. are replaced by the
    first-order forecast ``x + r₂ + (s − s₂)·(r₂ − r₁)/(s₂ − s₁)`` of their residual ``r``
    (recorded at the two last full steps s₁, s₂; ``x`` the input of block ``first``): what a
    lite forecast step computes (with ``first=1``, after a probed first block)."""
    blocks = case.model.transformer_blocks
    state = {"hist": []}

    def pre(module, args, kwargs):
        state["x0"] = args[0] if args else kwargs["hidden_states"]

    def post(module, args, kwargs, output):
        residual = output - state["x0"]
        if state["mode"] == "full":
            state["hist"] = (state["hist"] + [(residual, state["x"])])[-2:]
            return None
        (r1, x1), (r2, x2) = state["hist"]
        return state["x0"] + r2 + (state["x"] - x2) * (r2 - r1) / (x2 - x1)

    handles = [blocks[first].register_forward_pre_hook(pre, with_kwargs=True),
               blocks[-1].register_forward_hook(post, with_kwargs=True)]
    try:
        want = []
        with torch.no_grad():
            for step, (t, kind) in enumerate(zip(timesteps, plan)):
                state.update(mode=kind, x=float(step))
                want.append(case.output(case.model(**case.make_inputs(timestep=t))).clone())
    finally:
        for h in handles:
            h.remove()
    return want
