"""Triton lightning-indexer kernels: fused index scores and an exact per-query top-k (radix select).

Shapes (one layer, queries at contiguous positions q_start ... q_start + T - 1, keys at 0 ... S - 1):
    q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I)  ->  indices (B, T, topk) int32, -1 in unused slots.
`select_topk` matches `torch_dsa.select_topk` (sinks and the local window always selected).

Queries go in chunks: `index_scores` writes the chunk's scores (chunk x S, bf16, causal tiles only) and
`topk_select` reduces each row to its top-k: one pass splits off the keys above a threshold from a sample
of the row (a few x k) and a list of the keys tied at it; an exact radix select (histograms of the high then
the low byte of the bf16 score's order key, then an emit pass) runs on the keys above, or, when fewer than k
lie above, the top-k is those plus the first tied keys. Only a sample that missed (more than 4 x k above, or
fewer than k at or above) sends a row to the radix select over the whole row. On a GPU, prefill chunks run
the same split, select and whole-row select in the CUDA kernel of cuda_topk.py, one thread block a row.
Memory is O(chunk x S), never S x S. `*_reference` functions beside each kernel are the PyTorch oracles for the tests.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsarag.kernels import cuda_topk
from dsarag.kernels.common import INTERPRETED, dot
from dsarag.kernels.torch_dsa import check_topk_holds_forced
from dsarag.kernels.torch_dsa import index_scores as index_scores_torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def _index_scores_kernel(
    q_ptr, w_ptr, k_ptr, q_scale_ptr, k_scale_ptr, out_ptr, start_ptr,
    n_queries, n_keys, q_start, n_sink, window,
    stride_qb, stride_qt, stride_qh,
    stride_wb, stride_wt,
    stride_kb, stride_ks,
    stride_qsb, stride_qst, stride_ksb,
    stride_ob, stride_ot,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SCALED: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, START_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    pid_q, pid_k, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if START_ON_DEVICE:  # a CUDA-graph decode step: the position changes at every replay
        q_start = tl.load(start_ptr).to(tl.int32)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    keys = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    last_query_pos = q_start + tl.minimum(pid_q * BLOCK_Q + BLOCK_Q, n_queries) - 1
    if pid_k * BLOCK_K > last_query_pos:
        return  # the whole tile is in the future: the top-k pass never reads it
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_queries
    key_ok = keys < n_keys
    # Keys loaded transposed (d_I, BLOCK_K) so the dot needs no register transpose (fp8 wants K-major).
    k_t = tl.load(
        k_ptr + batch * stride_kb + keys[None, :] * stride_ks + dims[:, None], mask=key_ok[None, :], other=0.0
    )
    scores = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
    for head in tl.static_range(N_HEADS):
        q = tl.load(
            q_ptr + batch * stride_qb + rows[:, None] * stride_qt + head * stride_qh + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        logits = dot(q, k_t, UPCAST)
        if SCALED:  # fp8: one scale per index-query vector and per key
            q_scale = tl.load(
                q_scale_ptr + batch * stride_qsb + rows * stride_qst + head, mask=row_ok, other=0.0
            )
            logits = logits * q_scale[:, None]
        weight = tl.load(w_ptr + batch * stride_wb + rows * stride_wt + head, mask=row_ok, other=0.0)
        scores += weight.to(tl.float32)[:, None] * tl.maximum(logits, 0.0)
    if SCALED:
        k_scale = tl.load(k_scale_ptr + batch * stride_ksb + keys, mask=key_ok, other=0.0)
        scores = scores * k_scale[None, :]
    positions = q_start + rows
    past = keys[None, :] <= positions[:, None]
    forced = past & ((keys[None, :] < n_sink) | (keys[None, :] > positions[:, None] - window))
    scores = tl.where(forced, float("inf"), tl.where(past, scores, float("-inf")))
    tl.store(
        out_ptr + batch * stride_ob + rows[:, None] * stride_ot + keys[None, :],
        scores.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & key_ok[None, :],
    )


def device_start(q_start: int | Tensor, placeholder: Tensor) -> tuple[int, Tensor, bool]:
    """Kernel arguments for the first query position: a host int, or a one-element device tensor that the
    kernel loads (no host sync, and one CUDA graph serves every decode position)."""
    if isinstance(q_start, Tensor):
        return 0, q_start, True
    return q_start, placeholder, False


def index_scores(
    q: Tensor,
    w: Tensor,
    k: Tensor,
    q_start: int | Tensor,
    n_sink: int,
    window: int,
    q_scale: Tensor | None = None,
    k_scale: Tensor | None = None,
    out: Tensor | None = None,
    block_q: int | None = None,
    block_k: int = 128,
    num_warps: int = 4,
) -> Tensor:
    """Scores (B, T, S) bf16 for queries at q_start + i: +inf for sinks and window, -inf in the future.

    block_q None: 64 query rows per tile, 16 (the smallest MMA) when there are few queries, as in decode,
    where a 64-row tile would be almost all padding (2.2x faster at 128K, batch 16).

    Tiles entirely in the future are left unwritten. With q_scale (B, T, H_I) and k_scale (B, S), q and k are
    float8_e4m3fn and the logits are rescaled (the FP8 indexer). q_start may be a one-element device tensor
    (`device_start`): a captured decode step then replays at every position.
    """
    batch, n_queries, n_heads, head_dim = q.shape
    n_keys = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    if out is None:
        out = torch.empty(batch, n_queries, n_keys, dtype=torch.bfloat16, device=q.device)
    scaled = q_scale is not None
    block_q = block_q or (16 if n_queries <= 16 else 64)
    grid = (triton.cdiv(n_queries, block_q), triton.cdiv(n_keys, block_k), batch)
    start, start_ptr, on_device = device_start(q_start, q)
    _index_scores_kernel[grid](
        q, w, k, q_scale if scaled else q, k_scale if scaled else q, out, start_ptr,
        n_queries, n_keys, start, n_sink, window,
        q.stride(0), q.stride(1), q.stride(2),
        w.stride(0), w.stride(1),
        k.stride(0), k.stride(1),
        q_scale.stride(0) if scaled else 0, q_scale.stride(1) if scaled else 0,
        k_scale.stride(0) if scaled else 0,
        out.stride(0), out.stride(1),
        N_HEADS=n_heads, HEAD_DIM=head_dim, SCALED=scaled, UPCAST=INTERPRETED, BLOCK_Q=block_q, BLOCK_K=block_k,
        START_ON_DEVICE=on_device, num_warps=num_warps,
    )  # fmt: skip
    return out


def index_scores_reference(q: Tensor, w: Tensor, k: Tensor, q_start: int, n_sink: int, window: int) -> Tensor:
    """float32 oracle of `index_scores` (the model's own index_scores plus the forced sinks and window)."""
    q_pos = torch.arange(q_start, q_start + q.shape[1], device=q.device)
    k_pos = torch.arange(k.shape[1], device=q.device)
    scores = index_scores_torch(q, w, k, q_pos, k_pos)
    past = k_pos[None, :] <= q_pos[:, None]
    forced = past & ((k_pos[None, :] < n_sink) | (k_pos[None, :] > q_pos[:, None] - window))
    return scores.masked_fill(forced, float("inf"))


@triton.jit
def _order_key(scores):
    """bf16 -> uint16-valued int32 whose unsigned order is the float order (-inf lowest, +inf highest)."""
    bits = scores.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)


