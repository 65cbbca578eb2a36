"""Oracle selection for DSA measurements: each query attends to the sinks, its local window and the keys that
hold the most of the layer's own dense attention (summed over heads, the target the indexer is trained on).

A measurement reference, never a product path: it computes every query's dense attention in order to choose.
It bounds what a perfect indexer could do at a given k, so a quality loss the oracle shares comes from the top-k
budget itself, not from the indexer.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

import dsarag.indexer_model.model as model_module
from dsarag.indexer_model.distill import dense_attention_target
from dsarag.indexer_model.dsa import DSAConfig, dsa_attention, sparse_attention


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


def oracle_dsa_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    idx_q: Tensor,
    idx_w: Tensor,
    idx_k_cache: Tensor,
    q_positions: Tensor,
    n_keys: int | None,
    cfg: DSAConfig,
    scale: float | None = None,
) -> Tensor:
    """`indexer_model.dsa.dsa_attention` with the oracle's selection in place of the indexer's (same arguments);
    dense where DSA would be dense, and a CUDA-graph decode step (n_keys None) left to the indexer."""
    if n_keys is None or cfg.runs_dense(n_keys):
        return dsa_attention(q, k_cache, v_cache, idx_q, idx_w, idx_k_cache, q_positions, n_keys, cfg, scale)
    k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
    indices = oracle_topk(q, k, q_positions, cfg.topk, cfg.n_sink, cfg.window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.is_cuda:
        from dsarag.kernels.sparse_attention import sparse_attention as sparse_attention_triton

        return sparse_attention_triton(q, k, v, indices.to(torch.int32), scale)
    return sparse_attention(q, k, v, indices, scale)


@contextlib.contextmanager
def oracle_selection(enabled: bool = True) -> Iterator[None]:
    """Within this block every DSA layer of `indexer_model.model` selects by the oracle (when enabled)."""
    if not enabled:
        yield
        return
    model_module.dsa_attention = oracle_dsa_attention
    try:
        yield
    finally:
        model_module.dsa_attention = dsa_attention
