"""Lightning indexer: score formula, RoPE layout, causal top-k with sinks and window, blockwise = full."""

import pytest
import torch

from dsarag.indexer_model.indexer import LightningIndexer, rope_cos_sin
from dsarag.kernels.torch_dsa import index_scores, select_topk


def random_index_inputs(seq_len: int, batch: int = 2, heads: int = 3, dim: int = 8, seed: int = 0):
    """q, w, k with q . k > 0 everywhere, so ReLU never clips and scores have no ties."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, seq_len, heads, dim, generator=gen) + 0.1
    k = torch.rand(batch, seq_len, dim, generator=gen) + 0.1
    w = torch.rand(batch, seq_len, heads, generator=gen) + 0.1
    return q, w, k


def forced_full_topk(q, w, k, topk: int, n_sink: int, window: int) -> list[list[set[int]]]:
    """The reference: whole score matrix, sinks and window at +inf, torch.topk, -inf slots dropped."""
    positions = torch.arange(k.shape[1])
    scores = index_scores(q, w, k, positions, positions)
    s, t = positions[None, :], positions[:, None]
    scores = scores.masked_fill((s <= t) & ((s < n_sink) | (s > t - window)), float("inf"))
    values, indices = scores.topk(min(topk, k.shape[1]), dim=-1)
    return [
        [
            {int(i) for i, v in zip(row_i, row_v, strict=True) if v > float("-inf")}
            for row_i, row_v in zip(bi, bv, strict=True)
        ]
        for bi, bv in zip(indices, values, strict=True)
    ]


def as_sets(selected: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(i) for i in row if i >= 0} for row in rows] for rows in selected]


def test_index_scores_equal_a_naive_loop():
    q, w, k = torch.randn(1, 5, 3, 4), torch.randn(1, 5, 3), torch.randn(1, 6, 4)
    q_positions, k_positions = torch.tensor([1, 2, 3, 4, 5]), torch.arange(6)
    scores = index_scores(q, w, k, q_positions, k_positions)
    for t in range(5):
        for s in range(6):
            if s > q_positions[t]:
                assert scores[0, t, s] == float("-inf")
                continue
            expected = sum(float(w[0, t, j]) * max(0.0, float(q[0, t, j] @ k[0, s])) for j in range(3))
            assert scores[0, t, s].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_index_scores_backpropagate_like_the_plain_formula():
    gen = torch.Generator().manual_seed(0)
    q, w, k = (
        torch.randn(1, 6, 3, 4, generator=gen),
        torch.randn(1, 6, 3, generator=gen),
        torch.randn(1, 6, 4, generator=gen),
    )
    positions = torch.arange(6)
    upstream = torch.randn(1, 6, 6, generator=gen).tril()  # future entries are -inf: give them no gradient

    def grads(scores_fn):
        leaves = [t.clone().requires_grad_() for t in (q, w, k)]
        scores = scores_fn(*leaves).masked_fill(upstream == 0, 0.0)
        return torch.autograd.grad((scores * upstream).sum(), leaves)

    def plain(q, w, k):
        return (torch.relu(q[:, :, None] @ k[:, None, :, :, None]).squeeze(-1) * w[:, :, None]).sum(-1)

    got = grads(lambda q, w, k: index_scores(q, w, k, positions, positions))
    for g, want in zip(got, grads(plain), strict=True):
        torch.testing.assert_close(g, want)


def test_indexer_shapes_and_weight_scaling():
    indexer = LightningIndexer(dim=16, rope_base=1e6, n_heads=4, head_dim=8)
    x = torch.randn(2, 7, 16)
    q, w, k = indexer.project(x, torch.arange(7))
    assert q.shape == (2, 7, 4, 8) and w.shape == (2, 7, 4) and k.shape == (2, 7, 8)
    torch.testing.assert_close(w, indexer.weights_proj(x) / (4 * 8) ** 0.5)
    assert indexer(x, torch.arange(7)).shape == (2, 7, 7)


def test_rope_rotates_half_split_pairs_of_the_first_half_only():
    indexer = LightningIndexer(
        dim=8, rope_base=10_000.0, n_heads=1, head_dim=8
    )  # rope_dims = 4: pairs (0,2), (1,3)
    with torch.no_grad():
        indexer.wk.weight.copy_(torch.eye(8))
        indexer.wq.weight.copy_(torch.eye(8))
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    position = torch.tensor([3])
    q, _, _ = indexer.project(x, position)
    angle = 3.0  # inv_freq of pair 0 is 1
    expected = torch.tensor(
        [torch.cos(torch.tensor(angle)), 0.0, torch.sin(torch.tensor(angle)), 0.0, 0, 0, 0, 0]
    )
    torch.testing.assert_close(q[0, 0, 0], expected)
    x_tail = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]]])
    q_tail, _, _ = indexer.project(x_tail, position)
    torch.testing.assert_close(q_tail[0, 0, 0], x_tail[0, 0])  # dims beyond rope_dims carry no position


def test_rope_frequencies_follow_the_base():
    cos, sin = rope_cos_sin(torch.tensor([5]), rope_dims=4, base=100.0)
    angles = torch.tensor([5.0, 5.0 / 10.0, 5.0, 5.0 / 10.0])
    torch.testing.assert_close(cos[0], angles.cos())
    torch.testing.assert_close(sin[0], angles.sin())


def test_index_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    indexer = LightningIndexer(dim=32, rope_base=1e6, n_heads=4, head_dim=16)
    x = torch.randn(1, 24, 32)
    positions = torch.arange(24)
    with torch.no_grad():
        base = indexer(x, positions)
        shifted = indexer(x, positions + 1_000)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=2e-4)


def test_config_records_the_rope_layout_and_check_rejects_a_mismatch():
    indexer = LightningIndexer(dim=16, rope_base=1e6)
    assert indexer.config() == {
        "n_heads": 4,
        "head_dim": 64,
        "rope_dims": 32,
        "layout": "half-split",
        "rope_base": 1e6,
        "index_sets": 1,
    }
    indexer.check_config(indexer.config())
    with pytest.raises(ValueError, match="layout: checkpoint 'interleaved'"):
        indexer.check_config({**indexer.config(), "layout": "interleaved"})


def test_select_topk_never_selects_a_future_key():
    q, w, k = random_index_inputs(40)
    positions = torch.arange(40)
    selected = select_topk(
        q, w, k, positions, n_keys=40, topk=12, n_sink=2, window=3, query_block=7, key_block=5
    )
    assert selected.shape == (2, 40, 12) and selected.dtype == torch.long
    assert (selected <= positions[None, :, None]).all()
    assert (selected >= -1).all()


def test_select_topk_always_keeps_sinks_and_the_local_window():
    q, w, k = random_index_inputs(50)
    w = -w  # every ordinary key now scores <= 0: only the forced +inf keeps sinks and window on top
    selected = as_sets(
        select_topk(
            q, w, k, torch.arange(50), n_keys=50, topk=10, n_sink=3, window=4, query_block=8, key_block=8
        )
    )
    for rows in selected:
        for t, chosen in enumerate(rows):
            must = {s for s in range(3) if s <= t} | set(range(max(0, t - 3), t + 1))
            assert must <= chosen


def test_topk_at_least_t_plus_1_selects_exactly_all_previous_positions():
    q, w, k = random_index_inputs(20)
    selected = select_topk(
        q, w, k, torch.arange(20), n_keys=20, topk=24, n_sink=1, window=2, query_block=6, key_block=4
    )
    for rows in as_sets(selected):
        for t, chosen in enumerate(rows):
            assert chosen == set(range(t + 1))
    assert ((selected == -1).sum(-1) == 24 - torch.arange(1, 21)).all()  # the unused slots are -1


@pytest.mark.parametrize(("query_block", "key_block"), [(1, 1), (5, 3), (16, 16), (7, 64), (64, 10)])
def test_blockwise_select_topk_equals_full_matrix_topk(query_block, key_block):
    q, w, k = random_index_inputs(45, seed=key_block)
    expected = forced_full_topk(q, w, k, topk=9, n_sink=2, window=3)
    got = select_topk(
        q,
        w,
        k,
        torch.arange(45),
        n_keys=45,
        topk=9,
        n_sink=2,
        window=3,
        query_block=query_block,
        key_block=key_block,
    )
    assert as_sets(got) == expected


def test_select_topk_on_bf16_inputs_ranks_in_bf16_and_keeps_keys_worth_the_fp32_best():
    """bf16 inputs (the model's) are scored and ranked in bf16, like the GPU kernel: the chosen keys are worth
    what the fp32 ranking's are, up to bf16 rounding (keys that tie in bf16 may swap)."""
    q, w, k = random_index_inputs(300, batch=1, seed=4)
    positions = torch.arange(300)
    got = select_topk(q.bfloat16(), w.bfloat16(), k.bfloat16(), positions, 300, topk=24, n_sink=1, window=2)
    scores = index_scores(
        q.bfloat16().float(), w.bfloat16().float(), k.bfloat16().float(), positions, positions
    )
    forced = (positions[None, :] < 1) | (positions[None, :] > positions[:, None] - 2)
    scores = scores.masked_fill(forced & scores.isfinite(), float("inf"))
    for t in range(24, 300):
        mine = scores[0, t, got[0, t]].sort().values
        best = scores[0, t].topk(24).values.sort().values
        torch.testing.assert_close(mine, best, rtol=2e-2, atol=2e-2)


def test_select_topk_for_decode_and_chunked_prefill_matches_the_full_prefill():
    q, w, k = random_index_inputs(30)
    full = select_topk(q, w, k, torch.arange(30), n_keys=30, topk=8, n_sink=2, window=2)
    chunk = select_topk(
        q[:, 20:25], w[:, 20:25], k, torch.arange(20, 25), n_keys=25, topk=8, n_sink=2, window=2
    )
    decode = select_topk(q[:, 29:], w[:, 29:], k, torch.tensor([29]), n_keys=30, topk=8, n_sink=2, window=2)
    assert as_sets(chunk) == as_sets(full[:, 20:25])
    assert as_sets(decode) == as_sets(full[:, 29:])


def test_select_topk_rejects_a_budget_smaller_than_sinks_plus_window():
    q, w, k = random_index_inputs(8)
    with pytest.raises(ValueError, match="raise topk"):
        select_topk(q, w, k, torch.arange(8), n_keys=8, topk=4, n_sink=4, window=64)
