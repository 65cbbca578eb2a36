"""DeepSeek Sparse Attention: each query attends only to the keys its lightning indexer selected.

Shapes: q (B, Hq, T, d); KV cache (B, Hkv, S, d) with key s at position s; indices (B, T, topk), one set per
query shared by all heads, -1 for unused slots. GQA as in HF `repeat_kv`: kv head h serves query heads
h * G ... h * G + G - 1, G = Hq / Hkv.
"""

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from dsarag.indexer_model.indexer import LightningIndexer, select_topk, select_topk_sets, stack_sets


@dataclass(frozen=True)
class DSAConfig:
    topk: int = 2048
    n_sink: int = 4  # attention sinks: dropping them collapses quality just past k tokens
    window: int = 64  # local window always attended
    dense_threshold: int = 2048  # shorter contexts run exact dense attention
    # "triton" (GPU kernels), "native" (compiled C++ CPU kernels, dsarag_kernels/cpu_dsa.py), "torch" (PyTorch path);
    # "auto": triton on CUDA, native on the CPU where a C++ compiler builds it, else torch
    kernels: str = "auto"
    fp8_indexer: bool = False  # Triton path only: float8 e4m3 index queries and keys (Hopper)
    dense_layers: tuple[int, ...] = ()  # layers kept dense (their indexers recall least: docs/dsa-quality.md)
    per_layer_topk: bool = True  # spread topk over the layers by the checkpoint's scales (layer_budget.py)
    # Decode steps select top-k too. False: the prefill alone is sparse and each new token attends to the whole
    # cache, exactly; `auto` does so while no DSA decode step is measured faster than a dense one.
    sparse_decode: bool = True
    # The prompt's last `dense_tail` positions attend to every earlier key, exactly. They hold the question and the
    # start of the answer, whose attention retrieves from the whole context; they read dense_tail x (L - k) more
    # keys than a sparse prefill (generate.prefill runs them). 0: every prompt position selects.
    dense_tail: int = 0

    def attending_densely(self) -> "DSAConfig":
        """This config with every query attending to all its keys; the indexer still writes its keys, so later
        sparse steps can rank them."""
        return replace(self, dense_threshold=sys.maxsize)

    def for_layer(self, topk_scale: float) -> "DSAConfig":
        """The config of a layer whose indexer keeps `topk_scale` times k (its share of a per-layer budget)."""
        if not self.per_layer_topk or topk_scale == 1.0:
            return self
        return replace(self, topk=max(self.n_sink + self.window, round(self.topk * topk_scale)))

    def runs_dense(self, n_keys: int) -> bool:
        """Below the threshold, or with k covering every key, sparse attention would equal dense anyway."""
        return n_keys <= self.topk or n_keys < self.dense_threshold


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

    The CPU path. Queries go in blocks; a block gathers the union of its queries' selections once and each
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


def _triton_dsa(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    idx_q: Tensor,
    idx_w: Tensor,
    idx_k_cache: Tensor,
    q_start: int | Tensor,
    n_keys: int,
    cfg: DSAConfig,
    scale: float,
) -> Tensor:
    """The GPU path (dsarag_kernels/): fused index scores + top-k, then gather attention."""
    from dsarag.kernels.indexer import select_topk as select_topk_triton
    from dsarag.kernels.sparse_attention import sparse_attention as sparse_attention_triton

    indices = stack_sets(idx_w, lambda w_set: select_topk_triton(
        idx_q, w_set, idx_k_cache, q_start, n_keys, cfg.topk, cfg.n_sink, cfg.window, fp8=cfg.fp8_indexer,
    ))  # fmt: skip
    return sparse_attention_triton(q, k_cache, v_cache, indices, scale)


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


