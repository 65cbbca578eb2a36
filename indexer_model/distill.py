"""KL distillation of the lightning indexer from the frozen model's dense attention (DSA warm-up).

Target p[t, :] = the layer's dense attention probabilities summed over heads and L1-normalized;
loss = mean_t KL(p[t, :] || softmax(I[t, :])). The sparse stage restricts both to the selected set, optionally
plus a weighted dense KL that keeps the keys outside the set in the loss.
Main-model q (B, Hq, T, d) and k (B, Hkv, S, d) are post-RoPE, key s at position s; index scores are
(B, T, S) with -inf on future keys.
"""

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from indexer_model.indexer import index_scores, stack_sets


@torch.no_grad()
def dense_attention_target(
    q: Tensor, k: Tensor, positions: Tensor, block: int = 1024, scale: float | None = None, sets: int = 1
) -> Tensor:
    """p (B, T, S) float32, rows summing to 1; one block of queries at a time (Hq x block x S scores).

    sets > 1: one target per index set, (B, sets, T, S), each summed over the query heads its kv heads serve."""
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    keys_t = k.float().transpose(-1, -2)
    key_positions = torch.arange(n_keys, device=k.device)
    target = torch.empty(batch, sets, seq_len, n_keys, device=q.device)
    for t0 in range(0, seq_len, block):
        q_blk = q[:, :, t0 : t0 + block].float()
        n_queries = q_blk.shape[2]
        # The G query heads of a kv group share its keys: one matmul per kv head, no repeated K.
        scores = q_blk.reshape(batch, n_kv_heads, group * n_queries, head_dim) @ keys_t * scale
        scores = scores.view(batch, n_heads, n_queries, n_keys)
        future = key_positions[None, :] > positions[t0 : t0 + block, None]
        probs = scores.masked_fill_(future, float("-inf")).softmax(dim=-1)
        probs = probs.view(batch, sets, n_heads // sets, n_queries, n_keys).sum(dim=2)
        target[:, :, t0 : t0 + block] = probs / probs.sum(dim=-1, keepdim=True)
    return target[:, 0] if sets == 1 else target


def _kl_per_row(target_p: Tensor, scores: Tensor) -> Tensor:
    """KL(p || softmax(scores)) per row; entries with p = 0 (future keys) contribute nothing."""
    log_q = scores.log_softmax(dim=-1).masked_fill(target_p == 0, 0.0)
    return (torch.xlogy(target_p, target_p) - target_p * log_q).sum(dim=-1)


def _restrict_to_selected(target_p: Tensor, scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Target renormalized over the selected keys and their index scores, both (B, T, topk)."""
    valid = indices >= 0
    safe = indices.clamp(min=0)
    target = target_p.gather(-1, safe).masked_fill(~valid, 0.0)
    target = target / target.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
    return target, scores.gather(-1, safe).masked_fill(~valid, float("-inf"))


def indexer_kl_loss(target_p: Tensor, index_scores: Tensor) -> Tensor:
    """Dense warm-up loss: mean over queries of KL(p[t, :] || softmax(I[t, :]))."""
    return _kl_per_row(target_p, index_scores).mean()


def indexer_kl_loss_sparse(target_p: Tensor, index_scores: Tensor, indices: Tensor) -> Tensor:
    """Sparse-stage loss: the same KL over each query's selected keys only (indices (B, T, topk), -1 unused)."""
    return _kl_per_row(*_restrict_to_selected(target_p, index_scores, indices)).mean()


def _block_kl_sum(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    idx_q: Tensor,
    idx_w: Tensor,
    idx_k: Tensor,
    indices: Tensor | None,
    scale: float | None,
    dense_weight: float,
) -> Tensor:
    keys_seen = min(k.shape[2], int(positions.max()) + 1)  # later keys are future to every query here
    sets = 1 if idx_w.dim() == 3 else idx_w.shape[2]
    target = dense_attention_target(q, k[:, :, :keys_seen], positions, q.shape[2], scale, sets)
    key_positions = torch.arange(keys_seen, device=idx_k.device)
    scores = stack_sets(
        idx_w, lambda w: index_scores(idx_q, w, idx_k[:, :keys_seen], positions, key_positions)
    )
    if indices is None:
        return _kl_per_row(target, scores).sum()
    sparse = _kl_per_row(*_restrict_to_selected(target, scores, indices)).sum()
    return sparse + dense_weight * _kl_per_row(target, scores).sum() if dense_weight else sparse


def blockwise_indexer_kl_loss(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    idx_q: Tensor,
    idx_w: Tensor,
    idx_k: Tensor,
    indices: Tensor | None = None,
    block: int = 1024,
    scale: float | None = None,
    dense_weight: float = 0.0,
) -> Tensor:
    """indexer_kl_loss (or the sparse variant when indices are given, plus dense_weight x the dense loss) one
    block of queries at a time.

    q, k: the frozen layer's attention inputs (no gradient); idx_q (B, T, H_I, d_I), idx_w (B, T, H_I) and
    idx_k (B, S, d_I) from LightningIndexer.project, whose parameters get the gradient (idx_w (B, T, sets, H_I)
    and indices (B, sets, T, k): each set learns the heads it serves, the loss is the mean). Each block is
    recomputed in backward (activation checkpointing), so memory is O(Hq x block x S) at any length.
    """
    batch, seq_len = idx_q.shape[:2]
    sets = 1 if idx_w.dim() == 3 else idx_w.shape[2]
    total = idx_q.new_zeros((), dtype=torch.float32)
    for t0 in range(0, seq_len, block):
        rows = slice(t0, t0 + block)
        block_indices = None if indices is None else indices[..., rows, :]
        total = total + checkpoint(
            _block_kl_sum,
            q[:, :, rows],
            k,
            positions[rows],
            idx_q[:, rows],
            idx_w[:, rows],
            idx_k,
            block_indices,
            scale,
            dense_weight,
            use_reentrant=False,
        )
    return total / (batch * seq_len * sets)


def topk_attention_mass_recall(target_p: Tensor, indices: Tensor) -> Tensor:
    """Per query (B, T), or (B, sets, T): share of the dense attention mass the selected keys keep (1 = lossless)."""
    kept = target_p.gather(-1, indices.clamp(min=0)).masked_fill(indices < 0, 0.0)
    return kept.sum(dim=-1)
