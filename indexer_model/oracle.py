"""Oracle selection for DSA measurements: each query attends to the sinks, its local window and the keys that
hold the most of the layer's own dense attention (summed over heads, the target the indexer is trained on).

A measurement reference, never a product path: it computes every query's dense attention in order to choose.
It bounds what a perfect indexer could do at a given k, so a quality loss the oracle shares comes from the top-k
budget itself, not from the indexer.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from dsarag.indexer_model.distill import dense_attention_target
from dsarag.indexer_model.model import Transformer


@torch.no_grad()
def oracle_topk(
    q: Tensor, k: Tensor, q_positions: Tensor, topk: int, n_sink: int, window: int, block: int = 1024
) -> Tensor:
    """Indices (B, T, topk) int64: per query the sinks (positions < n_sink) and the window (t - window < s <= t),
    then the past keys of largest head-summed dense attention; -1 marks unused slots (a query that sees fewer
    than topk keys takes them all). q (B, Hq, T, d) post-RoPE, k (B, Hkv, S, d) with key s at position s."""
    batch, _, seq_len, _ = q.shape
    n_keys = k.shape[2]
    keys = torch.arange(n_keys, device=q.device)[None, :]
    selected = torch.full((batch, seq_len, topk), -1, dtype=torch.long, device=q.device)
    for t0 in range(0, seq_len, block):
        positions = q_positions[t0 : t0 + block, None]
        target = dense_attention_target(q[:, :, t0 : t0 + block], k, q_positions[t0 : t0 + block], block)
        forced = (keys < n_sink) | ((keys > positions - window) & (keys <= positions))
        # Forced keys rank above any probability, future keys below every past one.
        target = target.masked_fill_(forced, 2.0).masked_fill_(keys > positions, -1.0)
        values, indices = target.topk(min(topk, n_keys), dim=-1)
        selected[:, t0 : t0 + block, : indices.shape[-1]] = indices.masked_fill_(values < 0, -1)
    return selected


@contextlib.contextmanager
def oracle_selection(model: Transformer, enabled: bool = True) -> Iterator[None]:
    """Within this block every DSA layer of `model` selects by the oracle (when enabled), on the model's kernels;
    a decode step captured in a CUDA graph still selects by the indexer."""
    if not enabled:
        yield
        return
    backend = model.attention_backend()
    oracle = replace(backend, selection=oracle_topk)  # on the attention only: the Linears keep their products
    for layer in model.layers:
        layer.attention.backend = oracle
    try:
        yield
    finally:
        for layer in model.layers:
            layer.attention.backend = backend
