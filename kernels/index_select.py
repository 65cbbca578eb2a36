"""Prefill top-k selection fused into the index scores: the score matrix is never written.

The two-pass path of `kernels.indexer` writes every causal bf16 score and reads it back to select; at 128K that
is 17 GB of scores and the top-k took 60 % of a DSA layer. Here each query's threshold comes first, then one
pass computes the scores and keeps only the few above it:
1. `_sample_scores_kernel`: scores of a block of queries on SAMPLE keys spread evenly over the block's prefix.
2. `_threshold_kernel`: per query, the sample value whose rank keeps ≈ 1.25 x k keys plus a margin of
   4 standard deviations (the rule of the two-pass path; -inf when the query sees at most k keys).
3. `_candidates_kernel`: the tiles of `index_scores`, but instead of being stored each score is compared with
   its query's threshold: keys above it take a slot of the query's candidate list (one atomic increment),
   with their bf16 score; keys equal to it go to a tie list (a row whose scores are all 0 after the ReLU
   ties thousands of keys: any of them is a valid pick).
4. `_select_kernel`: exact radix select over each query's candidates, topped up from the ties if needed.
A query whose list overflowed or whose threshold was too high falls back to the two-pass path. The lists
fill in no particular order, so among keys of equal score the pick is not fixed (the two-pass path takes
the lowest positions). Shapes as in `kernels.indexer`: q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I)
-> indices (B, T, topk)."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import INTERPRETED
from kernels.indexer import PAIRED, _radix_topk, _tile_scores, index_scores, quantize_fp8, topk_select


@triton.jit
def _sample_scores_kernel(
    q_ptr, w_ptr, k_ptr, q_scale_ptr, k_scale_ptr,
    n_queries, n_keys, q_start, n_sink, window,
    stride_qb, stride_qt, stride_qh, stride_wb, stride_wt, stride_kb, stride_ks,
    stride_qsb, stride_qst, stride_ksb, out_ptr, stride_ob, stride_ot,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SCALED: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, SAMPLE: tl.constexpr,
):  # fmt: skip
    """Scores (B, T, SAMPLE) of each query on SAMPLE keys spread evenly over its block's shortest prefix."""
    pid_q, batch = tl.program_id(0), tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < n_queries
    prefix = tl.minimum(q_start + pid_q * BLOCK_Q + 1, n_keys)
    dims = tl.arange(0, HEAD_DIM)
    for start in range(0, SAMPLE, BLOCK_K):
        picks = start + tl.arange(0, BLOCK_K)
        keys = (picks.to(tl.int64) * prefix // SAMPLE).to(tl.int32)
        k_t = tl.load(k_ptr + batch * stride_kb + keys[None, :] * stride_ks + dims[:, None])
        scores = _tile_scores(
            q_ptr + batch * stride_qb, w_ptr + batch * stride_wb, q_scale_ptr + batch * stride_qsb, k_t,
            k_scale_ptr + batch * stride_ksb, rows, row_ok, keys, keys < n_keys, q_start + rows, n_sink, window,
            stride_qt, stride_qh, stride_wt, stride_qst,
            N_HEADS=N_HEADS, HEAD_DIM=HEAD_DIM, SCALED=SCALED, UPCAST=UPCAST, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K,
        )  # fmt: skip
        out = out_ptr + batch * stride_ob + rows[:, None] * stride_ot + picks[None, :]
        tl.store(out, scores.to(tl.bfloat16), mask=row_ok[:, None])


@triton.jit
def _threshold_kernel(
    sample_ptr, threshold_ptr, n_queries, q_start, n_keys, topk, stride_sb, stride_st, SAMPLE: tl.constexpr
):
    """Per query, the sampled score at the rank that keeps ≈ 1.25 x topk keys + 4 sigma; -inf keeps them all."""
    row, batch = tl.program_id(0), tl.program_id(1)
    row_len = tl.minimum(q_start + row + 1, n_keys)
    threshold = float("-inf")
    if row_len > topk:
        sample = tl.load(sample_ptr + batch * stride_sb + row * stride_st + tl.arange(0, SAMPLE)).to(
            tl.float32
        )
        ranked = tl.sort(sample, descending=True)
        expected = SAMPLE * topk / row_len
        rank = tl.minimum(expected * 1.25 + 4.0 * tl.sqrt(expected) + 8.0, SAMPLE - 1).to(tl.int32)
        threshold = tl.max(tl.where(tl.arange(0, SAMPLE) == rank, ranked, float("-inf")), 0)
    tl.store(threshold_ptr + batch * n_queries + row, threshold)


@triton.jit
def _candidates_kernel(
    q_ptr, w_ptr, k_ptr, q_scale_ptr, k_scale_ptr,
    n_queries, n_keys, q_start, n_sink, window,
    stride_qb, stride_qt, stride_qh, stride_wb, stride_wt, stride_kb, stride_ks,
    stride_qsb, stride_qst, stride_ksb,
    threshold_ptr, cand_col_ptr, cand_score_ptr, count_ptr, tie_col_ptr, tie_count_ptr, capacity, topk,
    stride_cb, stride_ct, stride_tb, stride_tt,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SCALED: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One tile of scores, compared with each query's threshold: keys above it join the query's candidate
    list (with their bf16 score), keys equal to it its tie list (the first topk only). A slot is one atomic
    increment of the query's count per kept key, so the lists are in no particular order."""
    pid_q, pid_k, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    keys = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if pid_k * BLOCK_K > q_start + tl.minimum(pid_q * BLOCK_Q + BLOCK_Q, n_queries) - 1:
        return  # the whole tile is in the future
    row_ok = rows < n_queries
    key_ok = keys < n_keys
    positions = q_start + rows
    dims = tl.arange(0, HEAD_DIM)
    k_t = tl.load(k_ptr + batch * stride_kb + keys[None, :] * stride_ks + dims[:, None], key_ok[None, :], 0.0)
    scores = _tile_scores(
        q_ptr + batch * stride_qb,
        w_ptr + batch * stride_wb,
        q_scale_ptr + batch * stride_qsb,
        k_t,
        k_scale_ptr + batch * stride_ksb,
        rows,
        row_ok,
        keys,
        key_ok,
        positions,
        n_sink,
        window,
        stride_qt,
        stride_qh,
        stride_wt,
        stride_qst,
        N_HEADS=N_HEADS,
        HEAD_DIM=HEAD_DIM,
        SCALED=SCALED,
        UPCAST=UPCAST,
        BLOCK_Q=BLOCK_Q,
        BLOCK_K=BLOCK_K,
    ).to(tl.bfloat16)  # the two-pass path selects on bf16 scores too
    threshold = tl.load(threshold_ptr + batch * n_queries + rows, mask=row_ok, other=float("inf"))
    value = scores.to(tl.float32)
    past = (keys[None, :] <= positions[:, None]) & row_ok[:, None]
    above = past & (value > threshold[:, None])
    tie = past & (value == threshold[:, None])
    counters = batch * n_queries + rows[:, None] + tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.int32)
    cols = keys[None, :] + tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.int32)
    slot = tl.atomic_add(count_ptr + counters, 1, mask=above, sem="relaxed")
    cand = batch * stride_cb + rows[:, None] * stride_ct + slot
    tl.store(cand_col_ptr + cand, cols, mask=above & (slot < capacity))
    tl.store(cand_score_ptr + cand, scores, mask=above & (slot < capacity))
    tie_slot = tl.atomic_add(tie_count_ptr + counters, 1, mask=tie, sem="relaxed")
    tl.store(
        tie_col_ptr + batch * stride_tb + rows[:, None] * stride_tt + tie_slot, cols, tie & (tie_slot < topk)
    )


