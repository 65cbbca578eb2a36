"""Triton gather attention (prefill and decode) against the PyTorch path (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from dsarag.kernels.sparse_attention import (
    dense_attention_decode,
    merge_partials,
    merge_partials_reference,
    sparse_attention_decode,
    sparse_attention_prefill,
)
from dsarag.kernels.torch_dsa import masked_dense_attention_reference
from dsarag.kernels.torch_dsa import sparse_attention as sparse_attention_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tolerance_for(dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 2e-2}
    if DEVICE == "cuda":  # fp32 dots run as TF32 on the tensor cores
        return {"rtol": 5e-3, "atol": 5e-3}
    return {"rtol": 1e-4, "atol": 1e-4}


def attention_inputs(
    dtype: torch.dtype, batch=2, heads=6, kv_heads=2, n_queries=5, n_keys=40, dim=16, topk=24
):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, n_queries, dim, generator=generator)
    k = torch.randn(batch, kv_heads, n_keys, dim, generator=generator)
    v = torch.randn(batch, kv_heads, n_keys, dim, generator=generator)
    indices = torch.stack(
        [
            torch.stack([torch.randperm(n_keys, generator=generator)[:topk] for _ in range(n_queries)])
            for _ in range(batch)
        ]
    )
    # Ragged rows: the first query has only 3 valid slots, a later one has invalid slots in the middle
    indices[:, 0, 3:] = -1
    indices[:, -1, 5:12] = -1
    return (t.to(DEVICE, dtype) for t in (q, k, v)), indices.to(DEVICE, torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_kernel_matches_gather_attention_with_ragged_and_invalid_indices(dtype):
    (q, k, v), indices = attention_inputs(dtype)
    got = sparse_attention_prefill(q, k, v, indices, scale=0.25)
    want = masked_dense_attention_reference(q, k, v, indices.long(), scale=0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **tolerance_for(dtype))
    torch.testing.assert_close(
        got.float(), sparse_attention_torch(q, k, v, indices.long(), 0.25).float(), **tolerance_for(dtype)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_kernel_splits_and_merges_like_one_softmax(dtype):
    (q, k, v), indices = attention_inputs(dtype, n_queries=1, n_keys=300, topk=200)
    indices[1, 0, 64:] = -1  # a whole split with no valid key must not disturb the merge
    got = sparse_attention_decode(q, k, v, indices, scale=0.25, slots_per_split=64)
    want = masked_dense_attention_reference(q, k, v, indices.long(), scale=0.25)
    torch.testing.assert_close(got.float(), want.float(), **tolerance_for(dtype))


@pytest.mark.parametrize("position", [0, 130, 299])
def test_dense_decode_kernel_attends_to_every_key_up_to_a_device_position(position):
    """A preallocated cache of 300 slots: keys past the position (unwritten in a real cache) never count."""
    (q, k, v), _ = attention_inputs(torch.float32, n_queries=1, n_keys=300)
    got = dense_attention_decode(q, k, v, torch.tensor([position], device=DEVICE), 0.25, slots_per_split=64)
    seen = slice(0, position + 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, seen], v[:, :, seen], scale=0.25, enable_gqa=True
    )
    torch.testing.assert_close(got, want, **tolerance_for(torch.float32))


def sorted_neighbour_indices(batch: int, sets: int, n_queries: int, n_keys: int, topk: int) -> torch.Tensor:
    """Ascending rows, -1 after the keys, where each query keeps about half of its predecessor's keys (as a
    trained indexer's neighbours do); some rows are short."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    previous = torch.randperm(n_keys, generator=generator)[:topk]
    for t in range(batch * sets * n_queries):
        kept = previous[torch.randperm(topk, generator=generator)[: topk // 2]]
        fresh = torch.randperm(n_keys, generator=generator)
        fresh = fresh[~torch.isin(fresh, kept)][: topk - len(kept)]
        previous = torch.cat((kept, fresh))
        row = previous.sort().values
        if t % 5 == 3:  # a short row: its last slots unused
            row = torch.cat((row[: topk // 3], torch.full((topk - topk // 3,), -1)))
        rows.append(row)
    return torch.stack(rows).view(batch, sets, n_queries, topk).to(DEVICE, torch.int32)


@pytest.mark.parametrize("n_queries", [6, 7])  # 7: the last pair has one query
@pytest.mark.parametrize("sets", [1, 2])
def test_pair_gather_equals_the_reference_on_sorted_rows(n_queries, sets):
    (q, k, v), _ = attention_inputs(torch.float32, n_queries=n_queries, n_keys=90, topk=24)
    indices = sorted_neighbour_indices(2, sets, n_queries, 90, 24)
    indices = indices[:, 0] if sets == 1 else indices
    got = sparse_attention_prefill(q, k, v, indices, scale=0.25, block_n=16, pairs=True)
    want = masked_dense_attention_reference(q, k, v, indices.long(), scale=0.25)
    torch.testing.assert_close(got, want, **tolerance_for(torch.float32))


def test_more_slots_than_keys_is_fine():
    (q, k, v), indices = attention_inputs(torch.float32, n_queries=2, n_keys=8, topk=8)
    wide = torch.full((2, 2, 70), -1, dtype=torch.int32, device=DEVICE)  # k > t: most slots unused
    wide[..., :8] = indices
    got = sparse_attention_prefill(q, k, v, wide, scale=0.25)
    want = masked_dense_attention_reference(q, k, v, indices.long(), 0.25)
    torch.testing.assert_close(got, want, **tolerance_for(torch.float32))


def test_merge_partials_equals_softmax_over_the_union():
    scores = torch.randn(1, 2, 1, 10)  # two splits of 10 keys, log2 domain
    values = torch.randn(1, 2, 10, 3)
    m = scores.amax(-1)
    weights = torch.exp2(scores - m[..., None])
    merged = merge_partials_reference(m, weights.sum(-1), (weights[..., None] * values[:, :, None]).sum(-2))
    probs = torch.softmax(scores.flatten(1) * torch.log(torch.tensor(2.0)), dim=-1)
    torch.testing.assert_close(merged[0, 0], probs[0] @ values.flatten(1, 2)[0])


@pytest.mark.parametrize("n_splits", [3, 150])  # 150: more splits than one pass of the kernel's loop takes
def test_merge_kernel_equals_the_reference_with_empty_splits(n_splits):
    generator = torch.Generator().manual_seed(1)
    m = torch.randn(4, n_splits, 16, generator=generator)
    lse_sum = torch.rand(4, n_splits, 16, generator=generator) + 0.5
    acc = torch.randn(4, n_splits, 16, 8, generator=generator)
    m[:, 1], lse_sum[:, 1], acc[:, 1] = float("-inf"), 0.0, 0.0  # a split that saw no valid key
    empty = slice(
        0, n_splits - 1
    )  # one group's valid keys all in its last split: the running max starts late
    m[2, empty], lse_sum[2, empty], acc[2, empty] = float("-inf"), 0.0, 0.0
    m, lse_sum, acc = (t.to(DEVICE) for t in (m, lse_sum, acc))
    got = merge_partials(m, lse_sum, acc, group=7, dtype=torch.float32)
    want = merge_partials_reference(m, lse_sum, acc)[:, :7]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_sets", [1, 2])
# 48 new positions: a prefill, seconds in the Triton interpreter
@pytest.mark.parametrize("n_new", [pytest.param(48, marks=pytest.mark.slow), 1])
def test_dsa_attention_triton_path_equals_the_torch_path(n_new, index_sets):
    """The model's one switch, its AttentionBackend, picks Triton or PyTorch; prefill chunk and decode agree."""
    from dsarag.indexer_model.dsa import DSAConfig, dsa_attention
    from dsarag.kernels.backend import resolve_backend

    generator = torch.Generator().manual_seed(5)
    n_keys, heads, kv_heads, dim = 96, 6, 2, 16
    q = torch.randn(1, heads, n_new, dim, generator=generator).to(DEVICE)
    k = torch.randn(1, kv_heads, n_keys, dim, generator=generator).to(DEVICE)
    v = torch.randn(1, kv_heads, n_keys, dim, generator=generator).to(DEVICE)
    # Index scores = a distinct small integer per key (exact in bf16), so both paths select the same keys
    idx_q = torch.zeros(1, n_new, 2, 16, device=DEVICE)
    idx_q[..., 0, 0] = 1.0
    idx_w = torch.ones(1, n_new, 2, device=DEVICE)
    idx_k = torch.zeros(1, n_keys, 16, device=DEVICE)
    idx_k[0, :, 0] = torch.randperm(n_keys, generator=generator).float().to(DEVICE)
    if index_sets == 2:  # one set per kv head: the second prefers the other end of the key order
        idx_q[..., 1, 1] = 1.0
        idx_k[0, :, 1] = n_keys - idx_k[0, :, 0]
        idx_w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE).expand(1, n_new, 2, 2)
    positions = torch.arange(n_keys - n_new, n_keys, device=DEVICE)
    outputs = {}
    for kernels in ("torch", "triton"):
        cfg = DSAConfig(topk=24, n_sink=2, window=4, dense_threshold=32)
        backend = resolve_backend(DEVICE, torch.float32, kernels)
        outputs[kernels] = dsa_attention(q, k, v, idx_q, idx_w, idx_k, positions, n_keys, cfg, backend)
    torch.testing.assert_close(outputs["triton"], outputs["torch"], **tolerance_for(torch.float32))
