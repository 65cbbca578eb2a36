"""Lightning indexer (DeepSeek Sparse Attention) and its key cache.

One indexer per attention layer scores every (query t, key s) pair cheaply:
    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])
and each query attends only to its top-k keys (the selection kernels: dsarag_kernels/, the PyTorch one in
torch_dsa.py). Shapes: x (B, T, D); q (B, T, H_I, d_I); w (B, T, H_I);
k (B, S, d_I), one key per token shared by all index heads; positions are 1-D (T,) and key s of a cache sits
at position s. One selection serves every attention head, or, with index sets, one per group of kv heads:
w (B, T, sets, H_I) and indices (B, sets, T, k).
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dsarag.kernels import torch_dsa

ROPE_LAYOUT = "half-split"  # NeoX / HF `rotate_half`: dims i and i + rope_dims/2 form a rotation pair


def rope_cos_sin(positions: Tensor, rope_dims: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, rope_dims) in float32 for the half-split layout."""
    angles = positions.to(torch.float32)[:, None] * torch_dsa.rope_inverse_frequencies(
        rope_dims, base, positions.device
    )
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] dims of x (half-split layout); the other dims carry no position."""
    rope_dims = cos.shape[-1]
    rotated, rest = x[..., :rope_dims].float(), x[..., rope_dims:]
    x1, x2 = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


class IndexKeyCache(nn.Module):
    """Preallocated indexer keys (B, S_max, d_I) beside the KV cache; `update` returns the filled prefix.

    Only sparse steps compute index keys (dense ones skip the indexer), so the cache tracks on the host how far
    its keys are current: `valid_until`. New tokens sit at consecutive positions ending at n_keys - 1."""

    def __init__(self, max_batch_size: int, max_seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer(
            "k_cache", torch.zeros(max_batch_size, max_seq_len, head_dim, dtype=dtype), persistent=False
        )
        self.valid_until = 0

    def update(self, input_pos: Tensor, k: Tensor, n_keys: int | None) -> Tensor:
        """Write k at input_pos; return the first n_keys positions (as `KVCache.update`), or the whole cache
        when n_keys is None (a captured decode step, whose caller calls `record`). Refuses to return positions
        a dense step wrote without index keys: a sparse step would rank stale or zero keys."""
        batch = k.shape[0]
        if n_keys is None:
            self.k_cache[:batch, input_pos] = k
            return self.k_cache[:batch]
        self.record(n_keys - k.shape[1], n_keys)
        self.k_cache[:batch, input_pos] = k
        return self.k_cache[:batch, :n_keys]

    def record(self, first_new: int, n_keys: int) -> None:
        """A sparse step writes index keys for positions first_new ... n_keys - 1 and reads all before them."""
        if first_new > self.valid_until:
            raise RuntimeError(
                f"index keys of positions {self.valid_until}-{first_new - 1} are missing (written by a dense "
                "step): run a whole generation in one attention mode, or prefill it again in sparse mode"
            )
        self.valid_until = max(self.valid_until, n_keys)

    def invalidate_from(self, position: int) -> None:
        """A dense step wrote K/V from `position` on without index keys."""
        self.valid_until = min(self.valid_until, position)


class LightningIndexer(nn.Module):
    """Index queries, weights and keys from a layer's normed hidden state (DeepSeek-V3.2 Indexer, small)."""

    def __init__(
        self, dim: int, rope_base: float, n_heads: int = 4, head_dim: int = 64, index_sets: int = 1
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_base = n_heads, head_dim, float(rope_base)
        self.rope_dims = head_dim // 2
        # index_sets > 1: one selection per group of kv heads (the option of one set per kv group). The sets
        # share the index queries and keys and differ only in the head weights, so they cost one extra
        # weighted sum each, not another set of dot products.
        self.index_sets = index_sets
        self.topk_scale = 1.0  # this layer's multiplier of a DSA top-k (a checkpoint's layer_topk_scales)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.weights_proj = nn.Linear(dim, index_sets * n_heads, bias=False)

    def config(self) -> dict:
        """What a checkpoint must record: a different RoPE layout passes at 2K and fails at 16K."""
        return {
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "rope_dims": self.rope_dims,
            "layout": ROPE_LAYOUT,
            "rope_base": self.rope_base,
            "index_sets": self.index_sets,
        }

    def check_config(self, recorded: dict) -> None:
        """Raise ValueError if a checkpoint's recorded config differs from this indexer's."""
        mine = self.config()
        recorded = {"index_sets": 1, **recorded}  # checkpoints from before index sets hold one
        wrong = {key: (recorded.get(key), mine[key]) for key in mine if recorded.get(key) != mine[key]}
        if wrong:
            details = ", ".join(
                f"{key}: checkpoint {got!r} vs model {want!r}" for key, (got, want) in wrong.items()
            )
            raise ValueError(
                f"indexer checkpoint does not match this indexer ({details}); retrain or re-export it"
            )

    @property
    def weight_scale(self) -> float:
        """H_I^-1/2 * d_I^-1/2, the scale of the head weights w (docs/design.md)."""
        return (self.n_heads * self.head_dim) ** -0.5

    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D), positions (T,) -> q (B, T, H_I, d_I), w (B, T, H_I), k (B, T, d_I).

        With index_sets > 1, w is (B, T, index_sets, H_I): one set of head weights per selection."""
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        w = self.weights_proj(x) * self.weight_scale
        if self.index_sets > 1:
            w = w.view(batch, seq_len, self.index_sets, self.n_heads)
        cos, sin = rope_cos_sin(positions, self.rope_dims, self.rope_base)
        q = apply_partial_rope(q, cos[:, None], sin[:, None])
        k = apply_partial_rope(k, cos, sin)
        return q, w, k

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Index scores of x against itself, (B, T, T) (one set) or (B, sets, T, T); where T x T fits."""
        q, w, k = self.project(x, positions)
        return stack_sets(w, lambda w_set: torch_dsa.index_scores(q, w_set, k, positions, positions))


def stack_sets(w: Tensor, per_set: Callable[[Tensor], Tensor]) -> Tensor:
    """per_set(w of one set, (B, T, H_I)) for one set; with index sets (w (B, T, sets, H_I)) the results of
    every set stacked on dim 1, where the kv heads are in the caches: (B, sets, ...)."""
    if w.dim() == 3:
        return per_set(w)
    return torch.stack([per_set(w[:, :, s]) for s in range(w.shape[2])], dim=1)


def select_topk_sets(
    q: Tensor,
    w: Tensor,
    k: Tensor,
    q_positions: Tensor,
    n_keys: int | None,
    topk: int,
    n_sink: int = 4,
    window: int = 64,
    select: Callable[..., Tensor] = torch_dsa.select_topk,
) -> Tensor:
    """`select` (an AttentionBackend's select_topk, by default the PyTorch path's) for each index set: (B, T, topk), or
    (B, sets, T, topk) when w has a set dimension."""
    return stack_sets(w, lambda w_set: select(q, w_set, k, q_positions, n_keys, topk, n_sink, window))