def dense_attention(q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, whole_cache: bool = False) -> Tensor:
    """Causal softmax attention. q (B, H, T, D) at positions `input_pos`; k, v (B, H_kv, S, D) at 0..S-1.

    whole_cache: one query over a preallocated cache whose keys past input_pos are not written yet."""
    batch, n_head, q_len, head_dim = q.shape
    n_kv_head, kv_len = k.shape[1], k.shape[2]
    if q_len == 1:
        # One query sees every cached key: fold each kv group's heads into the query axis (25x faster on CPU
        # than enable_gqa, which takes the slow path for a single query).
        if whole_cache and q.is_cuda:  # split across the keys: SDPA with a mask ran 1.5x slower at 128K
            from dsarag.kernels.sparse_attention import dense_attention_decode

            return dense_attention_decode(q, k, v, input_pos, head_dim**-0.5)
        grouped = q.view(batch, n_kv_head, n_head // n_kv_head, head_dim)
        mask = (torch.arange(kv_len, device=q.device) <= input_pos)[None] if whole_cache else None
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).view(batch, n_head, 1, head_dim)
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = input_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _native_cpu(cfg: DSAConfig) -> bool:
    """Whether the CPU path runs the compiled kernels: under "auto" where they build, always under "native"."""
    if cfg.kernels not in ("auto", "native"):
        return False
    from dsarag.kernels.cpu_dsa import native_library

    if native_library() is None:
        if cfg.kernels == "native":
            raise RuntimeError("DSAConfig(kernels='native') needs a C++ compiler (g++ or $CXX) to build them")
        return False
    return True


def project_index(
    indexer: LightningIndexer, x: Tensor, positions: Tensor, cfg: DSAConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """The indexer's q, w, k for the new tokens; on the CPU, a decode step's come from one compiled call."""
    if not x.is_cuda and _native_cpu(cfg):
        from dsarag.kernels import cpu_dsa

        if cpu_dsa.projects_natively(indexer, x):
            return cpu_dsa.index_projection(indexer, x, positions)
    return indexer.project(x, positions)


def dsa_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    idx_q: Tensor,
    idx_w: Tensor,
    idx_k_cache: Tensor,
    q_positions: Tensor,
    n_keys: int | None,
    cfg: DSAConfig,
    scale: float | None = None,
) -> Tensor:
    """DSA for one layer: indexer top-k then gather attention; exact dense when the context is short.

    idx_q (B, T, H_I, d_I) and idx_w (B, T, H_I), or (B, T, sets, H_I) for one selection per group of kv
    heads, come from LightningIndexer.project for the new tokens;
    idx_k_cache (B, S, d_I) holds the indexer keys of the first n_keys positions (the new tokens included).
    n_keys None: one decode token over the whole preallocated caches, its position read on the device (a
    step captured in a CUDA graph); the Triton kernels select among keys 0 ... q_positions[0] only.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if n_keys is None:
        return _triton_dsa(
            q, k_cache, v_cache, idx_q, idx_w, idx_k_cache, q_positions[:1], k_cache.shape[2], cfg, scale
        )
    if cfg.runs_dense(n_keys):
        return dense_attention(q, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys], q_positions)
    if cfg.kernels == "triton" or (cfg.kernels == "auto" and q.is_cuda):
        # New tokens sit at consecutive positions ending at n_keys - 1 (a prefill chunk or one decode step).
        return _triton_dsa(
            q, k_cache, v_cache, idx_q, idx_w, idx_k_cache, n_keys - q.shape[2], n_keys, cfg, scale
        )
    # Queries that see at most k keys select all of them: exact dense attention, no indexer needed.
    n_dense = int((q_positions < cfg.topk).sum())  # positions ascend
    if n_dense == q.shape[2]:
        return dense_attention(q, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys], q_positions)
    rows = slice(n_dense, None)
    select, attend = select_topk, sparse_attention
    if _native_cpu(cfg):
        from dsarag.kernels import cpu_dsa

        select, attend = cpu_dsa.select_topk, cpu_dsa.sparse_attention
    indices = select_topk_sets(
        idx_q[:, rows],
        idx_w[:, rows],
        idx_k_cache,
        q_positions[rows],
        n_keys,
        cfg.topk,
        cfg.n_sink,
        cfg.window,
        select,
    )
    out = attend(q[:, :, rows], k_cache, v_cache, indices, scale)
    if n_dense == 0:
        return out
    n_seen = int(q_positions[n_dense - 1]) + 1
    first = dense_attention(
        q[:, :, :n_dense], k_cache[:, :, :n_seen], v_cache[:, :, :n_seen], q_positions[:n_dense]
    )
    return torch.cat((first, out), dim=2)
