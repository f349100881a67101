"""One compiled pipeline serving requests of many shapes: static graphs against dynamic ones.

A FLUX and a Qwen-Image pipeline of tiny random components (tests' fixtures need no downloads)
are asked for ten image sizes, then (Qwen-Image) ten prompt lengths, each prompt trimmed to its
tokens as the pipeline encodes one, then batches of two and three images; once compiled with
``dynamic=False`` (a static graph per shape) and once with ``dynamic=True``, the default
(docs/pipelines.md, "Serving many shapes").  Printed per setting: the dynamo graphs compiled,
and how many calls cached (a call that reached no compiled graph runs uncompiled and uncached,
past dynamo's recompile limit).

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


PROMPT_LENGTHS = [5, 7, 3, 12, 9, 4, 16, 6, 11, 8]


def prompt(name: str, length: int) -> dict:
    """Qwen-Image prompt embeddings trimmed to ``length`` tokens (an all-ones mask, which the
    pipeline drops); FLUX's fixture prompt as it is."""
    if name != "qwen_image":
        return {}
    g = torch.Generator().manual_seed(length)
    ones = torch.ones(1, length, dtype=torch.long)
    return dict(prompt_embeds=torch.randn(1, length, 12, generator=g), prompt_embeds_mask=ones,
                negative_prompt_embeds=torch.randn(1, length, 12, generator=g), negative_prompt_embeds_mask=ones)


def cached_steps(case) -> dict[int, int]:
    """Cached steps of each live runtime (specdiff lets the runtimes of its least recent sizes go)."""
    return {id(rt): rt.stats()["cached_steps"] for rt in get_runtime(case.pipe.transformer).runtimes}


def serve(name: str, dynamic: bool) -> list:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    case = build_pipeline(name)
    compile_pipeline(case.pipe, policy="fora", compiler="eager", warmup_steps=2, interval=2, dynamic=dynamic)
    requests = [dict(height=h, width=w, **prompt(name, 8)) for h, w in SIZES]
    if name == "qwen_image":
        requests += [dict(height=64, width=96, **prompt(name, n)) for n in PROMPT_LENGTHS]
    requests += [dict(height=96, width=96, num_images_per_prompt=2, **prompt(name, 8)),
                 dict(height=64, width=128, num_images_per_prompt=3, **prompt(name, 5))]
    cached_calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recompile-limit warning: counted below instead
        for request in requests:
            before = cached_steps(case) if request is not requests[0] else {}
            case(0, **request)
            after = cached_steps(case)
            cached_calls += sum(n - before.get(k, 0) for k, n in after.items()) > 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return [name, f"dynamic={dynamic}", graphs, f"{cached_calls} of {len(requests)}"]


if __name__ == "__main__":
    rows = [serve(name, dynamic) for name in ("flux", "qwen_image") for dynamic in (False, True)]
    print(tabulate(rows, headers=["pipeline", "compile_pipeline", "graphs", "calls that cached"]))
