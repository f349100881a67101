"""Quality of bf16/fp16 caches (``SpecDiffConfig.cache_dtype``) on the reference model.

Runs the bench's workload (16 seeds in batches of 8, 28 steps, CFG) with the eager compiler,
since only quality is measured here, and prints PSNR against the uncached images and the cache
memory for each cache dtype:

    TORCHINDUCTOR_CACHE_DIR=.cache/inductor python examples/cache_dtype_quality.py
"""

from __future__ import annotations

import argparse

import torch

from specdiff_fx.bench import command
from specdiff_fx.bench.methods import _backend_method, baseline_method

ROWS = {
    "taylor-lite full=5,10,15,20": dict(policy="taylor", lite=True, interval=0, warmup_steps=3,
                                         reset_steps=(5, 10, 15, 20)),
    "taylor interval=3": dict(policy="taylor", lite=False, interval=3, warmup_steps=3),
    "fora interval=3": dict(policy="fora", interval=3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    command.add_arguments(parser)
    args = command._resolve(parser.parse_args(["--seeds", "16", "--batch-size", "8", "--repeats", "1",
                                               "--compiler", "eager", "--no-progress"]))
    torch.set_num_threads(args.threads)
    bench = command.Bench(args)
    bench.run(baseline_method(), None)
    print(f"{'row':30s} {'cache dtype':12s} {'cache MiB':>10s} {'PSNR dB':>8s}")
    for label, config in ROWS.items():
        for dtype in (None, "bfloat16", "float16"):
            row = bench.run(_backend_method(config["policy"], label, label, cache_dtype=dtype, **config), None)
            mib = (row["info"] or {}).get("cache_bytes", 0) / 2**20
            print(f"{label:30s} {dtype or 'model (fp32)':12s} {mib:10.2f} {row['psnr']:8.2f}")


if __name__ == "__main__":
    main()
