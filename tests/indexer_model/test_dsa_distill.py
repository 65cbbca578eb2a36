"""Indexer distillation: dense targets, KL losses (dense, sparse, blockwise), attention-mass recall, training."""

import math

import pytest
import torch

from dsarag.indexer_model.distill import (
    _boundary_recall_sum,
    blockwise_indexer_kl_loss,
    dense_attention_target,
    indexer_kl_loss,
    indexer_kl_loss_sparse,
    topk_attention_mass_recall,
)
from dsarag.indexer_model.indexer import LightningIndexer
from dsarag.kernels.torch_dsa import index_scores, select_topk


def main_qk(seq_len: int, q_heads: int = 6, kv_heads: int = 2, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, q_heads, seq_len, dim, generator=gen),
        torch.randn(1, kv_heads, seq_len, dim, generator=gen),
    )


def test_dense_attention_target_is_the_head_mean_of_causal_softmax():
    q, k = main_qk(12)
    group = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(group, dim=1)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    probs = (q @ keys.transpose(-1, -2) / math.sqrt(8)).masked_fill(~causal, float("-inf")).softmax(-1)
    expected = probs.mean(dim=1)
    for block in (1, 5, 12):
        target = dense_attention_target(q, k, torch.arange(12), block=block)
        torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target.sum(-1), torch.ones(1, 12))


def test_dense_attention_target_for_a_block_of_later_queries_matches_the_full_rows():
    q, k = main_qk(20)
    full = dense_attention_target(q, k, torch.arange(20))
    rows = dense_attention_target(q[:, :, 14:], k, torch.arange(14, 20))
    torch.testing.assert_close(rows, full[:, 14:])


def test_kl_loss_is_zero_when_softmax_of_scores_equals_the_target():
    q, k = main_qk(10)
    target = dense_attention_target(q, k, torch.arange(10))
    scores = target.log() + 3.0  # log 0 = -inf on future keys, as in index scores; softmax ignores the shift
    assert indexer_kl_loss(target, scores).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_loss_is_positive_otherwise():
    q, k = main_qk(10)
    target = dense_attention_target(q, k, torch.arange(10))
    future = torch.ones(10, 10, dtype=torch.bool).triu(1)
    scores = torch.randn(1, 10, 10).masked_fill(future, float("-inf"))
    loss = indexer_kl_loss(target, scores)
    assert torch.isfinite(loss) and loss.item() > 1e-3


def test_sparse_kl_loss_only_looks_at_the_selected_keys():
    q, k = main_qk(10)
    target = dense_attention_target(q, k, torch.arange(10))
    indices = torch.tensor([[0, -1, -1]] + [[0, t, -1] for t in range(1, 10)])[
        None
    ]  # sink and the query itself
    future = torch.ones(10, 10, dtype=torch.bool).triu(1)
    scores = torch.randn(1, 10, 10).masked_fill(future, float("-inf"))
    rows = torch.arange(10)
    scores[0, rows, 0] = target[0, rows, 0].log()
    scores[0, rows, rows] = target[0, rows, rows].log()
    # On {0, t} softmax(scores) equals the target renormalized there, whatever the other keys score.
    assert indexer_kl_loss_sparse(target, scores, indices).item() == pytest.approx(0.0, abs=1e-6)
    assert indexer_kl_loss(target, scores).item() > 1e-3
    scores[0, 5, 0] += 1.0
    assert indexer_kl_loss_sparse(target, scores, indices).item() > 1e-4


def indexer_inputs(indexer: LightningIndexer, seq_len: int, seed: int = 1):
    x = torch.randn(1, seq_len, 16, generator=torch.Generator().manual_seed(seed))
    return indexer.project(x, torch.arange(seq_len))


@pytest.mark.parametrize("block", [1, 7, 32])
def test_blockwise_kl_loss_and_its_gradient_equal_the_full_matrix_loss(block):
    torch.manual_seed(0)
    indexer = LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8)
    q, k = main_qk(24)
    positions = torch.arange(24)

    full = indexer_kl_loss(
        dense_attention_target(q, k, positions),
        index_scores(*indexer_inputs(indexer, 24), positions, positions),
    )
    full_grads = torch.autograd.grad(full, list(indexer.parameters()))
    blockwise = blockwise_indexer_kl_loss(q, k, positions, *indexer_inputs(indexer, 24), block=block)
    block_grads = torch.autograd.grad(blockwise, list(indexer.parameters()))

    torch.testing.assert_close(blockwise, full)
    for got, want in zip(block_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dense_weight", [0.0, 0.5])
def test_blockwise_sparse_kl_loss_equals_the_full_matrix_sparse_loss(dense_weight):
    """The sparse stage's loss, alone or with the weighted dense KL beside it (--sparse-dense-weight)."""
    torch.manual_seed(0)
    indexer = LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8)
    q, k = main_qk(24)
    positions = torch.arange(24)
    idx_q, idx_w, idx_k = indexer_inputs(indexer, 24)
    indices = select_topk(
        idx_q.detach(), idx_w.detach(), idx_k.detach(), positions, 24, topk=6, n_sink=1, window=2
    )
    target = dense_attention_target(q, k, positions)
    scores = index_scores(idx_q, idx_w, idx_k, positions, positions)
    sparse = indexer_kl_loss_sparse(target, scores, indices)
    full = sparse + dense_weight * indexer_kl_loss(target, scores)
    blockwise = blockwise_indexer_kl_loss(
        q, k, positions, idx_q, idx_w, idx_k, indices=indices, block=5, dense_weight=dense_weight
    )
    torch.testing.assert_close(blockwise, full)
    if dense_weight:
        assert blockwise > sparse  # the keys left out of the set now count


