"""DeepSeek Sparse Attention: each query attends only to the keys its lightning indexer selected.

The steps are the model's maths; the kernels that run them come from the model's `AttentionBackend`
(dsarag_kernels/backend.py), resolved once when the model is loaded.

Shapes: q (B, Hq, T, d); KV cache (B, Hkv, S, d) with key s at position s; indices (B, T, topk), one set per
query shared by all heads, -1 for unused slots. GQA as in HF `repeat_kv`: kv head h serves query heads
h * G ... h * G + G - 1, G = Hq / Hkv.
"""

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from dsarag.indexer_model.indexer import select_topk_sets
from dsarag.kernels.backend import TORCH, AttentionBackend


@dataclass(frozen=True)
class DSAConfig:
    topk: int = 2048
    n_sink: int = 4  # attention sinks: dropping them collapses quality just past k tokens
    window: int = 64  # local window always attended
    dense_threshold: int = 2048  # shorter contexts run exact dense attention
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


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    input_pos: Tensor,
    whole_cache: bool = False,
    backend: AttentionBackend = TORCH,
) -> Tensor:
    """Causal softmax attention. q (B, H, T, D) at positions `input_pos`; k, v (B, H_kv, S, D) at 0..S-1.

    whole_cache: one query over a preallocated cache whose keys past input_pos are not written yet."""
    batch, n_head, q_len, head_dim = q.shape
    n_kv_head, kv_len = k.shape[1], k.shape[2]
    if q_len == 1:
        if whole_cache and backend.dense_decode is not None:  # split across the keys: faster than masked SDPA
            return backend.dense_decode(q, k, v, input_pos, head_dim**-0.5)
        # One query sees every cached key: fold each kv group's heads into the query axis (25x faster on CPU
        # than enable_gqa, which takes the slow path for a single query).
        grouped = q.view(batch, n_kv_head, n_head // n_kv_head, head_dim)
        mask = (torch.arange(kv_len, device=q.device) <= input_pos)[None] if whole_cache else None
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).view(batch, n_head, 1, head_dim)
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = input_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


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
    backend: AttentionBackend = TORCH,
    scale: float | None = None,
) -> Tensor:
    """DSA for one layer: indexer top-k then gather attention; exact dense when the context is short.

    idx_q (B, T, H_I, d_I) and idx_w (B, T, H_I), or (B, T, sets, H_I) for one selection per group of kv
    heads, come from the indexer's projection of the new tokens;
    idx_k_cache (B, S, d_I) holds the indexer keys of the first n_keys positions (the new tokens included).
    n_keys None: one decode token over the whole preallocated caches, its position read on the device (a
    step captured in a CUDA graph, which only Triton backends run); it selects among keys 0 ... q_positions[0].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if n_keys is not None and cfg.runs_dense(n_keys):
        return dense_attention(q, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys], q_positions)
    if n_keys is None and not backend.reads_position_on_device:
        raise RuntimeError(f"the {backend.name} kernels cannot run a decode step captured in a CUDA graph")
    # Queries that see at most k keys select all of them: exact dense attention, no indexer needed. Triton takes
    # them inside its kernels, and a captured step cannot count them on the host.
    n_dense = (
        0 if backend.reads_position_on_device else int((q_positions < cfg.topk).sum())
    )  # positions ascend
    if n_dense == q.shape[2]:
        return dense_attention(q, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys], q_positions)
    rows = slice(n_dense, None)
    if backend.selection is not None and n_keys is not None:
        indices = backend.selection(
            q[:, :, rows], k_cache[:, :, :n_keys], q_positions[rows], cfg.topk, cfg.n_sink, cfg.window
        )
    else:
        indices = select_topk_sets(
            idx_q[:, rows],
            idx_w[:, rows],
            idx_k_cache,
            q_positions[rows],
            n_keys,
            cfg.topk,
            cfg.n_sink,
            cfg.window,
            backend.select_topk,
        )
    out = backend.sparse_attention(q[:, :, rows], k_cache, v_cache, indices, scale)
    if n_dense == 0:
        return out
    n_seen = int(q_positions[n_dense - 1]) + 1
    first = dense_attention(
        q[:, :, :n_dense], k_cache[:, :, :n_seen], v_cache[:, :, :n_seen], q_positions[:n_dense]
    )
    return torch.cat((first, out), dim=2)
