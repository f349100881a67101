"""Demo: compile the reference MMDiT with our backend and compare with plain Inductor.

Rows: the default backend (``specdiff_backend``'s configuration), branch reuse (fora) and
token-level SpecDiff.

Speed is a ratio measured in this process against plain Inductor on the same model,
threads pinned, warm-up (and compile) excluded, median of repeats; quality is PSNR of
the final images against the uncached images of the same seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import get_runtime, make_backend
from .device_sync import synchronize as _synchronize
from .quality import psnr


def load_demo_model():
    """The committed reference model, or its architecture with random weights if absent."""
    from .reference.model import ClassConditionalMMDiT, load_reference_model

    try:
        return load_reference_model(), "reference MMDiT (trained, committed weights)"
    except FileNotFoundError:
        torch.manual_seed(0)
        return ClassConditionalMMDiT().eval(), "reference MMDiT architecture, RANDOM weights (no committed weights found)"


def time_sampling(sample_fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(first-call seconds incl. compile, median seconds of ``repeats`` warm calls, images)."""
    t0 = time.perf_counter()
    images = sample_fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        _synchronize()
        t0 = time.perf_counter()
        images = sample_fn()
        _synchronize()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=28, help="sampling steps (default 28)")
    parser.add_argument("--images", type=int, default=4, help="images per run (one per class, cycling)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned)")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--interval", type=int, default=3, help="fora: full step every N steps")
    parser.add_argument("--cache-ratio", type=float, default=0.7,
                        help="specdiff: share of image tokens not computed at partial steps")


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .reference.model import sample

    torch.set_num_threads(args.threads)
    model, description = load_demo_model()
    model = model.to(args.device)
    labels = [i % model.num_classes for i in range(args.images)]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"model: {description}; {args.steps} steps, CFG {args.guidance}, {args.images} images, "
          f"{where}, compiler {args.compiler}")

    default = make_backend(compiler=args.compiler)
    cfg = default.config
    methods = [
        ("baseline", "plain torch.compile", None),
        ("default", f"{cfg.policy}{' lite' if cfg.lite else ''} interval={cfg.interval} (specdiff_backend)", default),
        ("fora", f"interval={args.interval}",
         make_backend(policy="fora", interval=args.interval, compiler=args.compiler)),
        ("specdiff", f"cache_ratio={args.cache_ratio}",
         make_backend(policy="specdiff", cache_ratio=args.cache_ratio, compiler=args.compiler)),
    ]
    rows, reference, base_time = [], None, None
    for name, config, backend in methods:
        torch._dynamo.reset()
        if backend is None:
            compiled = torch.compile(model.transformer, fullgraph=True, dynamic=False,
                                     backend="inductor" if args.compiler == "inductor" else "eager")
        else:
            compiled = torch.compile(model.transformer, backend=backend, fullgraph=True, dynamic=False)

        def sample_fn():
            return sample(model, labels, num_steps=args.steps, guidance_scale=args.guidance, seed=0,
                          transformer=compiled)

        print(f"  {name}: compiling and timing ...", flush=True)
        first, median, images = time_sampling(sample_fn, args.repeats)
        if reference is None:
            reference, base_time = images, median
        stats = get_runtime(compiled).stats() if backend is not None else None
        rows.append([
            name, config, f"{first - median:.1f}", f"{median / args.images * 1000:.1f}",
            f"{base_time / median:.2f}x",
            "ref" if images is reference else f"{psnr(images.cpu(), reference.cpu()):.1f}",
            f"{stats['full_steps'] // stats['trajectories']}/{args.steps}" if stats else f"{args.steps}/{args.steps}",
        ])
    print()
    print(tabulate(rows, headers=["method", "config", "compile s", "ms / image", "speed-up",
                                  "PSNR dB vs baseline", "full steps"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
