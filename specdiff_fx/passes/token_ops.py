"""Tensor helpers that token-level rewrites insert into graphs as ``call_function`` nodes.

They are plain torch code, so the eager compiler runs them as they are and Inductor
traces through them.  Batch element ``b`` may use its own token subset: every index
tensor is ``(batch, count)``.
"""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """``x[b, ..., index[b], ...]`` along ``axis`` for each batch element ``b``."""
    batch, count = index.shape
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[axis] = batch, count
    full = list(x.shape)
    full[axis] = count
    return torch.gather(x, axis, index.reshape(shape).expand(full))


def gather_positions(x: torch.Tensor, positions: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Gather a broadcast operand (a RoPE table, say) at token ``positions``.

    ``x`` broadcasts against an ``ndim``-dimensional token tensor; ``axis`` is its own
    token axis.  Leading dims are added so each batch element gets its own rows.
    """
    lead = ndim - x.dim()
    x = x.reshape((1,) * lead + tuple(x.shape))
    return gather_tokens(x, positions, axis + lead)


def layout_positions(index: torch.Tensor, segments: tuple[tuple[str, int], ...]) -> torch.Tensor:
    """Positions in the full sequence of each computed token of a joint layout.

    ``segments`` are the full layout's ``(kind, size)`` in order; image tokens come from
    ``index`` (positions within the image segment), every other segment is kept whole.
    """
    batch = index.shape[0]
    parts, offset = [], 0
    for kind, size in segments:
        if kind == "image":
            parts.append(index + offset)
        else:
            parts.append(torch.arange(offset, offset + size, device=index.device).expand(batch, size))
        offset += size
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def entry_index(positions: torch.Tensor, axis: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Broadcast indices of the entries at ``positions`` (batch, count) of ``like``, a tensor
    whose token axis is ``axis``: one ``arange`` per leading dim (the batch dim sized by
    ``positions``), then the positions; ``like[index]`` holds those entries, ``count`` along ``axis``."""
    batch, count = positions.shape
    index = []
    for dim in range(axis):
        size = batch if dim == 0 else like.shape[dim]
        shape = [1] * (axis + 1)
        shape[dim] = size
        index.append(torch.arange(size, device=positions.device).reshape(shape))
    shape = [1] * (axis + 1)
    shape[0], shape[axis] = batch, count
    index.append(positions.reshape(shape))
    return tuple(index)


def complete_kv(cache: torch.Tensor, fresh: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    """Write the freshly computed keys/values into the per-layer cache, in place, and
    return the whole cache: the other tokens keep the values of the last full step.

    The write indexes the cache itself (one broadcast index per leading dim), not a
    ``movedim`` view of it.  Through a view, functionalisation turns the in-place write into
    "copy the whole cache, scatter, copy it back", which Inductor (torch 2.11, CUDA) did not
    re-inplace: two full passes over every K and V cache per partial step, 1.6 ms of 16.6 ms
    on an H100 at SD3-medium shape (examples/profile_steps.py).
    """
    cache.index_put_(entry_index(positions, axis, cache), fresh.to(cache.dtype))
    return cache


def query_sample(length: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions of ``ceil(length / stride)`` sampled queries: one from each block of ``stride``
    consecutive positions, at a fixed pseudo-random offset within its block.

    Why not every s-th query: image tokens are a raster of a grid whose width the graph does not
    know, and a regular stride aliases with it.  On the reference model (16×16 tokens) stride 16
    samples one column of the image and the C1 top-k overlap with exact importance falls to 0.57
    (PSNR of specdiff at CR 0.8: 22.9 dB against 26.2-26.6 dB for other strides); stride 4 samples
    4 columns and overlaps 0.61, stride 3 walks through all columns and overlaps 0.94.  A fixed
    offset per block, ``frac(b·φ)`` of the block's width for block ``b`` (golden-ratio
    sequence in 16-bit integer arithmetic: deterministic, no RNG state, spread evenly), removes the
    lattice at every grid width (examples/importance_precision.py).
    """
    # device arithmetic with small constants: a graph constant would be a host-to-device copy
    # (a sync) on every eager call, and Triton indexes in int32, where 2654435761 (2^32/φ)
    # does not fit; 40503 = 2^16/φ does, and with the block number taken mod 2^15 every
    # intermediate stays below 2^31 at any sequence length
    blocks = torch.arange(-(-length // stride), device=device)
    start = blocks * stride
    width = (length - start).clamp_max(stride)
    return start + (blocks % 32768) * 40503 % 65536 * width // 65536


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float | None,
                       offset: int, count: int, query_stride: int = 1) -> torch.Tensor:
    """Attention each key token in ``[offset, offset + count)`` receives, summed over heads
    and queries: ``(batch, count)``; run only at full and draft steps.

    ``query_stride=1`` is exact.  ``s > 1`` estimates it from one query in every ``s``
    (:func:`query_sample`), at 1/s of the cost.

    The q·kᵀ product runs in the model's dtype and only the softmax in float32.  With q and k
    upcast first, the record step cost 2.1x a plain step on an H200 at SD3-medium shape in
    bf16; an fp32 matmul without tensor cores and fp32 logits are the likely cause (estimated,
    not profiled).  Rounding the logits to bf16 leaves the C1 ranking on the reference model
    as it was (examples/importance_precision.py: top-k overlap 0.999-1.0, Spearman 0.99998).
    For float32 models nothing changes.
    """
    scale = key.shape[-1] ** -0.5 if scale is None else scale
    if query_stride > 1:
        query = query.index_select(2, query_sample(query.shape[2], query_stride, query.device))
    sampled = query.shape[2]
    if sampled % 8:  # zero queries, sliced off below: the product's rows stay 16-byte aligned
        query = torch.nn.functional.pad(query, (0, 0, 0, -sampled % 8))
    # keys × queries, not queries × keys: the key count (4429 at SD3-medium 1024²) is odd, and a
    # (queries, keys) product with odd rows ran in an unaligned GEMM (cutlass "align1") on an
    # H100, 1.3 ms of a 43.8 ms record step
    logits = torch.matmul(key, query.transpose(-1, -2))[..., :sampled]
    received = torch.softmax(logits.float() * scale, dim=-2).sum(dim=(1, 3))
    return received[:, offset: offset + count]


def compose_tokens(fresh: torch.Tensor, index: torch.Tensor, hist0: torch.Tensor, hist1: torch.Tensor,
                   hist2: torch.Tensor, mix_weights: torch.Tensor, reuse_mask: torch.Tensor) -> torch.Tensor:
    """Full image-token features from the computed subset and the history.

    C1 (``index``): the fresh values.  C2 (``reuse_mask``): the last value ``hist0``.
    C3 (the rest): ``w0*hist0 + w1*hist1 + w2*hist2`` with the runtime's weights.
    """
    mixed = mix_history(hist0, hist1, hist2, mix_weights)
    base = torch.where(reuse_mask.unsqueeze(-1), hist0, mixed)
    rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
    return base.index_put((rows, index), fresh.to(base.dtype))


def mix_history(hist0: torch.Tensor, hist1: torch.Tensor, hist2: torch.Tensor,
                mix_weights: torch.Tensor) -> torch.Tensor:
    """``w0*hist0 + w1*hist1 + w2*hist2``: C3 tokens of a partial step, every token of a
    forecast step (the weights average or extrapolate, as the runtime chooses)."""
    w = mix_weights.to(hist0.dtype)
    return w[0] * hist0 + w[1] * hist1 + w[2] * hist2


# ----------------------------------------------------------------------------- token selection
# score_i = his_i · fut_i · exp(λ · cached_count_i), with ``his`` and ``fut`` normalised to
# mean 1 per batch element so neither scale dominates.  C1 (compute) is the top ``k`` by
# score; C2 (reuse as is) the lowest-scoring tokens holding the bottom ``c2_share`` of the
# score mass; C3 (history mix) the rest.  Called inside the compiled partial variant
# (passes/token_select.py), so a step needs no host work and no device-to-host read.
def normalise(importance: torch.Tensor) -> torch.Tensor:
    """Scale each row to mean 1 (rows of zeros stay uniform ones)."""
    mean = importance.mean(dim=-1, keepdim=True)
    return torch.where(mean > 0, importance / mean.clamp_min(1e-30), torch.ones_like(importance))


def token_scores(his: torch.Tensor, fut: torch.Tensor | None, cached_count: torch.Tensor,
                 lam: float) -> torch.Tensor:
    score = normalise(his.float())
    if fut is not None:
        score = score * normalise(fut.float())
    return score * torch.exp(lam * cached_count.float())


def classify_tokens(scores: torch.Tensor, k: int, c2_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, reuse_mask)``: the C1 subset per row (sorted) and the C2 mask (C3 = neither)."""
    batch, n = scores.shape
    index = torch.topk(scores, k, dim=1).indices.sort(dim=1).values
    c1 = torch.zeros(batch, n, dtype=torch.bool, device=scores.device)
    c1.scatter_(1, index, True)
    rest = scores.masked_fill(c1, float("inf"))
    order = torch.argsort(rest, dim=1)
    sorted_scores = torch.gather(scores.masked_fill(c1, 0.0), 1, order)
    budget = c2_share * scores.sum(dim=1, keepdim=True)
    in_c2_sorted = sorted_scores.cumsum(dim=1) <= budget
    reuse = torch.zeros_like(c1)
    reuse.scatter_(1, order, in_c2_sorted)
    return index, reuse & ~c1


def select_tokens(his: torch.Tensor, fut: torch.Tensor, cached_count: torch.Tensor, k: int,
                  c2_share: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, reuse_mask)`` of a partial step from the runtime's importance buffers."""
    return classify_tokens(token_scores(his, fut, cached_count, lam), k, c2_share)


def update_cached_count(cached_count: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Steps since each token was computed, after a step that computed ``index``: +1, C1 reset to 0."""
    rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
    return (cached_count + 1).index_put((rows, index), torch.zeros((), dtype=cached_count.dtype,
                                                                    device=cached_count.device))
