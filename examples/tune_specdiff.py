"""Quality of specdiff settings on the reference model (eager compiler: the graphs are the
ones Inductor would compile, without the compile time). Used to pick the defaults.

    python examples/tune_specdiff.py --seeds 16 --threads 2
Prints PSNR / SSIM-free quick metrics against the uncached output of the same seeds and
classifier accuracy, one row per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from tabulate import tabulate

from specdiff_fx import get_runtime, make_backend
from specdiff_fx.quality import psnr
from specdiff_fx.reference.classifier import classify
from specdiff_fx.reference.model import load_reference_model, sample


def run(model, labels, backend, args):
    torch._dynamo.reset()
    den = model.transformer if backend is None else torch.compile(
        model.transformer, backend=backend, fullgraph=True, dynamic=False)
    images = torch.cat([
        sample(model, labels[i: i + args.batch], num_steps=args.steps, guidance_scale=args.guidance,
               seed=1000 + i, transformer=den)
        for i in range(0, len(labels), args.batch)
    ])
    stats = get_runtime(den).stats() if backend is not None else None
    return images, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=24)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default="default", choices=["default", "ablate"])
    p.add_argument("--settings", help="JSON list of config dicts to try instead of a grid")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference_model()
    labels = torch.arange(args.seeds) % model.num_classes
    with torch.no_grad():
        base, _ = run(model, labels, None, args)
        acc_base = (classify(base) == labels).float().mean().item()
        rows = [["baseline", "-", "", f"{acc_base:.3f}", ""]]
        if args.settings:
            grid = json.loads(args.settings)
        elif args.grid == "default":
            grid = [dict(cache_ratio=cr, draft_steps=d) for cr in (0.5, 0.75, 0.85) for d in (2, 0)]
            grid += [dict(policy="fora", interval=i) for i in (2, 3)]
        else:
            grid = [dict(cache_ratio=0.75, **dict(zip(("score_lambda", "c2_share", "warmup_steps"), v)))
                    for v in itertools.product((0.1, 0.3, 1.0), (0.0, 0.1, 0.3), (2, 4))]
        for setting in grid:
            cfg = dict(policy="specdiff", compiler="eager")
            cfg.update(setting)
            t0 = time.perf_counter()
            images, stats = run(model, labels, make_backend(**cfg), args)
            acc = (classify(images) == labels).float().mean().item()
            full = stats["full_steps"] / max(stats["trajectories"], 1)
            rows.append([cfg["policy"], ", ".join(f"{k}={v}" for k, v in setting.items() if k != "policy"),
                         f"{psnr(images, base):.2f}", f"{acc:.3f}", f"{full:.0f} full, {time.perf_counter() - t0:.0f}s"])
            print(rows[-1], flush=True)
    print(tabulate(rows, headers=["policy", "setting", "PSNR dB", "accuracy", "notes"]))


if __name__ == "__main__":
    main()
