"""Does the importance estimate survive bf16 logits, or fewer queries?  (Evidence for a cheaper record step.)

Why: on an H200 at SD3-medium shape the full+record step costs 2.1x a plain step (docs/scale.md).
The likely cause is ``token_ops.attention_received`` upcasting q and k to fp32 and materialising the
strided-query logits in fp32.  Computing the q·kᵀ matmul in the model's dtype (bf16) and only the
softmax in fp32 would make it much cheaper on GPU; this script measures what that does to the
*ranking* the method uses, on the trained reference model (CPU is fine: only precision matters).

It runs the specdiff record graph of the reference transformer under an FX interpreter which, at
every ``attention_received`` node, computes the received attention twice: as the graph does (fp32)
and with q, k rounded to bf16 and a bf16 matmul.  Per call it reports the overlap of the top-k sets
(k = (1 - cache_ratio) * N, i.e. C1) and the Spearman rank correlation of the summed importance.

    python examples/importance_precision.py --seeds 4

``--approx-stride S`` compares instead the graph's importance with one computed from every S-th
query (fp32, as the graph does): how much ranking a sparser query sample loses.  Run it with
``--stride 1`` to compare against the exact importance.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.fx as fx

from specdiff_fx.backend import make_backend
from specdiff_fx.passes import token_ops
from specdiff_fx.reference import load_reference_model, sample


def received_bf16(query, key, scale, offset, count, query_stride=1):
    scale = key.shape[-1] ** -0.5 if scale is None else scale
    if query_stride > 1:
        query = query[:, :, ::query_stride]
    logits = torch.matmul(query.bfloat16(), key.bfloat16().transpose(-1, -2))
    received = torch.softmax(logits.float() * scale, dim=-1).sum(dim=(1, 2))
    return received[:, offset: offset + count]


class TwoPrecisions(fx.Interpreter):
    def __init__(self, gm, approx_stride: int | None = None):
        super().__init__(gm)
        self.exact, self.approx = [], []
        self.approx_stride = approx_stride

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target is token_ops.attention_received:
            self.exact.append(out)
            if self.approx_stride is None:
                self.approx.append(received_bf16(*args, **kwargs))
            else:
                self.approx.append(token_ops.attention_received(*args[:5], self.approx_stride))
        return out


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=-1).argsort(dim=-1).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--record-steps", default="2,14", help="steps whose inputs are scored (the full steps before partial ones)")
    parser.add_argument("--cache-ratio", type=float, default=0.7)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--approx-stride", type=int, help="compare with this query stride instead of bf16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_reference_model()
    store = {}

    def recorder(gm, example_inputs, **_):
        store.setdefault("gm", gm)
        store.setdefault("inputs", list(example_inputs))
        return gm

    record_steps = {int(s) for s in args.record_steps.split(",")}
    compiled = torch.compile(model.transformer, backend=recorder, dynamic=False, fullgraph=True)
    overlaps, spearman = [], []
    with torch.no_grad():
        sample(model, [0], num_steps=2, transformer=compiled, seed=0)  # trace once
        gm, inputs = store["gm"], store["inputs"]
        runtime = make_backend(policy="specdiff", compiler="eager", importance_query_stride=args.stride,
                               draft_steps=0).build_runtime(gm, inputs)
        graph = runtime.graphs["full"]
        buffers = runtime.buffers_for("full", 0)
        n_user = len(inputs)
        for seed in range(args.seeds):
            captured = []

            def den(**kw):  # the sampler calls the denoiser; record the flat graph inputs of chosen steps
                captured.append(kw)
                return model.transformer(**kw)

            sample(model, [seed % 6], num_steps=args.steps, transformer=den, seed=seed)
            for step in sorted(record_steps):
                kw = captured[step]
                flat, replaced = list(inputs), set()
                # graph inputs follow dynamo's order: replace the user tensors by this step's
                names = [n.name for n in graph.graph.nodes if n.op == "placeholder"][:n_user]
                for i, name in enumerate(names):
                    key = name[len("l_kwargs_"):-1] if name.startswith("l_kwargs_") else None
                    if key in kw and isinstance(kw[key], torch.Tensor):
                        flat[i] = kw[key]
                        replaced.add(key)
                assert {"hidden_states", "timestep"} <= replaced, replaced
                interp = TwoPrecisions(graph, args.approx_stride)
                interp.run(*flat, *buffers)
                exact = torch.stack(interp.exact).sum(0)
                approx = torch.stack(interp.approx).sum(0)
                n = exact.shape[-1]
                k = round((1 - args.cache_ratio) * n)
                for row in range(exact.shape[0]):
                    a = set(exact[row].topk(k).indices.tolist())
                    b = set(approx[row].topk(k).indices.tolist())
                    overlaps.append(len(a & b) / k)
                    ra, rb = ranks(exact[row]), ranks(approx[row])
                    spearman.append(float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]))
    what = "bf16 vs fp32 logits" if args.approx_stride is None else \
        f"query stride {args.approx_stride} vs {args.stride}"
    print(f"top-{args.cache_ratio:g} C1 overlap, {what}: mean {statistics.fmean(overlaps):.4f} "
          f"min {min(overlaps):.4f} over {len(overlaps)} rows; Spearman mean {statistics.fmean(spearman):.5f} "
          f"min {min(spearman):.5f}")


if __name__ == "__main__":
    main()
