"""Train the small CNN classifier on the procedural reference data (CPU, a few minutes).

    nice -n 5 python examples/train_classifier.py --seed 0 --steps 1500 --threads 1

Writes specdiff_fx/reference/weights/classifier.safetensors and prints accuracy on fresh data.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from specdiff_fx.reference.classifier import WEIGHTS_DIR, WEIGHTS_FILE, ShapeClassifier  # noqa: E402
from specdiff_fx.reference.data import make_batch, make_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(WEIGHTS_DIR, WEIGHTS_FILE))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1000)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        x, y = make_batch(args.batch_size, g)
        # Light robustness augmentation: additive noise of random strength on half the batch
        # (model samples are slightly noisy/blurry compared to the clean renders).
        sig = (torch.rand(x.shape[0], 1, 1, 1, generator=g) < 0.5) * 0.15 * torch.rand(x.shape[0], 1, 1, 1, generator=g)
        x = x + sig * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    xs, ys = make_dataset(1200, seed=12345)
    with torch.no_grad():
        acc = (model(xs).argmax(1) == ys).float().mean().item()
    print(f"held-out accuracy on fresh real data: {acc:.4f}  wall {time.time() - t0:.0f}s")
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, args.out)
    print("saved", args.out)


if __name__ == "__main__":
    main()
