"""Train the class-conditional MMDiT reference model (rectified flow) on procedural data.

Reproduce the committed weights (see specdiff_fx/reference/weights/TRAINING.md for the exact
command, config and wall time):

    nice -n 5 python examples/train_reference.py --seed 0 --threads 1

Recipe: x_t = (1-t) x0 + t noise, t ~ logit-normal(0, 1), target v = noise - x0, MSE loss;
labels replaced by the null class with p = 0.1 (for CFG); AdamW (betas 0.9/0.99, wd 0.0),
linear warm-up then cosine decay to 10 %; EMA of the weights (decay warm-up
min(ema, (1+s)/(10+s))); the EMA weights are saved. fp32 (bf16 autocast was ~10x slower per
step on this AVX2 CPU). Data are generated on the fly from the seed.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from specdiff_fx.reference.data import NUM_CLASSES, make_batch  # noqa: E402
from specdiff_fx.reference.model import (  # noqa: E402
    DEFAULT_TRANSFORMER_CONFIG,
    WEIGHTS_DIR,
    ClassConditionalMMDiT,
    drop_labels,
    sample,
    save_reference_model,
)


def evaluate(model, n_per_class: int, guidance: float, steps: int, seed: int, device) -> float:
    from specdiff_fx.reference.classifier import classify, load_classifier

    clf = load_classifier(device)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = sample(model, labels, num_steps=steps, guidance_scale=guidance, seed=seed, device=device)
    pred = classify(x, clf)
    return (pred == labels).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--num-layers", type=int, default=DEFAULT_TRANSFORMER_CONFIG["num_layers"])
    ap.add_argument("--heads", type=int, default=DEFAULT_TRANSFORMER_CONFIG["num_attention_heads"])
    ap.add_argument("--head-dim", type=int, default=DEFAULT_TRANSFORMER_CONFIG["attention_head_dim"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (slower on AVX2 CPUs)")
    ap.add_argument("--out", default=WEIGHTS_DIR)
    ap.add_argument("--eval-every", type=int, default=0, help="classifier accuracy of EMA samples every N steps (0: off)")
    ap.add_argument("--eval-n", type=int, default=20, help="samples per class for --eval-every")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)

    width = args.heads * args.head_dim
    tcfg = dict(
        DEFAULT_TRANSFORMER_CONFIG,
        num_layers=args.num_layers,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        caption_projection_dim=width,
    )
    model = ClassConditionalMMDiT(tcfg, num_classes=NUM_CLASSES).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.3f} M  config {json.dumps(tcfg)}", flush=True)
    print(f"args {vars(args)}", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    t0 = time.time()
    run_loss = 0.0
    for step in range(args.steps):
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step)
        x0, y = make_batch(args.batch_size, data_gen)
        y = drop_labels(y, NUM_CLASSES, args.p_uncond, data_gen)
        noise = torch.randn(x0.shape, generator=noise_gen)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=noise_gen))  # logit-normal(0, 1)
        x0, y, noise, t = x0.to(device), y.to(device), noise.to(device), t.to(device)
        tb = t[:, None, None, None]
        xt = (1 - tb) * x0 + tb * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            v = model(xt, 1000.0 * t, y)
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        run_loss += loss.item()
        if (step + 1) % args.log_every == 0:
            el = time.time() - t0
            print(
                f"step {step + 1} loss {run_loss / args.log_every:.4f} lr {lr_at(step):.2e} "
                f"{el:.0f}s ({el / (step + 1):.3f}s/step)",
                flush=True,
            )
            run_loss = 0.0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = evaluate(ema, args.eval_n, 3.0, 28, 1234, device)
            print(f"eval step {step + 1}: EMA 28-step CFG3 accuracy {acc:.3f}", flush=True)
    wall = time.time() - t0
    print(f"training done: {args.steps} steps in {wall:.0f}s ({wall / 60:.1f} min)", flush=True)
    save_reference_model(ema, args.out)
    print("saved EMA weights to", args.out, flush=True)
    if args.eval_every:
        acc = evaluate(ema, args.eval_n, 3.0, 28, 1234, device)
        print(f"eval final: EMA 28-step CFG3 accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
