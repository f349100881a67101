"""What a dynamic compile costs in speed: static against dynamic graphs on the reference model.

``compile_pipeline`` compiles dynamic graphs by default (docs/design.md, "Shape-general
variants"): one graph serves every size, and Inductor's kernels take the sizes as arguments.
This times, in one process, the reference model's sampling call (28 steps, CFG batched) under
plain Inductor and under lite taylor, each compiled static (``dynamic=False``) and dynamic
(``backend.compile_in_place(..., dynamic=True)``, what ``compile_pipeline`` does), at one
image per call and at 8; the median of the timed calls, after one warm-up call per setting.

    TORCHINDUCTOR_CACHE_DIR=.cache/inductor python examples/dynamic_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tabulate import tabulate

from specdiff_fx import make_backend
from specdiff_fx.backend import compile_in_place
from specdiff_fx.reference.model import load_reference_model, sample

LITE = dict(policy="taylor", lite=True, interval=0, warmup_steps=3, reset_steps=(5, 9, 14, 20))


def compiled(model, backend, dynamic: bool):
    transformer = copy.deepcopy(model.transformer)
    compile_in_place(transformer, backend, fullgraph=True, dynamic=dynamic)
    return transformer


def seconds(model, transformer, images: int, runs: int) -> float:
    labels = torch.arange(images) % model.num_classes
    noise = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(runs + 1):  # the first call compiles (and warms up)
            start = time.perf_counter()
            sample(model, labels, transformer=transformer, batch_cfg=True, noise=noise)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference_model()
    rows = []
    for images in (1, 8):
        got = {}
        for name, backend in (("plain Inductor", lambda: "inductor"), ("taylor lite", lambda: make_backend(**LITE))):
            for dynamic in (False, True):
                torch._dynamo.reset()
                got[name, dynamic] = seconds(model, compiled(model, backend(), dynamic), images, args.runs)
        base = got["plain Inductor", False]
        for (name, dynamic), t in got.items():
            rows.append([images, name, "dynamic" if dynamic else "static", f"{1000 * t:.0f}",
                         f"{base / t:.2f}x", f"{got[name, False] / t:.2f}x"])
    print(tabulate(rows, headers=["images", "denoiser", "graphs", "ms per call", "vs static Inductor",
                                  "vs its static compile"]))


if __name__ == "__main__":
    main()
