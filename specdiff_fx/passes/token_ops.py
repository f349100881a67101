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


def complete_kv(cache: torch.Tensor, fresh: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    """Write the freshly computed keys/values into the per-layer cache, in place, and
    return the whole cache: the other tokens keep the values of the last full step."""
    batch = positions.shape[0]
    rows = torch.arange(batch, device=positions.device).unsqueeze(1)
    cache.movedim(axis, 1).index_put_((rows, positions), fresh.movedim(axis, 1).to(cache.dtype))
    return cache


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float | None,
                       offset: int, count: int, query_stride: int = 1) -> torch.Tensor:
    """Attention each key token in ``[offset, offset + count)`` receives, summed over heads
    and queries: ``(batch, count)``; run only at full and draft steps.

    ``query_stride=1`` is exact.  ``s > 1`` estimates it from every s-th query (a
    strided sample that covers the whole image), at 1/s of the cost.

    The q·kᵀ product runs in the model's dtype and only the softmax in float32.  With q and k
    upcast first, the record step cost 2.1x a plain step on an H200 at SD3-medium shape in
    bf16; an fp32 matmul without tensor cores and fp32 logits are the likely cause (estimated,
    not profiled).  Rounding the logits to bf16 leaves the C1 ranking on the reference model
    as it was (examples/importance_precision.py: top-k overlap 0.999-1.0, Spearman 0.99998).
    For float32 models nothing changes.
    """
    scale = key.shape[-1] ** -0.5 if scale is None else scale
    if query_stride > 1:
        query = query[:, :, ::query_stride]
    logits = torch.matmul(query, key.transpose(-1, -2))
    received = torch.softmax(logits.float() * scale, dim=-1).sum(dim=(1, 2))
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
