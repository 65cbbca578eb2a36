"""The PyTorch path of DSA: the reference each kernel is tested against, and the path that runs where no
compiled kernel does (no C++ compiler, or `--kernels torch`).

Shapes as in `indexer_model/indexer.py` and `indexer_model/dsa.py`: index q (B, T, H_I, d_I), head weights w
(B, T, H_I), index keys k (B, S, d_I); attention q (B, Hq, T, d), KV caches (B, Hkv, S, d); indices (B, T, k),
one selection per query shared by all heads, or (B, sets, T, k), -1 for unused slots.
"""

import torch
from torch import Tensor


def rope_inverse_frequencies(rope_dims: int, base: float, device: torch.device | str = "cpu") -> Tensor:
    """The rotation speed of each pair of RoPE dims, float32 (rope_dims / 2,): angles are positions times these."""
    return 1.0 / base ** (torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims)


def index_scores(q: Tensor, w: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """I (B, T, S) float32 = sum_j w[t,j] * ReLU(q[t,j] . k[s]); -inf where key position > query position."""
    # Logits in the inputs' dtype (bf16 products are 4x faster than fp32 on CPUs with AVX512-BF16, and the
    # GPU kernel's scores are bf16 too), weighted and summed in fp32. One (T, S) product per head: 2-3x
    # faster on CPU than one einsum over all heads, whose (T, H, S) logits leave the cache.
    w, k_t = w.float(), k.to(q.dtype).transpose(1, 2)
    scores = torch.relu(q[:, :, 0] @ k_t) * w[:, :, 0, None]
    for head in range(1, q.shape[2]):
        scores = scores + torch.relu(q[:, :, head] @ k_t) * w[:, :, head, None]
    future = k_positions[None, :] > q_positions[:, None]
    return scores.masked_fill_(future, float("-inf"))


@torch.no_grad()
def _selection_scores(q: Tensor, w: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """`index_scores` for ranking only: weighted and summed in place in the inputs' dtype (bf16 in the model,
    as the GPU kernel's scores): 12-30 % faster than fp32 sums on an AVX512-BF16 CPU, and 99.4-99.6 % of the
    same keys (the rest tie within bf16 rounding)."""
    w, k_t = w.to(q.dtype), k.to(q.dtype).transpose(1, 2)
    scores = torch.relu_(q[:, :, 0] @ k_t).mul_(w[:, :, 0, None])
    for head in range(1, q.shape[2]):
        scores.add_(torch.relu_(q[:, :, head] @ k_t).mul_(w[:, :, head, None]))
    future = k_positions[None, :] > q_positions[:, None]
    return scores.masked_fill_(future, float("-inf"))


def wants_gradient(*tensors: Tensor) -> bool:
    """Whether autograd must follow a call on these tensors: the compiled and Triton kernels have no backward,
    so such calls stay in PyTorch."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_topk_holds_forced(topk: int, n_sink: int, window: int) -> None:
    """Every selection path's first check: k must have room for the sinks and the window it always keeps."""
    if topk < n_sink + window:
        raise ValueError(f"topk={topk} cannot hold the {n_sink} sinks and the window of {window}: raise topk")


def select_topk(
    q: Tensor,
    w: Tensor,
    k: Tensor,
    q_positions: Tensor,
    n_keys: int,
    topk: int,
    n_sink: int = 4,
    window: int = 64,
    query_block: int = 128,
    key_block: int = 16384,  # one torch.topk per row up to 16K keys: 12 % faster at 16K than 8192-key tiles
) -> Tensor:
    """Indices (B, T, topk) int64 of the keys each query attends to; -1 marks unused slots (t + 1 < topk).

    k is the indexer key cache (B, >= n_keys, d_I). Sinks (positions < n_sink) and the local window
    (positions t - window < s <= t) are always selected. Keys are scored one (query_block x key_block) tile at
    a time and merged into a running top-k per query, so memory is O(query_block * (key_block + topk)) however
    long the context; queries that see at most topk keys take them all, unscored. Slot order is unspecified.
    """
    check_topk_holds_forced(topk, n_sink, window)
    batch, seq_len = q.shape[:2]
    key_positions = torch.arange(n_keys, device=k.device)
    selected = torch.full((batch, seq_len, topk), -1, dtype=torch.long, device=q.device)
    for t0 in range(0, seq_len, query_block):
        rows = slice(t0, t0 + query_block)
        q_pos = q_positions[rows]
        keys_seen = min(n_keys, int(q_pos.max()) + 1)  # keys after the block's last query are all future
        if keys_seen <= topk:  # every query selects all its past keys
            past = key_positions[None, :keys_seen] <= q_pos[:, None]
            selected[:, rows, :keys_seen] = key_positions[:keys_seen].where(past, -1)
            continue
        best = best_idx = None
        for s0 in range(0, keys_seen, key_block):
            k_pos = key_positions[s0 : min(s0 + key_block, keys_seen)]
            scores = _selection_scores(q[:, rows], w[:, rows], k[:, s0 : s0 + len(k_pos)], q_pos, k_pos)
            past = k_pos[None, :] <= q_pos[:, None]
            sink_or_window = (k_pos[None, :] < n_sink) | (k_pos[None, :] > q_pos[:, None] - window)
            scores.masked_fill_(past & sink_or_window, float("inf"))
            tile_idx = k_pos.expand_as(scores)
            if best is not None:  # one top-k over (running set + tile) merges the tile into the set
                scores, tile_idx = torch.cat((best, scores), dim=-1), torch.cat((best_idx, tile_idx), dim=-1)
            if scores.shape[-1] <= topk:
                best, best_idx = scores, tile_idx
                continue
            best, pick = scores.topk(topk, dim=-1, sorted=False)  # unsorted: 2-4x faster on CPU
            best_idx = tile_idx.gather(-1, pick)
        width = best.shape[-1]
        selected[:, rows, :width] = best_idx.masked_fill(best == float("-inf"), -1)
    return selected


def union_of_selections(indices: Tensor, n_keys: int) -> tuple[Tensor, Tensor]:
    """indices (T, k) of a block of queries -> keys (u,), every key some query chose, ascending, and
    bias (T, u): 0 where that query chose that key, -inf elsewhere; -1 slots choose nothing."""
    slot = indices.masked_fill(indices < 0, n_keys)  # -1 slots land in a spare key
    chosen = torch.zeros(n_keys + 1, dtype=torch.bool, device=indices.device)
    chosen[slot] = True
    chosen[n_keys] = False
    keys = chosen.nonzero().squeeze(1)
    column = chosen.cumsum(0).sub_(1)[slot].masked_fill_(indices < 0, len(keys))  # spare column for -1
    bias = torch.full((len(indices), len(keys) + 1), float("-inf"), device=indices.device)
    return keys, bias.scatter_(1, column, 0.0)[:, :-1]


def sparse_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, scale: float, block: int = 64
) -> Tensor:
    """Softmax attention of each query over its selected keys only; out (B, Hq, T, d) in q's dtype.

    indices (B, T, k): one selection for every head; (B, sets, T, k): set s serves kv heads
    s * Hkv / sets ... (s + 1) * Hkv / sets - 1 and their query heads.

    Queries go in blocks; a block gathers the union of its queries' selections once and each
    query attends to its own keys within it (a 0 / -inf bias). Neighbouring queries choose mostly the same
    keys (on the default model a block of 32 gathers about 2k keys for top-k = k), so each gathered row
    serves every query of the block that chose it and all G query heads of its kv group, in two matrix
    products: per-query gathers of k rows ran 25x slower than dense SDPA at 8K. Everything runs in the
    cache's dtype, as HF's eager attention does (bf16 products are 4x faster than fp32 on CPUs with
    AVX512-BF16; the softmax accumulates in fp32 either way). Every query needs at least one valid index.
    Blocks of 64 queries: a wider union costs less than the per-block work smaller blocks repeat.
    """
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv_heads, n_keys = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    sets = indices if indices.dim() == 4 else indices[:, None]
    kv_per_set = n_kv_heads // sets.shape[1]
    out = torch.empty_like(q)
    for b in range(batch):
        for s in range(sets.shape[1]):
            kv = slice(s * kv_per_set, (s + 1) * kv_per_set)
            q_groups = q[b].view(n_kv_heads, group, seq_len, head_dim)[kv]
            out_groups = out[b].view(n_kv_heads, group, seq_len, head_dim)[kv]
            for t0 in range(0, seq_len, block):
                keys, bias = union_of_selections(sets[b, s, t0 : t0 + block], n_keys)
                n_q = bias.shape[0]
                k_sel = k_cache[b, kv].index_select(1, keys)  # (Hkv per set, u, d)
                v_sel = v_cache[b, kv].index_select(1, keys)
                q_blk = q_groups[:, :, t0 : t0 + n_q].flatten(1, 2) * scale  # (Hkv per set, G * Tb, d)
                scores = torch.bmm(q_blk, k_sel.transpose(1, 2))  # (Hkv per set, G * Tb, u)
                scores.view(kv_per_set, group, n_q, -1).add_(bias.to(scores.dtype))  # 0 / -inf: exact in bf16
                out_blk = torch.bmm(scores.softmax(dim=-1), v_sel)
                out_groups[:, :, t0 : t0 + n_q] = out_blk.view(kv_per_set, group, n_q, head_dim).to(q.dtype)
    return out


def masked_dense_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, scale: float
) -> Tensor:
    """Test oracle for sparse_attention: dense fp32 scores masked to the selected keys. O(T x S) memory."""
    batch, n_heads, seq_len, _ = q.shape
    n_keys = k_cache.shape[2]
    group = n_heads // k_cache.shape[1]
    sets = indices if indices.dim() == 4 else indices[:, None]
    allowed = torch.zeros(*sets.shape[:3], n_keys + 1, dtype=torch.bool, device=q.device)
    allowed.scatter_(-1, sets.masked_fill(sets < 0, n_keys), True)  # -1 slots land in a spare column
    allowed = allowed[..., :n_keys].repeat_interleave(n_heads // sets.shape[1], dim=1)  # per query head
    k = k_cache.float().repeat_interleave(group, dim=1)
    v = v_cache.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)