@triton.jit
def _listed_key(row_scores, row_keys, i, n, INDIRECT: tl.constexpr):
    """Order keys of elements i of `_radix_topk`'s list after its first pass (padding: the last bin)."""
    if INDIRECT:
        return tl.load(row_keys + i, mask=i < n, other=0).to(tl.int32) & 0xFFFF
    return _order_key(tl.load(row_scores + i, mask=i < n, other=float("-inf")))


@triton.jit
def _radix_topk(
    row_scores, row_cols, row_keys, row_out, n, topk, BLOCK: tl.constexpr, INDIRECT: tl.constexpr
):
    """Write the columns of the topk largest of n scores to row_out (exact; ties: the first ones win).

    Element i is column i of the row, or column row_cols[i] with INDIRECT (a candidate list; the first pass
    gathers its scores once and keeps their order keys in row_keys[i], int16, for the later passes: a gathered
    2-byte score costs a 32-byte memory sector). Three passes: a histogram of the high byte of the order key
    (bin 0 = largest), a histogram of the low byte inside the boundary bin, then the emit pass. Padding lanes
    load -inf, which the causal prefix never holds, so they sit in the last bin and are never emitted: no
    histogram mask is needed (Triton 3.6 has none).
    """
    high_hist = tl.zeros((256,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        cols = tl.load(row_cols + i, mask=i < n, other=0) if INDIRECT else i
        key = _order_key(tl.load(row_scores + cols, mask=i < n, other=float("-inf")))
        if INDIRECT:
            tl.store(row_keys + i, key.to(tl.int16), mask=i < n)
        high_hist += tl.histogram(255 - (key >> 8), 256)
    if INDIRECT:
        tl.debug_barrier()  # the later passes read keys that other threads of this program wrote
    high_cum = tl.cumsum(high_hist, 0)
    high_bin = tl.sum((high_cum < topk).to(tl.int32), 0)
    need = topk - tl.sum(tl.where(high_cum < topk, high_hist, 0), 0)

    low_hist = tl.zeros((256,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        key = _listed_key(row_scores, row_keys, i, n, INDIRECT=INDIRECT)
        in_bin = (i < n) & (255 - (key >> 8) == high_bin)
        low_hist += tl.histogram(tl.where(in_bin, 255 - (key & 0xFF), 255), 256)
    low_cum = tl.cumsum(low_hist, 0)
    low_bin = tl.sum((low_cum < need).to(tl.int32), 0)
    ties_to_take = need - tl.sum(tl.where(low_cum < need, low_hist, 0), 0)

    n_out = 0
    ties_taken = 0
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        valid = i < n
        cols = tl.load(row_cols + i, mask=valid, other=0) if INDIRECT else i
        key = _listed_key(row_scores, row_keys, i, n, INDIRECT=INDIRECT)
        rank_high = 255 - (key >> 8)
        rank_low = 255 - (key & 0xFF)
        above = valid & ((rank_high < high_bin) | ((rank_high == high_bin) & (rank_low < low_bin)))
        tie = valid & (rank_high == high_bin) & (rank_low == low_bin)
        tie_rank = ties_taken + tl.cumsum(tie.to(tl.int32), 0) - 1
        take = above | (tie & (tie_rank < ties_to_take))
        slot = n_out + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(row_out + slot, cols, mask=take)
        n_out += tl.sum(take.to(tl.int32), 0)
        ties_taken += tl.sum(tie.to(tl.int32), 0)
    return n_out


@triton.jit
def _copy_list(src, dst, n, BLOCK: tl.constexpr):
    """dst[i] = src[i] for i < n (candidate and tie lists are int32 columns)."""
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < n), mask=i < n)


@triton.jit
def _select_from_lists(
    row_scores, row_cands, row_keys, counts, row_out, topk, capacity, BLOCK: tl.constexpr, SPLIT: tl.constexpr
):
    """Settle a row from its segments' lists, or return False when only the whole row can (`_topk_full_kernel`).

    Segment p's keys above the threshold sit at row_cands + p * (capacity + topk), its first keys equal to the
    threshold (at most topk) right after; counts holds the SPLIT above counts, then the SPLIT tie counts. With
    at least topk keys above (and none lost to a full list) the radix select runs on them; with fewer, the
    top-k is every key above plus the first tied keys: no select is needed.
    """
    n_above = 0
    n_ties = 0
    for p in tl.static_range(SPLIT):
        n_above += tl.load(counts + p)
        n_ties += tl.load(counts + SPLIT + p)
    segment_stride = capacity + topk
    select = (n_above >= topk) & (n_above <= capacity)
    fill = (n_above < topk) & (n_above + n_ties >= topk)
    if select:
        # Later segments join the first's list in key order. No source overlaps it: the total fits capacity.
        offset = tl.load(counts)
        for p in tl.static_range(1, SPLIT):
            n = tl.load(counts + p)
            _copy_list(row_cands + p * segment_stride, row_cands + offset, n, BLOCK=BLOCK)
            offset += n
        tl.debug_barrier()  # the select reads list entries that other threads of this program wrote
        _radix_topk(row_scores, row_cands, row_keys, row_out, n_above, topk, BLOCK=BLOCK, INDIRECT=True)
    if fill:
        offset = 0
        for p in tl.static_range(SPLIT):
            n = tl.load(counts + p)
            _copy_list(row_cands + p * segment_stride, row_out + offset, n, BLOCK=BLOCK)
            offset += n
        for p in tl.static_range(SPLIT):
            n = tl.minimum(tl.load(counts + SPLIT + p), topk - offset)
            _copy_list(row_cands + p * segment_stride + capacity, row_out + offset, n, BLOCK=BLOCK)
            offset += n
    return select | fill


@triton.jit
def _split_block(
    scores, row_cands, row_ties, start, end, threshold, n_above, n_ties, capacity, topk,
    BLOCK: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Append the block's keys above the threshold and tied with it to their lists; return the new counts.

    `scores` are the block's BLOCK scores from column start on, loaded by the caller (-inf past `end`)."""
    cols = start + tl.arange(0, BLOCK)
    key = _order_key(scores)
    if MASKED:
        valid = cols < end
        above = valid & (key > threshold)
        tie = valid & (key == threshold)
    else:
        above = key > threshold
        tie = key == threshold
    packed = above.to(tl.int32) | (tie.to(tl.int32) << 16)
    ranks = tl.cumsum(packed, 0)
    above_slot = n_above + (ranks & 0xFFFF) - 1
    tie_slot = n_ties + (ranks >> 16) - 1
    tl.store(row_cands + above_slot, cols, mask=above & (above_slot < capacity))
    tl.store(row_ties + tie_slot, cols, mask=tie & (tie_slot < topk))
    block_counts = tl.sum(packed, 0)
    return n_above + (block_counts & 0xFFFF), n_ties + (block_counts >> 16)


@triton.jit
def _topk_candidates_kernel(
    scores_ptr, cand_ptr, key_ptr, count_ptr, status_ptr, out_ptr, start_ptr, n_queries, q_start, n_keys, topk,
    capacity, stride_sb, stride_st, stride_cb, stride_ct, stride_ob, stride_ot,
    SAMPLE: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, START_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    """Fast path: a threshold from a sample of the row splits it in one pass into the keys above it (a
    few x topk, up to `capacity` kept) and the keys equal to it (the first topk kept); `_select_from_lists`
    then settles the row. status[row] = 0 when done, 1 when the row needs `_topk_full_kernel`.

    With SPLIT > 1 (few rows, as in decode) SPLIT programs share a row: each computes the same threshold,
    fills its segment's lists and counts; `_topk_merge_kernel` then settles the row."""
    tl.static_assert(BLOCK < 65536)  # one prefix sum ranks both lists: 16 bits each
    row, batch, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if START_ON_DEVICE:
        q_start = tl.load(start_ptr).to(tl.int32)
    row_scores = scores_ptr + batch * stride_sb + row * stride_st
    row_out = out_ptr + batch * stride_ob + row * stride_ot
    row_cands = cand_ptr + batch * stride_cb + row * stride_ct + part * (capacity + topk)
    row_ties = row_cands + capacity
    counts = count_ptr + (batch * n_queries + row) * 2 * SPLIT
    row_status = status_ptr + batch * n_queries + row
    row_len = tl.minimum(q_start + row + 1, n_keys)  # keys beyond the query's position are never read
    if row_len <= topk:  # every key is selected; the rest are unused slots
        if part == 0:
            for start in range(0, topk, BLOCK):
                slots = start + tl.arange(0, BLOCK)
                tl.store(row_out + slots, tl.where(slots < row_len, slots, -1), mask=slots < topk)
            tl.store(row_status, 0)
        if SPLIT > 1:
            tl.store(counts + part, -1)
        return

    # The sample rank keeps ~1.25 x topk keys at or above the threshold, plus a margin of 4 standard deviations.
    sample_cols = (tl.arange(0, SAMPLE).to(tl.int64) * row_len // SAMPLE).to(tl.int32)
    sample = _order_key(tl.load(row_scores + sample_cols))
    expected = SAMPLE * topk / row_len
    rank = tl.minimum(expected * 1.25 + 4.0 * tl.sqrt(expected) + 8.0, SAMPLE - 1).to(tl.int32)
    # The sample's rank-th largest key, bit by bit from the top (the largest key with more than rank sampled keys
    # at or above it): 16 counts cost less than sorting the sample.
    threshold = rank * 0
    for bit in tl.static_range(16):
        candidate = threshold | (1 << (15 - bit))
        threshold = tl.where(tl.sum((sample >= candidate).to(tl.int32), 0) > rank, candidate, threshold)

    segment = tl.cdiv(tl.cdiv(row_len, SPLIT), BLOCK) * BLOCK
    seg_start = part * segment
    seg_end = tl.minimum(seg_start + segment, row_len)
    full_end = seg_start + tl.maximum(seg_end - seg_start, 0) // BLOCK * BLOCK
    n_above = 0
    n_ties = 0
    # Whole blocks load unmasked (a mask ending at an arbitrary column forces 2-byte loads), each one block
    # ahead of its use, so the load is in flight during the previous block's scan and stores.
    lanes = tl.arange(0, BLOCK)
    block = tl.load(row_scores + seg_start + lanes, mask=seg_start + lanes < full_end, other=float("-inf"))
    for start in range(seg_start, full_end, BLOCK):
        ahead = tl.where(start + BLOCK < full_end, start + BLOCK, start)
        next_block = tl.load(row_scores + ahead + lanes)
        n_above, n_ties = _split_block(
            block, row_cands, row_ties, start, seg_end, threshold, n_above, n_ties, capacity, topk,
            BLOCK=BLOCK, MASKED=False,
        )  # fmt: skip
        block = next_block
    if full_end < seg_end:
        tail = tl.load(row_scores + full_end + lanes, mask=full_end + lanes < seg_end, other=float("-inf"))
        n_above, n_ties = _split_block(
            tail, row_cands, row_ties, full_end, seg_end, threshold, n_above, n_ties, capacity, topk,
            BLOCK=BLOCK, MASKED=True,
        )  # fmt: skip
    tl.store(counts + part, n_above)
    tl.store(counts + SPLIT + part, n_ties)
    if SPLIT == 1:
        tl.debug_barrier()  # the counts and lists were written by other threads of this program
        row_keys = key_ptr + (batch * n_queries + row).to(tl.int64) * capacity
        settled = _select_from_lists(
            row_scores, row_cands, row_keys, counts, row_out, topk, capacity, BLOCK=BLOCK, SPLIT=1
        )
        tl.store(row_status, tl.where(settled, 0, 1))


@triton.jit
def _topk_merge_kernel(
    scores_ptr, cand_ptr, key_ptr, count_ptr, status_ptr, out_ptr, n_queries, topk, capacity,
    stride_sb, stride_st, stride_cb, stride_ct, stride_ob, stride_ot,
    BLOCK: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Second level of a split row: settle it from its segments' lists."""
    row, batch = tl.program_id(0), tl.program_id(1)
    counts = count_ptr + (batch * n_queries + row) * 2 * SPLIT
    if tl.load(counts) < 0:  # a short row, settled by the first level
        return
    row_scores = scores_ptr + batch * stride_sb + row * stride_st
    row_cands = cand_ptr + batch * stride_cb + row * stride_ct
    row_out = out_ptr + batch * stride_ob + row * stride_ot
    row_keys = key_ptr + (batch * n_queries + row).to(tl.int64) * capacity
    settled = _select_from_lists(
        row_scores, row_cands, row_keys, counts, row_out, topk, capacity, BLOCK=BLOCK, SPLIT=SPLIT
    )
    tl.store(status_ptr + batch * n_queries + row, tl.where(settled, 0, 1))


@triton.jit
def _topk_full_kernel(
    scores_ptr, status_ptr, out_ptr, start_ptr, n_queries, q_start, n_keys, topk,
    stride_sb, stride_st, stride_ob, stride_ot,
    BLOCK: tl.constexpr, START_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    """Exact radix select over the whole row, for the rows the fast path could not settle."""
    row, batch = tl.program_id(0), tl.program_id(1)
    if tl.load(status_ptr + batch * n_queries + row) == 0:
        return
    if START_ON_DEVICE:
        q_start = tl.load(start_ptr).to(tl.int32)
    row_len = tl.minimum(q_start + row + 1, n_keys)
    row_scores = scores_ptr + batch * stride_sb + row * stride_st
    _radix_topk(row_scores, row_scores, row_scores, out_ptr + batch * stride_ob + row * stride_ot, row_len, topk,
                BLOCK=BLOCK, INDIRECT=False)  # fmt: skip


def topk_select(
    scores: Tensor,
    q_start: int | Tensor,
    n_keys: int,
    topk: int,
    out: Tensor | None = None,
    block: int = 1024,
    num_warps: int = 4,
    sample: int | None = None,
    split: int | None = None,
    settle_block: int = 4096,
    settle_warps: int = 16,
    return_fallback: bool = False,
    engine: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Indices (B, T, topk) int32 of each row's topk largest scores among keys 0 ... q_start + t; -1 if fewer.

    Exact on the bf16 scores; among keys tied at the k-th largest score the lowest positions win, so the
    selection is `topk_select_reference`'s. `split`: programs per row (None: enough to fill the GPU when there
    are few rows, as in decode; a power of two). q_start: a host int or a one-element device tensor, as in
    `index_scores`. settle_block, settle_warps: the launch of the kernels that settle one row per program from
    lists or from the whole row (the split-row merge, the whole-row fallback): a launch waits for its few heavy
    rows, so they get 16 warps where the candidates kernel, one program per row, runs best on 4.
    return_fallback: also return a (B, T) bool tensor, True for the rows that needed the slow radix select over
    the whole row (the sample's threshold kept more than 4 x topk keys above it, or fewer than
    topk at or above it).
    engine: "cuda": one thread block settles each row, a missed sample included (cuda_topk.py; 1.4-1.9x faster
    than the candidates kernel at 32K and 128K on an H100), on scores in 16-byte aligned rows (`split` does
    not apply);
    "triton": the candidates kernel; "auto": CUDA for prefill calls (a host q_start, one program a row) where
    it builds, else Triton.
    """
    batch, n_queries, _ = scores.shape
    if out is None:
        out = torch.empty(batch, n_queries, topk, dtype=torch.int32, device=scores.device)
    capacity = 4 * topk
    if sample is None:  # 1024 keys at long context, fewer for short rows (16 counts over it per row)
        sample = max(16, min(1024, triton.next_power_of_2(n_keys) // 8))
    if split is None:  # ≈ 256 programs in all, each segment at least 8 blocks long
        split = max(1, min(256 // (batch * n_queries), n_keys // (8 * block)))
        split = 1 << (split.bit_length() - 1)
    status = torch.empty(batch, n_queries, dtype=torch.int32, device=scores.device)
    if engine not in ("auto", "cuda", "triton"):
        raise ValueError(f"top-k engine {engine!r}: use auto, cuda or triton")
    prefill = not isinstance(q_start, Tensor) and split == 1
    # Checked (and built) only where it would run: Triton calls and auto decode steps never ask.
    use_cuda = (engine == "cuda" or (engine == "auto" and prefill)) and cuda_topk.usable(
        scores, topk, capacity
    )
    if engine == "cuda" and not use_cuda:
        raise ValueError("the CUDA top-k needs bf16 scores in 16-byte aligned rows on a GPU")
    start, start_ptr, on_device = device_start(q_start, status)
    if use_cuda:
        # Settles every row itself: status 2 marks those its sample missed (the whole-row select ran).
        cuda_topk.topk_rows(scores, q_start, n_keys, topk, capacity, out, status)
    else:
        # Per segment: `capacity` slots for the keys above the threshold, then topk for the keys equal to it.
        candidates = torch.empty(
            batch, n_queries, split * (capacity + topk), dtype=torch.int32, device=scores.device
        )
        counts = torch.empty(batch, n_queries, 2, split, dtype=torch.int32, device=scores.device)
        # The order keys of the list the select runs on, gathered from the scores once.
        keys = torch.empty(batch, n_queries, capacity, dtype=torch.int16, device=scores.device)
        _topk_candidates_kernel[(n_queries, batch, split)](
            scores, candidates, keys, counts, status, out, start_ptr, n_queries, start, n_keys, topk, capacity,
            scores.stride(0), scores.stride(1), candidates.stride(0), candidates.stride(1), out.stride(0),
            out.stride(1), SAMPLE=sample, BLOCK=block, SPLIT=split, START_ON_DEVICE=on_device, num_warps=num_warps,
        )  # fmt: skip
        if split > 1:
            _topk_merge_kernel[(n_queries, batch)](
                scores, candidates, keys, counts, status, out, n_queries, topk, capacity,
                scores.stride(0), scores.stride(1), candidates.stride(0), candidates.stride(1), out.stride(0),
                out.stride(1), BLOCK=settle_block, SPLIT=split, num_warps=settle_warps,
            )  # fmt: skip
        _topk_full_kernel[(n_queries, batch)](
            scores, status, out, start_ptr, n_queries, start, n_keys, topk,
            scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
            BLOCK=settle_block, START_ON_DEVICE=on_device, num_warps=settle_warps,
        )  # fmt: skip
    if return_fallback:
        return out, status.bool()
    return out


def topk_select_reference(scores: Tensor, q_start: int, n_keys: int, topk: int) -> Tensor:
    """Oracle: a stable descending sort of each row's causal prefix (ties: the lowest positions first), its
    first topk positions; -1 for slots beyond the row's key count."""
    batch, n_queries, _ = scores.shape
    out = torch.full((batch, n_queries, topk), -1, dtype=torch.int32, device=scores.device)
    for row in range(n_queries):
        row_len = min(q_start + row + 1, n_keys)
        order = scores[:, row, :row_len].float().sort(dim=-1, descending=True, stable=True).indices
        out[:, row, : min(topk, row_len)] = order[:, :topk].to(torch.int32)
    return out


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-vector float8_e4m3fn: x (..., d) -> (x8, scale (...)) with x ≈ x8 * scale."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def select_topk(
    q: Tensor,
    w: Tensor,
    k: Tensor,
    q_start: int | Tensor,
    n_keys: int,
    topk: int,
    n_sink: int = 4,
    window: int = 64,
    fp8: bool = False,
    chunk_elements: int = 1 << 30,
) -> Tensor:
    """Indices (B, T, topk) int32 for queries at q_start + t over keys k[:, :n_keys]: the GPU `select_topk`.

    Query chunks keep the bf16 score buffer under `chunk_elements` (2 GiB by default) at any context length.
    q_start may be a one-element device tensor (a captured decode step); n_keys then bounds the keys any
    replay may see (the cache length), and each row still reads only its causal prefix.
    """
    check_topk_holds_forced(topk, n_sink, window)
    batch, n_queries = q.shape[:2]
    k = k[:, :n_keys]
    q_scale = k_scale = None
    if fp8:
        q, q_scale = quantize_fp8(q)
        k, k_scale = quantize_fp8(k)
    indices = torch.empty(batch, n_queries, topk, dtype=torch.int32, device=q.device)
    chunk = max(1, min(n_queries, chunk_elements // max(1, batch * n_keys)))
    # Rows start on 16 bytes, as the CUDA top-k's vector loads need.
    row_stride = triton.cdiv(n_keys, 8) * 8
    buffer = torch.empty(batch, chunk, row_stride, dtype=torch.bfloat16, device=q.device)[..., :n_keys]
    for t0 in range(0, n_queries, chunk):
        rows = slice(t0, min(t0 + chunk, n_queries))
        n_rows = rows.stop - t0
        start = q_start + t0 if t0 else q_start
        scores = index_scores(
            q[:, rows],
            w[:, rows],
            k,
            start,
            n_sink,
            window,
            q_scale[:, rows] if fp8 else None,
            k_scale,
            out=buffer[:, :n_rows],
        )
        topk_select(scores, start, n_keys, topk, out=indices[:, rows])
    return indices