def hard_recall(
    target: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, topk: int, forced
) -> float:
    """Mean recall of the selection the boundary term aims at: sinks, window, then the best free scores."""
    n_sink, window = forced
    keys = torch.arange(scores.shape[-1])
    is_forced = (keys[None] < n_sink) | (keys[None] > positions[:, None] - window)
    free = scores.masked_fill(is_forced, float("-inf"))
    chosen = free.topk(topk - n_sink - window, dim=-1).indices
    kept = target.gather(-1, chosen).sum(-1) + (target * is_forced).sum(-1)
    return kept.mean().item()


def test_boundary_term_moves_the_keys_around_the_kth_score_and_raises_recall():
    gen = torch.Generator().manual_seed(0)
    n_keys, topk, forced = 96, 24, (2, 4)
    positions = torch.arange(40, n_keys)  # rows from 40: the first 24 queries would take every key
    future = torch.arange(n_keys)[None] > positions[:, None]
    target = torch.rand(len(positions), n_keys, generator=gen).pow(4).masked_fill(future, 0.0)
    target = target / target.sum(-1, keepdim=True)
    # A converged-KL stand-in: scores that rank roughly by the attention, with noise around the boundary.
    start = (target.clamp_min(1e-9).log() + torch.randn(target.shape, generator=gen)).masked_fill(
        future, -math.inf
    )
    scores = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([scores], lr=0.05)
    for _ in range(60):
        loss = _boundary_recall_sum(target, scores, positions, (topk,), forced)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    before = hard_recall(target, start, positions, topk, forced)
    after = hard_recall(target, scores.detach(), positions, topk, forced)
    # Measured on seeds 0-2: 0.75 -> 0.83, and 0.83-0.84 with the free slots ranked by the attention itself.
    assert after > before + 0.05, (before, after)
    # Sinks, the window and future keys are never moved: the selection keeps them, or cannot see them.
    keys = torch.arange(n_keys)[None]
    untouched = (keys < forced[0]) | (keys > positions[:, None] - forced[1])
    assert torch.equal(scores.detach()[untouched], start[untouched])


def test_boundary_term_skips_rows_that_take_every_key_and_is_blockwise_exact():
    torch.manual_seed(0)
    indexer = LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8)
    q, k = main_qk(40)
    positions = torch.arange(40)
    idx_q, idx_w, idx_k = indexer_inputs(indexer, 40)
    target = dense_attention_target(q, k, positions)
    scores = index_scores(idx_q, idx_w, idx_k, positions, positions)
    term = _boundary_recall_sum(target, scores, positions, (8, 16), (1, 2))
    assert term == sum(_boundary_recall_sum(target, scores, positions, (k,), (1, 2)) for k in (8, 16))
    kl = blockwise_indexer_kl_loss(q, k, positions, idx_q, idx_w, idx_k, block=7)
    both = blockwise_indexer_kl_loss(
        q, k, positions, idx_q, idx_w, idx_k, block=7, boundary=((8, 16), 0.5, (1, 2))
    )
    torch.testing.assert_close(both, kl + 0.5 * term / 40)
    early = _boundary_recall_sum(target[:, :8], scores[:, :8], positions[:8], (8,), (1, 2))
    assert early.item() == 0.0  # no query before position 8 leaves a key out at k = 8


def test_topk_attention_mass_recall_sums_the_selected_target_mass():
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    indices = torch.tensor([[[0, -1], [1, -1], [2, 0]]])
    torch.testing.assert_close(topk_attention_mass_recall(target, indices), torch.tensor([[1.0, 0.5, 0.7]]))


def concentrated_attention_task(seq_len: int = 128, dim: int = 16, seed: int = 0):
    """Hidden states where ~6 % of tokens carry a 'landmark' direction; the main attention goes to them."""
    gen = torch.Generator().manual_seed(seed)
    landmark = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
    is_landmark = torch.rand(seq_len, generator=gen) < 0.06
    x = torch.randn(1, seq_len, dim, generator=gen) + 4.0 * is_landmark[None, :, None] * landmark
    q = (6.0 * landmark).expand(1, 4, seq_len, dim).contiguous()  # every head looks for landmarks
    k = (x @ torch.outer(landmark, landmark))[:, None]  # one kv head: a key's landmark component
    return x, q, k


def test_training_a_tiny_indexer_raises_topk_recall_above_a_random_indexer():
    torch.manual_seed(0)
    x, q, k = concentrated_attention_task()
    positions = torch.arange(x.shape[1])
    target = dense_attention_target(q, k, positions)
    indexer = LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=16)

    def recall() -> float:
        with torch.no_grad():
            idx_q, idx_w, idx_k = indexer.project(x, positions)
            indices = select_topk(idx_q, idx_w, idx_k, positions, len(positions), topk=16, n_sink=1, window=2)
        return topk_attention_mass_recall(target, indices)[:, 32:].mean().item()

    random_recall = recall()
    optimizer = torch.optim.Adam(indexer.parameters(), lr=1e-2)
    for _ in range(100):
        loss = blockwise_indexer_kl_loss(q, k, positions, *indexer.project(x, positions), block=64)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained_recall = recall()
    # Measured on task seeds 0-2: random 0.18-0.31, trained 0.96-0.98, oracle top-16 ceiling 0.98-0.99.
    assert trained_recall > 0.9 and trained_recall > random_recall + 0.3, (random_recall, trained_recall)
