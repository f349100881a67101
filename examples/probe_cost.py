"""What taylor's error probe costs, as a share of a full step, in FLOPs.

Why: the probe (``probe=True`` / ``tolerance``) makes every forecast step compute the first
block again.  This counts matmul-like FLOPs (``specdiff_fx.policies.flops.count_flops``: the
``torch.utils.flop_counter`` on fake tensors, attention through the math kernel) of the
original graph (a full step) and of the forecast variants the backend builds: lite without
and with the probe, and per branch without and with it.  The probe's cost is the difference
of a variant with and without it.  Used for the table in docs/forecasting.md ("The error
probe"):

    TORCHINDUCTOR_CACHE_DIR=.cache/inductor python examples/probe_cost.py
"""

from __future__ import annotations

import argparse

import torch

from specdiff_fx.passes import find_residual_branches
from specdiff_fx.passes.forecast_variants import build_forecast_variant, lite_targets, probe_targets
from specdiff_fx.policies.flops import count_flops
from specdiff_fx.testing.tiny_models import build_tiny


def capture(model: torch.nn.Module, kwargs: dict):
    """The torch-level FX graph dynamo hands a backend, and its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(**kwargs)
    return graphs[0]


def variant_flops(gm, example, targets, probe=()) -> int:
    forecast, specs = build_forecast_variant(gm, targets, probe_branches=probe)
    return count_flops(forecast, example + [torch.zeros(s.shape, dtype=s.dtype) for s in specs])


def measure(name: str, model: torch.nn.Module, kwargs: dict) -> dict:
    gm, example = capture(model, kwargs)
    branches = find_residual_branches(gm)
    first = branches[0].block
    full = count_flops(gm, example)
    lite = lite_targets(gm, branches)
    lite_probed = lite_targets(gm, branches, probe_first_block=True)
    row = {
        "model": name,
        "blocks": len({b.block for b in branches}),
        "full": full,
        "lite": variant_flops(gm, example, lite),
        "lite+probe": variant_flops(gm, example, lite_probed, probe_targets(lite_probed, first)),
        "per_branch": variant_flops(gm, example, branches),
        "per_branch+probe": variant_flops(gm, example, branches, probe_targets(branches, first)),
    }
    row["probe_share_lite"] = (row["lite+probe"] - row["lite"]) / full
    row["probe_share_per_branch"] = (row["per_branch+probe"] - row["per_branch"]) / full
    return row


def reference_case(layers: int | None = None, batch: int = 16):
    """The reference model's transformer (the bench's batch: 8 images with CFG); with
    ``layers``, the same widths at that depth (random weights: FLOPs only)."""
    from diffusers import SD3Transformer2DModel

    from specdiff_fx.reference.model import load_reference_model

    model = load_reference_model()
    transformer = model.transformer
    if layers is not None:
        transformer = SD3Transformer2DModel(**dict(model.transformer_config, num_layers=layers)).eval()
    labels = torch.arange(batch) % (model.num_classes + 1)
    ehs, pooled = model.class_condition(labels)
    size = transformer.config.sample_size
    kwargs = dict(hidden_states=torch.randn(batch, transformer.config.in_channels, size, size),
                  encoder_hidden_states=ehs.detach(), pooled_projections=pooled.detach(),
                  timestep=torch.full((batch,), 500.0), return_dict=False)
    return transformer.eval(), kwargs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deep", type=int, default=24, help="also the reference widths at this depth (0: skip)")
    args = p.parse_args()
    rows = []
    for family in ("sd3", "flux"):
        case = build_tiny(family)
        rows.append(measure(f"tiny {family}", case.model.eval(), case.make_inputs()))
    rows.append(measure("reference (SD3 MMDiT, 4 blocks, batch 16)", *reference_case()))
    if args.deep:
        rows.append(measure(f"reference widths, {args.deep} blocks, batch 16", *reference_case(args.deep)))
    print("| model | blocks | full step (MFLOP) | lite forecast | lite + probe | probe / full step (lite) "
          "| probe / full step (per branch) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['blocks']} | {r['full'] / 1e6:.2f} | {r['lite'] / r['full']:.3f} "
              f"| {r['lite+probe'] / r['full']:.3f} | {r['probe_share_lite']:.3f} "
              f"| {r['probe_share_per_branch']:.3f} |")


if __name__ == "__main__":
    main()
