"""Five full steps of 28: least-squares ``fitted`` coefficients, then refined on the final images.

Runs the tuner (``specdiff_fx.tune.tune``) on the reference model as ``specdiff-fx tune`` does
(Inductor, calibration seeds 20000-20015 in two batches of 8: one fits, one scores; step costs
measured here), on four explicit schedules of five full steps (warm-up 0-1 and three more), with
the ``fitted`` forecaster only, and ``refine=4``: each fitted table is then refined on the fit
batch's final images (``specdiff_fx.refine_forecaster``).  Prints every trial and saves the
choice (the config ``docs/tuned_5x_refined.json`` came from this script; measure it with
``specdiff-fx bench --tuned docs/tuned_5x_refined.json``).  About 15 minutes on 2 cores.

    python examples/refine_5full.py [--out tuned.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from specdiff_fx import make_backend
from specdiff_fx.bench.methods import make_groups
from specdiff_fx.bench.tune_command import TUNE_SEED_OFFSET
from specdiff_fx.demo import load_demo_model
from specdiff_fx.reference.model import sample
from specdiff_fx.tune import Schedule, measure_costs, tune

STEPS = 28
SCHEDULES = [Schedule(2, (4, 10, 17)), Schedule(2, (4, 9, 16)), Schedule(2, (3, 9, 16)), Schedule(2, (4, 11, 18))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tuned.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_demo_model()
    model.eval()
    cfg = model.transformer.config
    groups = make_groups(16, 8, model.num_classes, (cfg.in_channels, cfg.sample_size, cfg.sample_size),
                         seed_offset=TUNE_SEED_OFFSET)

    def sample_with(denoiser, batches):
        return torch.cat([sample(model, groups[i][0], num_steps=STEPS, transformer=denoiser, noise=groups[i][1])
                          for i in batches])

    plain = torch.compile(model.transformer, backend="inductor", fullgraph=True, dynamic=False)
    reference = [sample_with(plain, [i]) for i in range(len(groups))]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        sample_with(plain, [0])
        times.append(time.perf_counter() - start)
    target = torch.compile(model.transformer, backend=make_backend(policy="taylor", lite=True), fullgraph=True,
                           dynamic=False)
    costs = measure_costs(target, lambda: sample_with(target, [0]), min(times), STEPS, 3)
    result = tune(target, lambda batches: sample_with(target, batches), reference, costs, min_psnr=30.0,
                  fit_batches=[0], eval_batches=[1], schedules=SCHEDULES, forecasters=(("fitted", {}),), refine=4)
    print(result.table())
    for note in result.notes:
        print("note:", note)
    result.save(args.out)
    print(f"chosen: {result.chosen.schedule} {result.chosen.forecaster_label}, {result.chosen.psnr:.2f} dB on the "
          f"scoring images; written to {args.out}")


if __name__ == "__main__":
    main()
