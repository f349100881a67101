"""What a new prompt length costs a dynamic compile under Inductor, per policy.

Qwen-Image trims each prompt to its own tokens, so a service meets a new text length on nearly
every request.  fora and taylor build their variants once for every size; token-level specdiff
builds per set of sizes (docs/design.md, "Shape-general variants"), so under Inductor each new
length compiles its variants inside the request.  This serves the tiny Qwen-Image pipeline
(tests' fixtures, random weights) prompts of 5, 7, 7, 9, 9 tokens through ``compile_pipeline``
(Inductor, dynamic: the default) and prints each request's seconds:

    TORCHINDUCTOR_CACHE_DIR=.cache/inductor python examples/prompt_length_cost.py
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_serving import SCHEDULES, _qwen_prompt  # noqa: E402
from tiny_pipelines import build_pipeline  # noqa: E402

from specdiff_fx import compile_pipeline  # noqa: E402

LENGTHS = (5, 7, 7, 9, 9)


def main() -> None:
    torch.set_num_threads(2)
    for policy in ("fora", "specdiff"):
        torch._dynamo.reset()
        case = build_pipeline("qwen_image")
        compile_pipeline(case.pipe, policy=policy, **SCHEDULES[policy])
        seconds = []
        for n in LENGTHS:
            start = time.perf_counter()
            case(0, height=64, width=96, **_qwen_prompt(n, seed=n))
            seconds.append(f"{n} tokens: {time.perf_counter() - start:.2f} s")
        print(f"{policy}: " + ", ".join(seconds), flush=True)


if __name__ == "__main__":
    main()