@triton.jit
def _select_kernel(
    cand_col_ptr, cand_score_ptr, count_ptr, tie_col_ptr, tie_count_ptr, status_ptr, out_ptr,
    n_queries, q_start, n_keys, topk, capacity, stride_cb, stride_ct, stride_tb, stride_tt, stride_ob, stride_ot,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Exact top-k of each query from its candidates (and ties at its threshold when the candidates are too
    few); status = -1 when settled, else the count of a query that needs the two-pass path."""
    row, batch = tl.program_id(0), tl.program_id(1)
    n = tl.load(count_ptr + batch * n_queries + row)
    n_ties = tl.minimum(tl.load(tie_count_ptr + batch * n_queries + row), topk)
    need = tl.minimum(topk, tl.minimum(q_start + row + 1, n_keys))
    if (n + n_ties < need) | (n > capacity):  # the threshold was too high, or the list overflowed
        tl.store(status_ptr + batch * n_queries + row, n)
        return
    cand_cols = cand_col_ptr + batch * stride_cb + row * stride_ct
    tie_cols = tie_col_ptr + batch * stride_tb + row * stride_tt
    row_out = out_ptr + batch * stride_ob + row * stride_ot
    if n <= topk:  # every candidate, then ties (all equal: any of them) up to need; the rest are unused
        for start in range(0, topk, BLOCK):
            slots = start + tl.arange(0, BLOCK)
            cols = tl.load(cand_cols + slots, mask=slots < n, other=-1)
            ties = tl.load(tie_cols + slots - n, mask=(slots >= n) & (slots < need), other=-1)
            tl.store(row_out + slots, tl.where(slots < n, cols, ties), mask=slots < topk)
    else:
        _radix_topk(cand_score_ptr + batch * stride_cb + row * stride_ct, cand_cols, row_out, n, topk,
                    BLOCK=BLOCK, MODE=PAIRED)  # fmt: skip
    tl.store(status_ptr + batch * n_queries + row, -1)


class IndexQueries(NamedTuple):
    """One call's index queries and keys, as the fused kernels take them (scales: FP8 inputs)."""

    q: Tensor
    w: Tensor
    k: Tensor
    q_start: int
    n_sink: int
    window: int
    q_scale: Tensor | None = None
    k_scale: Tensor | None = None

    def kernel_args(self) -> tuple:
        q, w, k, scaled = self.q, self.w, self.k, self.q_scale is not None
        assert q.stride(-1) == 1 and k.stride(-1) == 1
        scales = (self.q_scale, self.k_scale) if scaled else (q, q)
        return (
            q, w, k, *scales, q.shape[1], k.shape[1], self.q_start, self.n_sink, self.window,
            q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
            self.q_scale.stride(0) if scaled else 0, self.q_scale.stride(1) if scaled else 0,
            self.k_scale.stride(0) if scaled else 0,
        )  # fmt: skip

    def shape(self, block_q: int) -> dict:
        return dict(
            N_HEADS=self.q.shape[2], HEAD_DIM=self.q.shape[3], SCALED=self.q_scale is not None,
            UPCAST=INTERPRETED, BLOCK_Q=block_q,
        )  # fmt: skip


def sample_thresholds(
    iq: IndexQueries, topk: int, sample: int = 1024, block_q: int = 64, num_warps: int = 4
) -> Tensor:
    """Thresholds (B, T) float32: a query's keys scoring at or above its threshold hold its top-k."""
    batch, n_queries = iq.q.shape[:2]
    n_keys = iq.k.shape[1]
    sample = min(sample, max(16, triton.next_power_of_2(n_keys) // 8))
    samples = torch.empty(batch, n_queries, sample, dtype=torch.bfloat16, device=iq.q.device)
    thresholds = torch.empty(batch, n_queries, dtype=torch.float32, device=iq.q.device)
    _sample_scores_kernel[(triton.cdiv(n_queries, block_q), batch)](
        *iq.kernel_args(), samples, samples.stride(0), samples.stride(1),
        BLOCK_K=min(128, sample), SAMPLE=sample, num_warps=num_warps, **iq.shape(block_q),
    )  # fmt: skip
    _threshold_kernel[(n_queries, batch)](
        samples, thresholds, n_queries, iq.q_start, n_keys, topk, samples.stride(0), samples.stride(1),
        SAMPLE=sample, num_warps=4,
    )  # fmt: skip
    return thresholds


class Candidates(NamedTuple):
    """Per query: candidate columns and bf16 scores (capacity slots), their count, and a tie list (topk)."""

    cols: Tensor
    scores: Tensor
    counts: Tensor
    tie_cols: Tensor
    tie_counts: Tensor


def collect_candidates(
    iq: IndexQueries, thresholds: Tensor, capacity: int, topk: int, block_q: int = 64, block_k: int = 128,
    num_warps: int = 4,
) -> Candidates:  # fmt: skip
    """The keys above each query's threshold (up to capacity), and the first topk equal to it."""
    batch, n_queries = iq.q.shape[:2]
    n_keys, device = iq.k.shape[1], iq.q.device
    found = Candidates(
        torch.empty(batch, n_queries, capacity, dtype=torch.int32, device=device),
        torch.empty(batch, n_queries, capacity, dtype=torch.bfloat16, device=device),
        torch.zeros(batch, n_queries, dtype=torch.int32, device=device),
        torch.empty(batch, n_queries, topk, dtype=torch.int32, device=device),
        torch.zeros(batch, n_queries, dtype=torch.int32, device=device),
    )
    grid = (triton.cdiv(n_queries, block_q), triton.cdiv(n_keys, block_k), batch)
    _candidates_kernel[grid](
        *iq.kernel_args(), thresholds, *found, capacity, topk,
        found.cols.stride(0), found.cols.stride(1), found.tie_cols.stride(0), found.tie_cols.stride(1),
        BLOCK_K=block_k, num_warps=num_warps, **iq.shape(block_q),
    )  # fmt: skip
    return found


def select_candidates(found: Candidates, q_start: int, n_keys: int, out: Tensor) -> Tensor:
    """Exact top-k (topk = out's last dimension) of each query's candidates into out; returns the status
    (B, T): -1 where settled, else the count of a query that needs the two-pass path."""
    batch, n_queries, capacity = found.cols.shape
    status = torch.empty(batch, n_queries, dtype=torch.int32, device=found.cols.device)
    _select_kernel[(n_queries, batch)](
        found.cols, found.scores, found.counts, found.tie_cols, found.tie_counts, status, out,
        n_queries, q_start, n_keys, out.shape[-1], capacity,
        found.cols.stride(0), found.cols.stride(1), found.tie_cols.stride(0), found.tie_cols.stride(1),
        out.stride(0), out.stride(1), BLOCK=1024, num_warps=4,
    )  # fmt: skip
    return status


def select_topk_fused(
    iq: IndexQueries,
    out: Tensor,
    sample: int = 1024,
    capacity: int | None = None,
    block_q: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
) -> Tensor:
    """Write into out (B, T, topk) the top-k of iq.k's keys for queries at iq.q_start + t; returns out.

    `capacity` (default 4 x topk) bounds each query's candidate list; a query that overflows it or whose
    sample set the threshold too high is selected again by the two-pass path (`index_scores` + `topk_select`).
    """
    topk, n_keys = out.shape[-1], iq.k.shape[1]
    thresholds = sample_thresholds(iq, topk, sample)
    found = collect_candidates(iq, thresholds, capacity or 4 * topk, topk, block_q, block_k, num_warps)
    status = select_candidates(found, iq.q_start, n_keys, out)
    for row in (status >= 0).any(dim=0).nonzero().flatten().tolist():  # rare: one host sync per call
        rows = slice(row, row + 1)
        q_scale = iq.q_scale[:, rows] if iq.q_scale is not None else None
        scores = index_scores(
            iq.q[:, rows], iq.w[:, rows], iq.k, iq.q_start + row, iq.n_sink, iq.window, q_scale, iq.k_scale
        )
        topk_select(scores, iq.q_start + row, n_keys, topk, out=out[:, rows])
    return out


def select_topk(
    q: Tensor,
    w: Tensor,
    k: Tensor,
    q_start: int,
    n_keys: int,
    topk: int,
    n_sink: int = 4,
    window: int = 64,
    fp8: bool = False,
    chunk_elements: int = 1 << 30,
    fused: bool | None = None,
) -> Tensor:
    """Indices (B, T, topk) int32 for queries at q_start + t over keys k[:, :n_keys]: the GPU `select_topk`.

    fused (None: for more than 16 queries, as in prefill) selects without writing the scores; decode-shaped
    calls take the two-pass path, whose top-k splits a row across programs. Query chunks keep the buffers (bf16
    scores, or candidate lists) under `chunk_elements` entries at any context length.
    """
    if topk < n_sink + window:
        raise ValueError(f"topk={topk} cannot hold the {n_sink} sinks and the window of {window}: raise topk")
    batch, n_queries = q.shape[:2]
    fused = n_queries > 16 if fused is None else fused
    k = k[:, :n_keys]
    q_scale = k_scale = None
    if fp8:
        q, q_scale = quantize_fp8(q)
        k, k_scale = quantize_fp8(k)
    indices = torch.empty(batch, n_queries, topk, dtype=torch.int32, device=q.device)
    row_elements = 4 * topk if fused else n_keys
    chunk = max(1, min(n_queries, chunk_elements // max(1, batch * row_elements)))
    buffer = None if fused else torch.empty(batch, chunk, n_keys, dtype=torch.bfloat16, device=q.device)
    for t0 in range(0, n_queries, chunk):
        rows = slice(t0, min(t0 + chunk, n_queries))
        scales = (q_scale[:, rows], k_scale) if fp8 else (None, None)
        if fused:
            iq = IndexQueries(q[:, rows], w[:, rows], k, q_start + t0, n_sink, window, *scales)
            select_topk_fused(iq, indices[:, rows])
            continue
        scores = index_scores(
            q[:, rows], w[:, rows], k, q_start + t0, n_sink, window, *scales, out=buffer[:, : rows.stop - t0]
        )
        topk_select(scores, q_start + t0, n_keys, topk, out=indices[:, rows])
    return indices
