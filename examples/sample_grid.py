"""Sample the reference model (uncached, Euler, CFG), score with the classifier, save a grid.

    python examples/sample_grid.py                       # docs/reference_samples.png + accuracy
    python examples/sample_grid.py --n-per-class 100 --no-grid   # accuracy only

Rows of the grid = classes (0..5), columns = different seeds. Prints overall and per-class
classifier accuracy and the Frechet distance (classifier features) to real data.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from specdiff_fx.reference.classifier import classify, features, frechet_distance, load_classifier  # noqa: E402
from specdiff_fx.reference.data import CLASS_NAMES, NUM_CLASSES, make_dataset, save_grid  # noqa: E402
from specdiff_fx.reference.model import WEIGHTS_DIR, load_reference_model, sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=WEIGHTS_DIR)
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=150, help="classes x samples per sampler call")
    ap.add_argument("--grid", default=os.path.join(os.path.dirname(__file__), "..", "docs", "reference_samples.png"))
    ap.add_argument("--grid-cols", type=int, default=10)
    ap.add_argument("--no-grid", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = load_reference_model(dev, args.weights)
    clf = load_classifier(dev)
    real, _ = make_dataset(max(600, NUM_CLASSES * args.n_per_class), seed=777)
    f_real = features(real.to(dev), clf)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.n_per_class)
    for gs in args.guidance:
        t0 = time.time()
        outs = []
        for i in range(0, labels.shape[0], args.batch):
            outs.append(sample(model, labels[i : i + args.batch], num_steps=args.steps, guidance_scale=gs,
                               seed=args.seed + i, shift=args.shift, device=dev).cpu())
        x = torch.cat(outs)
        pred = classify(x.to(dev), clf)
        acc = (pred == labels).float().mean().item()
        per = [(pred[labels == c] == c).float().mean().item() for c in range(NUM_CLASSES)]
        fd = frechet_distance(features(x.to(dev), clf), f_real)
        print(f"guidance {gs} steps {args.steps} shift {args.shift}: accuracy {acc:.3f} "
              f"({len(labels)} samples) FD {fd:.2f}  per-class "
              + " ".join(f"{n}={p:.2f}" for n, p in zip(CLASS_NAMES, per))
              + f"  [{time.time() - t0:.0f}s]", flush=True)
    if not args.no_grid:
        k = args.grid_cols
        gl = torch.arange(NUM_CLASSES).repeat_interleave(k)
        x = sample(model, gl, num_steps=args.steps, guidance_scale=args.guidance[0], seed=args.seed, shift=args.shift, device=dev)
        save_grid(x.cpu(), args.grid, nrow=k, scale=3)
        print("saved grid", args.grid)


if __name__ == "__main__":
    main()
