"""KL distillation of the lightning indexer from the frozen model's dense attention (DSA warm-up).

Target p[t, :] = the layer's dense attention probabilities summed over heads and L1-normalized;
loss = mean_t KL(p[t, :] || softmax(I[t, :])). The sparse stage restricts both to the selected set, optionally
plus a weighted dense KL that keeps the keys outside the set in the loss. An optional boundary term aims at the
attention-mass recall at given k directly (`_boundary_recall_sum`).
Main-model q (B, Hq, T, d) and k (B, Hkv, S, d) are post-RoPE, key s at position s; index scores are
(B, T, S) with -inf on future keys.
"""

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dsarag.indexer_model.indexer import stack_sets
from dsarag.kernels.torch_dsa import index_scores


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


# Width (in index-score units) of the band around the k-th score where the boundary term acts: the trained
# indexers' scores fall by about 1 each time the rank doubles near k = 512 and 2048.
BOUNDARY_WIDTH = 0.5


def _boundary_recall_sum(
    target_p: Tensor, scores: Tensor, positions: Tensor, topks: tuple[int, ...], forced: tuple[int, int]
) -> Tensor:
    """Sum over query rows and each k in `topks` of a smooth stand-in for minus the attention-mass recall at k.

    Row t keeps its n_sink sinks and its window, plus the `slots` best of the other keys, whose boundary b_t
    lies between the slots-th and the next score. The term -sum_s sigmoid((I[t,s] - b_t) / w) (p[t,s] - pbar_t),
    with b_t and pbar_t held fixed, has the gradient the soft top-k recall has once b_t moves with the scores
    (the soft set size stays k): keys near the boundary holding more attention than pbar_t, the average of the
    keys around it, move up, the others down. The KL alone stops moving that boundary once it has converged.
    """
    n_sink, window = forced
    rows = positions >= min(topks)  # earlier queries take every key they see
    total = scores.new_zeros(())
    if not bool(rows.any()):
        return total
    scores, target_p, positions = scores[..., rows, :], target_p[..., rows, :], positions[rows]
    key_positions = torch.arange(scores.shape[-1], device=scores.device)
    is_forced = (key_positions[None, :] < n_sink) | (key_positions[None, :] > positions[:, None] - window)
    free = scores.masked_fill(is_forced, float("-inf"))  # future keys are -inf already
    widest = min(max(topks) - n_sink - window + 1, free.shape[-1])
    with torch.no_grad():  # one sorted top-k holds every k's boundary
        top = free.topk(widest, dim=-1).values
    for topk in topks:
        live = positions >= topk
        slots = topk - n_sink - window
        if not bool(live.any()):
            continue
        boundary = (top[..., live, slots - 1] + top[..., live, slots]) / 2
        inside = torch.sigmoid((free[..., live, :] - boundary[..., None]) / BOUNDARY_WIDTH)
        with torch.no_grad():
            slope = inside * (1 - inside)
            p = target_p[..., live, :]
            mean_p = (p * slope).sum(-1) / slope.sum(-1).clamp_min(torch.finfo(slope.dtype).tiny)
        total = total - (inside * (p - mean_p[..., None])).sum()
    return total


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
    boundary: tuple[tuple[int, ...], float, tuple[int, int]] | None,
) -> Tensor:
    keys_seen = min(k.shape[2], int(positions.max()) + 1)  # later keys are future to every query here
    sets = 1 if idx_w.dim() == 3 else idx_w.shape[2]
    target = dense_attention_target(q, k[:, :, :keys_seen], positions, q.shape[2], scale, sets)
    key_positions = torch.arange(keys_seen, device=idx_k.device)
    scores = stack_sets(
        idx_w, lambda w: index_scores(idx_q, w, idx_k[:, :keys_seen], positions, key_positions)
    )
    if indices is None:
        loss = _kl_per_row(target, scores).sum()
    else:
        loss = _kl_per_row(*_restrict_to_selected(target, scores, indices)).sum()
        if dense_weight:
            loss = loss + dense_weight * _kl_per_row(target, scores).sum()
    if boundary:
        topks, weight, forced = boundary
        loss = loss + weight * _boundary_recall_sum(target, scores, positions, topks, forced)
    return loss


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
    boundary: tuple[tuple[int, ...], float, tuple[int, int]] | None = None,
) -> Tensor:
    """indexer_kl_loss (or the sparse variant when indices are given, plus dense_weight x the dense loss) one
    block of queries at a time; boundary = (ks, weight, (n_sink, window)) adds weight x the boundary term at
    each k (`_boundary_recall_sum`).

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
            boundary,
            use_reentrant=False,
        )
    return total / (batch * seq_len * sets)


def topk_attention_mass_recall(target_p: Tensor, indices: Tensor) -> Tensor:
    """Per query (B, T), or (B, sets, T): share of the dense attention mass the selected keys keep (1 = lossless)."""
    kept = target_p.gather(-1, indices.clamp(min=0)).masked_fill(indices < 0, 0.0)
    return kept.sum(dim=-1)
