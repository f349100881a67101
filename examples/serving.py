"""One compiled pipeline serving requests of many shapes: static graphs against dynamic ones.

A FLUX pipeline of tiny random components (tests' fixtures need no downloads) is asked for ten
image sizes and then a batch of two, once compiled with ``dynamic=False`` (a static graph per
shape) and once with ``dynamic=True`` (docs/pipelines.md, "Serving many shapes").  Printed per
setting: the dynamo graphs compiled, and how many calls cached (a call that reached no compiled
graph runs uncompiled and uncached, past dynamo's recompile limit).

    python examples/serving.py
"""

import os
import sys
import warnings

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny_pipelines import build_pipeline  # noqa: E402

from specdiff_fx import compile_pipeline, get_runtime  # noqa: E402

SIZES = [(96, 64), (64, 64), (128, 96), (64, 160), (96, 96), (160, 96), (128, 128), (64, 128), (192, 96),
         (96, 224)]


def serve(dynamic: bool) -> list:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    case = build_pipeline("flux")
    compile_pipeline(case.pipe, policy="fora", compiler="eager", warmup_steps=2, interval=2, dynamic=dynamic)
    requests = [dict(height=h, width=w) for h, w in SIZES] + [dict(height=96, width=96, num_images_per_prompt=2)]
    cached_calls, before = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recompile-limit warning: counted below instead
        for request in requests:
            case(0, **request)
            after = sum(rt.stats()["cached_steps"] for rt in get_runtime(case.pipe.transformer).runtimes)
            cached_calls += after > before
            before = after
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return [f"dynamic={dynamic}", graphs, f"{cached_calls} of {len(requests)}"]


if __name__ == "__main__":
    rows = [serve(False), serve(True)]
    print(tabulate(rows, headers=["compile_pipeline", "graphs", "calls that cached"]))
