"""PSNR of each forecaster of policy ``taylor`` (lite) at 7 and 6 full steps of 28 on the
reference model: the table in docs/forecasting.md, "Forecasters".

Quality only (the eager compiler: speed does not depend on the forecaster, every one runs
the same graphs).  16 evaluation images (seeds 0-15, batches of 8, CFG 3) against the uncached
images; ``fitted`` is fitted on 8 other images (seeds 10 000-10 007).

    python examples/forecaster_quality.py
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

SCHEDULES = {
    "7 full: 0-2, 5, 9, 14, 20": dict(warmup_steps=3, interval=0, reset_steps=(5, 9, 14, 20)),
    "6 full: 0-2, 6, 12, 18": dict(warmup_steps=3, interval=0, reset_steps=(6, 12, 18)),
    "6 full: 0-2, 6, 13, 20": dict(warmup_steps=3, interval=0, reset_steps=(6, 13, 20)),
}
FORECASTERS = [
    ("taylor", dict()),
    ("taylor, order 2", dict(taylor_order=2)),
    ("newton", dict(taylor_order=2, forecaster="newton")),
    *[(f"hermite σ={s}", dict(forecaster="hermite", forecaster_options={"sigma": s})) for s in (0.5, 0.7, 0.85)],
    *[(f"hermite σ={s}, order 2", dict(taylor_order=2, forecaster="hermite", forecaster_options={"sigma": s}))
      for s in (0.5, 0.7, 0.85)],
    ("fitted", dict(fit=True)),
    ("fitted, order 2", dict(taylor_order=2, fit=True)),
]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model = load_reference_model()
    shape = (3, 32, 32)
    evaluate = make_groups(16, 8, model.num_classes, shape)
    calibrate = make_groups(8, 8, model.num_classes, shape, seed_offset=CALIBRATION_SEED_OFFSET)

    def run(den, groups):
        return torch.cat([sample(model, lab, num_steps=28, guidance_scale=3.0, transformer=den, noise=noise)
                          for lab, noise in groups])

    reference = run(model.transformer, evaluate)
    rows = []
    for name, extra in FORECASTERS:
        row = [name]
        for schedule in SCHEDULES.values():
            torch._dynamo.reset()
            kwargs = dict(extra)
            fit = kwargs.pop("fit", False)
            den = torch.compile(model.transformer, fullgraph=True, dynamic=False,
                                backend=make_backend(policy="taylor", compiler="eager", lite=True, **schedule, **kwargs))
            if fit:
                fit_forecaster(den, lambda: run(den, calibrate))
            row.append(round(psnr(run(den, evaluate), reference), 2))
            assert get_runtime(den).stats()["full_steps"] == 2 * (3 + len(schedule["reset_steps"]))  # 2 groups
        rows.append(row)
        print(row, flush=True)
    print(tabulate(rows, headers=["forecaster (PSNR dB)", *SCHEDULES], tablefmt="github"))


if __name__ == "__main__":
    main()
