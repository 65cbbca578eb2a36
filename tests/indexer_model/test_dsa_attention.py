"""Gather attention over the selected keys, against a masked dense oracle and against SDPA."""

import pytest
import torch
import torch.nn.functional as F

from dsarag.indexer_model.dsa import DSAConfig, dsa_attention
from dsarag.kernels import cpu_dsa
from dsarag.kernels.backend import resolve_backend
from dsarag.kernels.torch_dsa import masked_dense_attention_reference, select_topk, sparse_attention

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 14, 2, 16  # the 0.5B model's GQA ratio, small head dim


def random_qkv(seq_len: int, n_keys: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, Q_HEADS, seq_len, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(BATCH, KV_HEADS, n_keys, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(BATCH, KV_HEADS, n_keys, HEAD_DIM, generator=gen).to(dtype)
    return q, k, v


def random_indices(seq_len: int, n_keys: int, topk: int, seed: int = 0) -> torch.Tensor:
    """Distinct random keys per query, a random number of -1 slots, at least one valid key per row."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(BATCH, seq_len, n_keys, generator=gen).argsort(dim=-1)[..., :topk]
    n_valid = torch.randint(1, topk + 1, (BATCH, seq_len, 1), generator=gen)
    return keys.masked_fill(torch.arange(topk) >= n_valid, -1)


def random_index_inputs(seq_len: int, heads: int = 4, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(BATCH, seq_len, heads, dim, generator=gen),
        torch.randn(BATCH, seq_len, heads, generator=gen),
        torch.randn(BATCH, seq_len, dim, generator=gen),
    )


# bf16: inputs are rounded alike for both paths and the maths runs in fp32; only the output rounding differs.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("block", [1, 4, 128])
def test_sparse_attention_equals_masked_dense_reference(dtype, tol, block):
    q, k, v = random_qkv(seq_len=9, n_keys=40, dtype=dtype)
    indices = random_indices(seq_len=9, n_keys=40, topk=12)
    assert (indices == -1).any()
    out = sparse_attention(q, k, v, indices, scale=HEAD_DIM**-0.5, block=block)
    expected = masked_dense_attention_reference(q, k, v, indices, scale=HEAD_DIM**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def test_sparse_attention_gives_each_kv_head_its_own_query_group():
    q, k, v = random_qkv(seq_len=3, n_keys=10)
    indices = random_indices(seq_len=3, n_keys=10, topk=5)
    out = sparse_attention(q, k, v, indices, scale=0.25)
    group = Q_HEADS // KV_HEADS
    for kv_head in range(KV_HEADS):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        alone = sparse_attention(
            q[:, heads], k[:, kv_head : kv_head + 1], v[:, kv_head : kv_head + 1], indices, 0.25
        )
        torch.testing.assert_close(out[:, heads], alone)


def test_sparse_attention_is_independent_of_slot_order():
    q, k, v = random_qkv(seq_len=4, n_keys=20)
    indices = random_indices(seq_len=4, n_keys=20, topk=8)
    shuffled = indices.flip(-1)
    torch.testing.assert_close(
        sparse_attention(q, k, v, indices, 0.25), sparse_attention(q, k, v, shuffled, 0.25)
    )


def sdpa_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dsa_attention_with_topk_at_least_n_keys_equals_sdpa_causal(dtype):
    q, k, v = random_qkv(seq_len=33, n_keys=33, dtype=dtype)
    idx_q, idx_w, idx_k = random_index_inputs(33)
    cfg = DSAConfig(topk=33, n_sink=1, window=4, dense_threshold=0)
    out = dsa_attention(q, k, v, idx_q, idx_w, idx_k, torch.arange(33), n_keys=33, cfg=cfg)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=tol, atol=tol)


def test_dsa_attention_below_the_dense_threshold_is_dense_and_ignores_the_indexer():
    q, k, v = random_qkv(seq_len=30, n_keys=30)
    idx_q, idx_w, idx_k = random_index_inputs(30)
    cfg = DSAConfig(topk=8, n_sink=1, window=2, dense_threshold=31)
    out = dsa_attention(q, k, v, idx_q, idx_w, idx_k, torch.arange(30), n_keys=30, cfg=cfg)
    torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=1e-6, atol=1e-6)


def test_dsa_attention_dense_fallback_for_a_prefill_chunk_matches_the_full_causal_rows():
    q, k, v = random_qkv(seq_len=30, n_keys=30)
    idx_q, idx_w, idx_k = random_index_inputs(30)
    padded = [
        torch.cat([t, torch.full((BATCH, KV_HEADS, 34, HEAD_DIM), 1e4)], dim=2) for t in (k, v)
    ]  # unfilled rows
    chunk = slice(20, 30)
    out = dsa_attention(
        q[:, :, chunk],
        *padded,
        idx_q[:, chunk],
        idx_w[:, chunk],
        idx_k,
        torch.arange(20, 30),
        n_keys=30,
        cfg=DSAConfig(),
    )
    torch.testing.assert_close(out, sdpa_causal(q, k, v)[:, :, chunk], rtol=1e-6, atol=1e-6)


# Each CPU path with its own selection: they may break ties between equal index scores differently.
CPU_PATHS = [
    pytest.param("torch", select_topk, id="torch"),
    pytest.param("native", cpu_dsa.select_topk, id="native", marks=pytest.mark.needs_compiler),
]


@pytest.mark.parametrize(("kernels", "select"), CPU_PATHS)
def test_dsa_attention_sparse_path_attends_to_the_selected_keys(kernels, select):
    q, k, v = random_qkv(seq_len=40, n_keys=40)
    idx_q, idx_w, idx_k = random_index_inputs(40)
    cfg = DSAConfig(topk=10, n_sink=2, window=3, dense_threshold=16)
    positions = torch.arange(40)
    out = dsa_attention(
        q, k, v, idx_q, idx_w, idx_k, positions, 40, cfg, resolve_backend("cpu", q.dtype, kernels)
    )
    indices = select(idx_q, idx_w, idx_k, positions, 40, topk=10, n_sink=2, window=3)
    torch.testing.assert_close(out, masked_dense_attention_reference(q, k, v, indices, HEAD_DIM**-0.5))
    # Queries with at most topk keys see all of them: exactly dense there.
    torch.testing.assert_close(out[:, :, :10], sdpa_causal(q, k, v)[:, :, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :, 10:], sdpa_causal(q, k, v)[:, :, 10:], atol=1e-3)


@pytest.mark.parametrize(("kernels", "select"), CPU_PATHS)
def test_dsa_attention_prefill_chunk_straddling_topk_matches_the_selected_keys(kernels, select):
    """A chunk whose first queries see fewer than k keys (run dense) and whose later ones select (sparse)."""
    q, k, v = random_qkv(seq_len=40, n_keys=40)
    idx_q, idx_w, idx_k = random_index_inputs(40)
    cfg = DSAConfig(topk=10, n_sink=2, window=3, dense_threshold=0)
    chunk, positions = slice(6, 40), torch.arange(6, 40)
    out = dsa_attention(
        q[:, :, chunk], k, v, idx_q[:, chunk], idx_w[:, chunk], idx_k, positions, 40, cfg,
        resolve_backend("cpu", q.dtype, kernels),
    )  # fmt: skip
    indices = select(idx_q[:, chunk], idx_w[:, chunk], idx_k, positions, 40, topk=10, n_sink=2, window=3)
    expected = masked_dense_attention_reference(q[:, :, chunk], k, v, indices, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dsa_attention_decodes_one_token_against_a_preallocated_cache():
    q, k, v = random_qkv(seq_len=1, n_keys=64)  # 64 rows allocated, 25 filled
    idx_q, idx_w, idx_k = random_index_inputs(64)
    position = torch.tensor([24])
    cfg = DSAConfig(topk=8, n_sink=1, window=2, dense_threshold=0)
    out = dsa_attention(q, k, v, idx_q[:, 24:25], idx_w[:, 24:25], idx_k, position, n_keys=25, cfg=cfg)
    indices = select_topk(idx_q[:, 24:25], idx_w[:, 24:25], idx_k, position, 25, topk=8, n_sink=1, window=2)
    assert (indices < 25).all()
    torch.testing.assert_close(out, masked_dense_attention_reference(q, k, v, indices, HEAD_DIM**-0.5))
    dense_cfg = DSAConfig(topk=32, n_sink=1, window=2)
    dense = dsa_attention(
        q, k, v, idx_q[:, 24:25], idx_w[:, 24:25], idx_k, position, n_keys=25, cfg=dense_cfg
    )
    group = Q_HEADS // KV_HEADS
    all_filled = F.scaled_dot_product_attention(
        q, k[:, :, :25].repeat_interleave(group, dim=1), v[:, :, :25].repeat_interleave(group, dim=1)
    )
    torch.testing.assert_close(dense, all_filled, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["torch", "native", "triton"])
def test_every_selection_path_refuses_a_k_too_small_for_the_sinks_and_window(path):
    from dsarag.kernels.indexer import select_topk as select_topk_triton

    select = {"torch": select_topk, "native": cpu_dsa.select_topk, "triton": select_topk_triton}[path]
    q, w, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 4), torch.randn(1, 8, 16)
    args = (q, w, k, torch.arange(8), 8) if path != "triton" else (q, w, k, 0, 8)
    with pytest.raises(ValueError, match="topk=60 cannot hold the 4 sinks and the window of 64"):
        select(*args, 60, 4, 64)
