"""Triton gather attention for DSA: each query attends only to the keys its indexer selected.

Shapes as in `indexer_model.dsa`: q (B, Hq, T, d); KV cache (B, Hkv, S, d); indices (B, T, k) int32 shared by
all heads, or (B, sets, T, k) with one set per group of kv heads; -1 in unused slots. One program serves one
query and one kv group: every gathered K/V row is loaded once and used by all G = Hq / Hkv query heads of the
group (the heads are the rows of the tile, padded to 16 for the tensor cores). Softmax is online
(flash-attention style) in float32.

Prefill: one program per (query, kv group), or with `pairs` per two neighbouring queries, whose heads share
the tile and whose common keys are gathered once. Decode (T = 1): the k selected keys are split across programs
that each write a partial (max, sum, output), merged by `merge_partials` — enough parallelism at batch 1.
The same decode kernel runs dense attention over a whole preallocated cache up to a position read on the
device (`dense_attention_decode`): the dense half of a decode step captured in a CUDA graph.
The PyTorch reference is `torch_dsa.sparse_attention`.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsarag.kernels.common import INTERPRETED, dot


@triton.jit
def _attend(
    q, m_i, l_i, acc, k_base, v_base, idx, key_ok, allowed, stride_ks, stride_vs, scale_log2,
    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (m_i, l_i, acc) by the keys `idx` that are key_ok (only those rows are loaded),
    each row of q attending where `allowed` (rows x keys, or 1 x keys for every row)."""
    dims = tl.arange(0, HEAD_DIM)
    safe_idx = tl.where(key_ok, idx, 0).to(tl.int64)
    k_t = tl.load(k_base + safe_idx[None, :] * stride_ks + dims[:, None], mask=key_ok[None, :], other=0.0)
    scores = dot(q, k_t, UPCAST) * scale_log2  # (rows, keys), log2 domain
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key changes nothing
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    v = tl.load(v_base + safe_idx[:, None] * stride_vs + dims[None, :], mask=key_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _gather_attention_block(
    q, m_i, l_i, acc, k_base, v_base, idx_base, slot_start, slot_end, stride_ks, stride_vs, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, CONTIGUOUS: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (m_i, l_i, acc) over the selected keys in slots [slot_start, slot_end);
    CONTIGUOUS: slot s is key s (dense attention, no index list)."""
    for start in range(slot_start, slot_end, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        if CONTIGUOUS:
            idx = tl.where(slots < slot_end, slots, -1)
        else:
            idx = tl.load(idx_base + slots, mask=slots < slot_end, other=-1)
        valid = idx >= 0
        m_i, l_i, acc = _attend(
            q, m_i, l_i, acc, k_base, v_base, idx, valid, valid[None, :], stride_ks, stride_vs, scale_log2,
            HEAD_DIM=HEAD_DIM, UPCAST=UPCAST,
        )  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def _sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, topk, scale_log2,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_is, stride_it,
    stride_ob, stride_oh, stride_ot,
    N_KV_HEADS: tl.constexpr, KV_PER_SET: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    t, batch_group = tl.program_id(0), tl.program_id(1)
    batch, kv_head = batch_group // N_KV_HEADS, batch_group % N_KV_HEADS
    heads = kv_head * GROUP + tl.arange(0, G_PAD)
    head_ok = tl.arange(0, G_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + batch * stride_qb + heads[:, None] * stride_qh + t * stride_qt + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    )
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, HEAD_DIM), tl.float32)
    m_i, l_i, acc = _gather_attention_block(
        q, m_i, l_i, acc,
        k_ptr + batch * stride_kb + kv_head * stride_kh, v_ptr + batch * stride_vb + kv_head * stride_vh,
        idx_ptr + batch * stride_ib + (kv_head // KV_PER_SET) * stride_is + t * stride_it, 0, topk,
        stride_ks, stride_vs, scale_log2,
        HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, UPCAST=UPCAST, CONTIGUOUS=False,
    )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + batch * stride_ob + heads[:, None] * stride_oh + t * stride_ot + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None],
    )


@triton.jit
def _in_sorted(row_ptr, n, keys, LOG2_N: tl.constexpr):
    """Whether each of `keys` is among the n ascending keys at row_ptr (-1 slots after them): a bisection."""
    lo = tl.zeros_like(keys)
    hi = lo + n
    for _ in tl.static_range(LOG2_N):
        mid = (lo + hi) // 2
        value = tl.load(row_ptr + mid, mask=mid < n, other=-1)
        below = (value >= 0) & (value < keys)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return tl.load(row_ptr + lo, mask=lo < n, other=-1) == keys


@triton.jit
def _pair_gather_block(
    q, m_i, l_i, acc, k_base, v_base, own_idx, other_idx, topk, own_rows, other_rows, stride_ks, stride_vs,
    scale_log2, SHARED: tl.constexpr, LOG2_K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Online-softmax update over one query's selected keys (own_idx, ascending): rows `own_rows` attend to each;
    with SHARED the other query's rows also attend to the keys both chose, without it those keys are skipped
    (the first pass took them)."""
    for start in range(0, topk, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        idx = tl.load(own_idx + slots, mask=slots < topk, other=-1)
        both = _in_sorted(other_idx, topk, idx, LOG2_N=LOG2_K) & (idx >= 0)
        if SHARED:
            key_ok = idx >= 0
            allowed = (own_rows[:, None] & key_ok[None, :]) | (other_rows[:, None] & both[None, :])
        else:
            key_ok = (idx >= 0) & ~both
            allowed = own_rows[:, None] & key_ok[None, :]
        m_i, l_i, acc = _attend(
            q, m_i, l_i, acc, k_base, v_base, idx, key_ok, allowed, stride_ks, stride_vs, scale_log2,
            HEAD_DIM=HEAD_DIM, UPCAST=UPCAST,
        )  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def _sparse_prefill_pairs_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, n_queries, topk, scale_log2,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_is, stride_it,
    stride_ob, stride_oh, stride_ot,
    N_KV_HEADS: tl.constexpr, KV_PER_SET: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Queries 2p and 2p + 1 of one kv group in one program: the rows of the tile are both queries' heads
    (G_PAD each), and each key either chose is gathered once: the keys of the first query's list (the second's
    rows take those it chose too), then the second's keys the first did not choose."""
    pair, batch_group = tl.program_id(0), tl.program_id(1)
    batch, kv_head = batch_group // N_KV_HEADS, batch_group % N_KV_HEADS
    rows = tl.arange(0, 2 * G_PAD)
    t = 2 * pair + rows // G_PAD
    heads = kv_head * GROUP + rows % G_PAD
    row_ok = (rows % G_PAD < GROUP) & (t < n_queries)
    first_rows = row_ok & (rows < G_PAD)
    second_rows = row_ok & (rows >= G_PAD)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + batch * stride_qb + heads[:, None] * stride_qh + t[:, None] * stride_qt + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    idx_base = idx_ptr + batch * stride_ib + (kv_head // KV_PER_SET) * stride_is
    first_idx = idx_base + (2 * pair) * stride_it
    # A missing second query (odd n_queries) reads the first's list again: its rows are masked anyway.
    second_idx = idx_base + tl.minimum(2 * pair + 1, n_queries - 1) * stride_it
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    m_i = tl.full((2 * G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((2 * G_PAD,), tl.float32)
    acc = tl.zeros((2 * G_PAD, HEAD_DIM), tl.float32)
    m_i, l_i, acc = _pair_gather_block(
        q, m_i, l_i, acc, k_base, v_base, first_idx, second_idx, topk, first_rows, second_rows, stride_ks,
        stride_vs, scale_log2, SHARED=True, LOG2_K=LOG2_K, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
    )  # fmt: skip
    m_i, l_i, acc = _pair_gather_block(
        q, m_i, l_i, acc, k_base, v_base, second_idx, first_idx, topk, second_rows, first_rows, stride_ks,
        stride_vs, scale_log2, SHARED=False, LOG2_K=LOG2_K, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
    )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows attended to nothing
    tl.store(
        out_ptr + batch * stride_ob + heads[:, None] * stride_oh + t[:, None] * stride_ot + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, m_ptr, l_ptr, acc_ptr, pos_ptr, topk, slots_per_split, scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_is,
    N_KV_HEADS: tl.constexpr, KV_PER_SET: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, CONTIGUOUS: tl.constexpr,
):  # fmt: skip
    """CONTIGUOUS: dense decode over keys 0 ... *pos_ptr (no index list; the position is read on the device)."""
    batch_group, split = tl.program_id(0), tl.program_id(1)
    batch, kv_head = batch_group // N_KV_HEADS, batch_group % N_KV_HEADS
    rows = tl.arange(0, G_PAD)
    heads = kv_head * GROUP + rows
    head_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    )
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, HEAD_DIM), tl.float32)
    slot_start = split * slots_per_split
    n_slots = tl.load(pos_ptr).to(tl.int32) + 1 if CONTIGUOUS else topk
    m_i, l_i, acc = _gather_attention_block(
        q, m_i, l_i, acc,
        k_ptr + batch * stride_kb + kv_head * stride_kh, v_ptr + batch * stride_vb + kv_head * stride_vh,
        idx_ptr + batch * stride_ib + (kv_head // KV_PER_SET) * stride_is, slot_start,
        tl.minimum(slot_start + slots_per_split, n_slots),
        stride_ks, stride_vs, scale_log2,
        HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, UPCAST=UPCAST, CONTIGUOUS=CONTIGUOUS,
    )  # fmt: skip
    partial = (batch_group * tl.num_programs(1) + split) * G_PAD + rows
    tl.store(m_ptr + partial, m_i)
    tl.store(l_ptr + partial, l_i)
    tl.store(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc)


def _group_padding(n_heads: int, n_kv_heads: int) -> tuple[int, int]:
    group = n_heads // n_kv_heads
    return group, max(16, triton.next_power_of_2(group))


def _index_sets(indices: Tensor, n_kv_heads: int) -> tuple[Tensor, int, int]:
    """indices (B, T, k) shared by every head, or (B, sets, T, k): the 4-D view, the sets' stride (0 when
    shared) and the kv heads each set serves."""
    if indices.dim() == 3:
        return indices[:, None], 0, n_kv_heads
    return indices, indices.stride(1), n_kv_heads // indices.shape[1]


def sparse_attention_prefill(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    indices: Tensor,
    scale: float,
    block_n: int = 32,
    num_warps: int = 1,
    num_stages: int = 3,
    pairs: bool = False,
) -> Tensor:
    """Gather attention for every query of q (B, Hq, T, d); every query needs at least one valid index.

    32 keys a step on one warp, 3 stages deep: the fastest launch measured at 32K and 128K on an H100
    (docs/benchmarks.md). pairs: neighbouring queries share a program and each key either chose is gathered
    once (a trained indexer's neighbours choose a third or more of the same keys); needs every row of indices
    ascending, its -1 slots after its keys (the CUDA top-k's order). Not yet timed on a GPU: not the default."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group, g_pad = _group_padding(n_heads, n_kv_heads)
    out = torch.empty_like(q)
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("indices", indices)):
        assert tensor.stride(-1) == 1, f"{name} must be contiguous in its last dimension"
    indices, stride_is, kv_per_set = _index_sets(indices, n_kv_heads)
    if pairs:
        pair_pad = max(8, triton.next_power_of_2(group))  # two queries' heads fill the 16 rows of an MMA
        _sparse_prefill_pairs_kernel[(triton.cdiv(n_queries, 2), batch * n_kv_heads)](
            q, k_cache, v_cache, indices, out, n_queries, indices.shape[-1], scale * 1.4426950408889634,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            indices.stride(0), stride_is, indices.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            N_KV_HEADS=n_kv_heads, KV_PER_SET=kv_per_set, GROUP=group, G_PAD=pair_pad, HEAD_DIM=head_dim,
            BLOCK_N=block_n, LOG2_K=indices.shape[-1].bit_length(), UPCAST=INTERPRETED, num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
        return out
    _sparse_prefill_kernel[(n_queries, batch * n_kv_heads)](
        q, k_cache, v_cache, indices, out, indices.shape[-1], scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        indices.stride(0), stride_is, indices.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        N_KV_HEADS=n_kv_heads, KV_PER_SET=kv_per_set, GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, BLOCK_N=block_n, UPCAST=INTERPRETED,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def sparse_attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, scale: float, slots_per_split: int = 256
) -> Tensor:
    """Gather attention for one new token per sequence: q (B, Hq, 1, d), indices (B, 1, k) or (B, sets, 1, k)
    -> (B, Hq, 1, d)."""
    return _decode(q, k_cache, v_cache, indices, None, scale, slots_per_split)


def dense_attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor, scale: float, slots_per_split: int = 1024
) -> Tensor:
    """Dense attention of one new token per sequence over cache keys 0 ... position, a one-element device
    tensor: q (B, Hq, 1, d) -> (B, Hq, 1, d). Split across the keys like the sparse decode (flash-decoding), so
    a captured decode step serves every position of a preallocated cache. Masked SDPA over the whole cache
    ran 1.5x slower than the eager unmasked call at 128K."""
    return _decode(q, k_cache, v_cache, None, position, scale, slots_per_split)


def _decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    indices: Tensor | None,
    position: Tensor | None,
    scale: float,
    slots_per_split: int,
) -> Tensor:
    """One decode kernel for both: the selected keys (`indices`), or every key up to `position`."""
    batch, n_heads, _, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group, g_pad = _group_padding(n_heads, n_kv_heads)
    contiguous = indices is None
    if contiguous:
        indices, stride_is, kv_per_set, topk = position, 0, n_kv_heads, k_cache.shape[2]
    else:
        indices, stride_is, kv_per_set = _index_sets(indices, n_kv_heads)
        topk, position = indices.shape[-1], indices
    n_splits = triton.cdiv(topk, slots_per_split)
    partial_shape = (batch * n_kv_heads, n_splits, g_pad)
    m = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    lse_sum = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    acc = torch.empty((*partial_shape, head_dim), dtype=torch.float32, device=q.device)
    _sparse_decode_kernel[(batch * n_kv_heads, n_splits)](
        q, k_cache, v_cache, indices, m, lse_sum, acc, position, topk, slots_per_split, scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        0 if contiguous else indices.stride(0), stride_is,
        N_KV_HEADS=n_kv_heads, KV_PER_SET=kv_per_set, GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, BLOCK_N=64, UPCAST=INTERPRETED,
        CONTIGUOUS=contiguous, num_warps=4, num_stages=2,
    )  # fmt: skip
    return merge_partials(m, lse_sum, acc, group, q.dtype).view(batch, n_heads, 1, head_dim)


@triton.jit
def _merge_partials_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, n_splits,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """One query head of one (sequence, kv group): its splits' partials, SPLITS at a time with a running max
    (a dense decode over a long cache has hundreds of splits)."""
    bg, head = tl.program_id(0) // GROUP, tl.program_id(0) % GROUP
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    m_max = tl.full((1,), float("-inf"), tl.float32)
    total = tl.zeros((1,), tl.float32)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    for s0 in range(0, n_splits, SPLITS):
        part = (bg * n_splits + s0 + splits) * G_PAD + head
        ok = s0 + splits < n_splits
        m = tl.load(m_ptr + part, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m_max, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: every weight is 0
        rescale = tl.exp2(m_max - m_safe)
        weight = tl.exp2(m - m_safe)  # splits that saw no valid key have l = 0 and acc = 0
        total = total * rescale + tl.sum(tl.load(l_ptr + part, mask=ok, other=0.0) * weight, 0)
        partial = tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)
        acc = acc * rescale + tl.sum(partial * weight[:, None], 0)
        m_max = m_new
    out = acc / total
    tl.store(out_ptr + (bg * GROUP + head) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def merge_partials(m: Tensor, lse_sum: Tensor, acc: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    """Split softmax partials (B * Hkv, splits, G_PAD) (max m and sum l in the log2 domain, unnormalized acc
    (..., d)) combined over the splits: (B * Hkv, group, d) in `dtype`, one launch (PyTorch's merge is about ten,
    and a graph-replayed decode step is bound by its launches). `merge_partials_reference` is the oracle."""
    n_groups, n_splits, g_pad, head_dim = acc.shape
    out = torch.empty(n_groups, group, head_dim, dtype=dtype, device=acc.device)
    splits = max(2, min(64, triton.next_power_of_2(n_splits)))
    _merge_partials_kernel[(n_groups * group,)](
        m,
        lse_sum,
        acc,
        out,
        n_splits,
        GROUP=group,
        G_PAD=g_pad,
        HEAD_DIM=head_dim,
        SPLITS=splits,
        num_warps=4,
    )
    return out


def merge_partials_reference(m: Tensor, lse_sum: Tensor, acc: Tensor) -> Tensor:
    """Combine split softmax partials (max m and sum l in the log2 domain, unnormalized acc) along dim 1."""
    m_max = m.amax(dim=1, keepdim=True)
    m_max = torch.where(m_max == float("-inf"), 0.0, m_max)
    weight = torch.exp2(m - m_max)  # splits that saw no valid key have l = 0 and acc = 0
    total = (lse_sum * weight).sum(dim=1)
    return (acc * weight[..., None]).sum(dim=1) / total[..., None]


def sparse_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, scale: float) -> Tensor:
    """The GPU path of `torch_dsa.sparse_attention`: decode kernel for one query, prefill otherwise."""
    if q.shape[2] == 1:  # indices (B, 1, k) or (B, sets, 1, k)
        return sparse_attention_decode(q, k_cache, v_cache, indices, scale)
    return sparse_attention_prefill(q, k_cache, v_cache, indices, scale)
