"""One schedule at 20, 28 and 50 steps: full steps written as step indices against the same
steps written in the sampler's time (``full_at``, progress through the noise schedule).

Quality only (the eager compiler: which steps run full does not depend on the compiler), on the
reference model: 8 images (seeds 0-7, one batch, CFG 3) against the uncached images at the same
step count.  Rows: the 7-full-step schedule of 28 steps (warm-up 0-2, full 5, 9, 14, 20) with
the ``taylor`` forecaster, and ``fitted`` fitted on 8 other images at 28 steps, in the sampler's
time (its ratios serve the other step counts).  The table is in docs/forecasting.md.

    python examples/sampler_time.py
"""

from __future__ import annotations

import warnings

import torch
from tabulate import tabulate

from specdiff_fx import fit_forecaster, get_runtime, make_backend
from specdiff_fx.bench.command import CALIBRATION_SEED_OFFSET
from specdiff_fx.bench.methods import make_groups
from specdiff_fx.quality import psnr
from specdiff_fx.reference.model import load_reference_model, sample

FULL = (5, 9, 14, 20)  # of 28 steps, after warm-up steps 0-2
AT = tuple(s / 28 - 1e-4 for s in FULL)  # the same steps in the sampler's time (just below each step)
STEP_COUNTS = (20, 28, 50)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model = load_reference_model()
    shape = (3, 32, 32)
    evaluate = make_groups(8, 8, model.num_classes, shape)
    calibrate = make_groups(8, 8, model.num_classes, shape, seed_offset=CALIBRATION_SEED_OFFSET)

    def run(den, groups, n):
        return torch.cat([sample(model, lab, num_steps=n, guidance_scale=3.0, transformer=den, noise=noise)
                          for lab, noise in groups])

    def compiled(**fields):
        torch._dynamo.reset()
        backend = make_backend(policy="taylor", lite=True, warmup_steps=3, interval=0, compiler="eager", **fields)
        return torch.compile(model.transformer, fullgraph=True, dynamic=False, backend=backend)

    fitter = compiled(full_at=AT)
    table = fit_forecaster(fitter, lambda: run(fitter, calibrate, 28), sampler_time=True)
    rows = {"step indices full=5,9,14,20, taylor": {}, "full_at (sampler time), taylor": {},
            "full_at (sampler time), fitted at 28 steps": {}}
    for n in STEP_COUNTS:
        reference = run(model.transformer, evaluate, n)
        configs = {
            "step indices full=5,9,14,20, taylor": dict(reset_steps=FULL),
            "full_at (sampler time), taylor": dict(full_at=AT),
            "full_at (sampler time), fitted at 28 steps": dict(
                full_at=AT, forecaster="fitted", forecaster_options={"coefficients_at": table}),
        }
        for label, fields in configs.items():
            den = compiled(**fields)
            out = run(den, evaluate, n)
            full = get_runtime(den).stats()["full_steps"]
            rows[label][n] = f"{psnr(out, reference):.2f} dB ({full}/{n} full)"
    print(tabulate([[label, *(cells[n] for n in STEP_COUNTS)] for label, cells in rows.items()],
                   headers=["schedule, forecaster", *(f"{n} steps" for n in STEP_COUNTS)], tablefmt="github"))


if __name__ == "__main__":
    main()
