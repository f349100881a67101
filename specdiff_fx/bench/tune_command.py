"""``specdiff-fx tune``: choose policy ``taylor``'s schedule and forecaster on the reference model
for a requested speed-up (``--speedup``) or quality (``--psnr``), and save it as a config.

With several step counts (``--steps 28,20,50``) every candidate is also scored at the others
and the choice is the one whose lowest PSNR over them meets the request (specdiff_fx/tune.py);
the speed-up is asked of the first count.

The calibration images use their own seeds (never the bench's evaluation seeds, nor the
anchors' calibration seeds), half to fit the ``fitted`` forecaster, half to score every
candidate; speed comes from step costs measured here, and the leading candidates are timed
against the uncached run before the choice (specdiff_fx/tune.py).  The saved
config runs in the bench as a row: ``specdiff-fx bench --tuned PATH``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TUNE_SEED_OFFSET = 20_000  # calibration seeds of the tuner (bench: 0…, anchors: 10 000…)


def _step_counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 2 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"step counts must be distinct integers >= 2, got {text!r}")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    want = parser.add_mutually_exclusive_group(required=True)
    want.add_argument("--speedup", type=float, help="the speed-up wanted: the best PSNR at or above it")
    want.add_argument("--psnr", type=float, help="the PSNR wanted (dB vs uncached): the fastest at or above it")
    parser.add_argument("--steps", type=_step_counts, default=[28],
                        help="sampling steps, or comma-separated step counts the config must hold at (e.g. 28,20,50: "
                             "speed asked of the first, PSNR the lowest over all; default 28)")
    parser.add_argument("--seeds", type=int, default=16, help="calibration images, half fit, half score (default 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sample() call (default 8)")
    parser.add_argument("--full-counts", help="comma-separated full-step counts to try (default: from --speedup)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, pinned (default 2)")
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step-cost measurement (default 3)")
    parser.add_argument("--timed", type=int, default=4,
                        help="leading candidates timed against the uncached run before choosing (default 4; 0: "
                             "choose by the step-cost model alone)")
    parser.add_argument("--refine", type=int, default=0, metavar="N",
                        help="refine the N best fitted candidates of each full-step count on the fit images' final "
                             "outputs (specdiff_fx.calibrate.refine_forecaster; a few hundred cached runs each; "
                             "default 0)")
    parser.add_argument("--out", default="tuned.json", help="where to save the chosen config (default tuned.json)")
    parser.add_argument("--report", metavar="PATH", help="write the trials as a Markdown table")
    parser.add_argument("--plot", metavar="PATH", help="write the trials' speed/PSNR plot as PNG")


def run(args: argparse.Namespace) -> int:
    from .. import make_backend
    from ..demo import load_demo_model
    from ..reference.model import sample
    from ..tune import OtherSteps, measure_costs, tune
    from .methods import make_groups

    if args.seeds < 2 * args.batch_size or args.seeds % args.batch_size:
        raise ValueError("--seeds must be a multiple of --batch-size and hold at least two batches")
    torch.set_num_threads(args.threads)
    model, description = load_demo_model()
    model.eval()
    cfg = model.transformer.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    groups = make_groups(args.seeds, args.batch_size, model.num_classes, shape, seed_offset=TUNE_SEED_OFFSET)
    half = len(groups) // 2

    def sample_with(den, batches, steps=args.steps[0]):
        return torch.cat([sample(model, groups[i][0], num_steps=steps, transformer=den, noise=groups[i][1])
                          for i in batches])

    def uncached_seconds(steps: int) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sample_with(plain, [0], steps)
            times.append(time.perf_counter() - start)
        return min(times)  # as the step costs: interference only ever adds time

    plain = torch.compile(model.transformer, backend=args.compiler, fullgraph=True, dynamic=False)
    steps, *more = args.steps
    reference = [sample_with(plain, [i]) for i in range(len(groups))]
    uncached = uncached_seconds(steps)
    target = torch.compile(model.transformer, backend=make_backend(policy="taylor", lite=True, compiler=args.compiler),
                           fullgraph=True, dynamic=False)
    costs = measure_costs(target, lambda: sample_with(target, [0]), uncached, steps, args.repeats)
    others = []
    for m in more:
        def run_at(batches, m=m):
            return sample_with(target, batches, m)

        m_reference = [sample_with(plain, [i], m) for i in range(len(groups))]
        m_costs = measure_costs(target, lambda m=m: sample_with(target, [0], m), uncached_seconds(m), m, args.repeats)
        others.append(OtherSteps(m, run_at, m_reference, m_costs))
    counts = [int(c) for c in args.full_counts.split(",")] if args.full_counts else None

    def timer() -> float:
        """The target as configured against the uncached run, timed alternately: median ratio."""
        sample_with(target, [0])  # untimed: the first call after re-pointing
        ratios = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sample_with(plain, [0])
            middle = time.perf_counter()
            sample_with(target, [0])
            ratios.append((middle - start) / (time.perf_counter() - middle))
        return statistics.median(ratios)

    result = tune(target, lambda batches: sample_with(target, batches), reference, costs,
                  speedup=args.speedup, min_psnr=args.psnr, fit_batches=range(half),
                  eval_batches=range(half, len(groups)), full_counts=counts,
                  timer=None if args.timed == 0 else timer, timed=args.timed, other_steps=others,
                  refine=args.refine)
    print(f"model: {description}; {','.join(map(str, args.steps))} steps, {args.seeds} calibration images "
          f"(seeds {TUNE_SEED_OFFSET}+), threads {args.threads}, compiler {args.compiler}")
    for c in [costs] + [o.costs for o in others]:
        print(f"measured per run of {args.batch_size} images at {c.num_steps} steps: uncached {c.uncached:.3f} s, "
              f"all full {c.all_full:.3f} s, one full {c.one_full:.3f} s")
    print(result.table())
    for note in result.notes:
        print("note:", note)
    chosen = result.chosen
    measured = "" if chosen.measured_speedup is None else f", measured {chosen.measured_speedup:.2f}x"
    print(f"\nchosen: {chosen.schedule} forecaster={chosen.forecaster_label}: predicted {chosen.predicted_speedup:.2f}x"
          f"{measured}, {chosen.psnr:.2f} dB on the scoring images")
    for m, score in chosen.at_steps.items():
        print(f"  at {m} steps: {score.full_steps} full, predicted {score.predicted_speedup:.2f}x, {score.psnr:.2f} dB")
    result.save(args.out)
    print(f"config written to {args.out} (specdiff_fx.tune.load_config; specdiff-fx bench --tuned {args.out})")
    if args.report:
        with open(args.report, "w") as f:
            f.write(f"# specdiff-fx tune {result.request}\n\n{result.table()}\n")
    if args.plot:
        from .plot import tune_plot

        tune_plot(result, args.plot)
    return 0
