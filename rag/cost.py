"""The cost meter: what an answer costs with DeepSeek Sparse Attention against dense attention.

Analytic model (docs/design.md, "Cost model"; per layer, H query heads of dim d, H_kv kv heads, H_I index heads of
dim d_I; the query at context position t sees t + 1 keys, itself included):
    dense attention FLOPs   = 4·H·d · Σ_t (t + 1)
    sparse attention FLOPs  = 4·H·d · Σ_t min(t + 1, k)  +  2·H_I·d_I · Σ_{t ≥ k} (t + 1)    (indexer scores;
                              a query that sees at most k keys attends to all of them and scores none)
    linear FLOPs            = 2 · (weights touched per token) · tokens, plus the indexer's projections (sparse)
    decode bytes per token  = weights + KV bytes/token · keys read + index-key bytes/token · (t + 1) (sparse, t ≥ k)
Time comes from a roofline of the GPU (max of FLOPs / peak and bytes / bandwidth) when nothing was measured,
and dollars from the GPU price per hour (default $2, as DeepSeek's published curve).
"""

from dataclasses import asdict, dataclass

from dsarag.indexer_model.model import ModelArgs, Transformer


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a forward pass depends on."""

    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    dim: int
    intermediate_size: int
    vocab_size: int
    index_heads: float = 4  # per layer; the mean where layers differ (a hard layer may have more)
    index_dim: float = 64  # per layer; the mean where layers differ
    bytes_per_value: float = 2  # bf16 weights, KV and index keys
    # Architectures other than GQA + SwiGLU (a served DeepSeek-V3.2: MLA and mixture-of-experts) give these:
    attention_dim: float | None = None  # per head and key, (q·k dims + p·v dims) / 2; default head_dim
    # Cached values per token and layer; default 2 · kv heads · head_dim.
    kv_values_per_token: int | None = None
    active_layer_weights: float | None = None  # parameters of one block a token touches (its experts only)
    active_indexer_weights: float | None = None

    @classmethod
    def from_args(cls, args: ModelArgs, index_heads: float = 4, index_dim: float = 64) -> "ModelShape":
        return cls(
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_kv_head=args.n_kv_head,
            head_dim=args.head_dim,
            dim=args.dim,
            intermediate_size=args.intermediate_size,
            vocab_size=args.vocab_size,
            index_heads=index_heads,
            index_dim=index_dim,
        )

    @classmethod
    def of(cls, model: Transformer) -> "ModelShape":
        """The shape of a loaded model, with its attached indexers' mean head count and dim."""
        indexers = [layer.attention.indexer for layer in model.layers if layer.attention.indexer is not None]
        if not indexers:
            return cls.from_args(model.args)
        # Means over layers, the heads chosen so that heads x dim is the mean of each layer's: that product is
        # what an index score costs per key, and the dim alone what a cached index key holds.
        dims = sum(indexer.head_dim for indexer in indexers) / len(indexers)
        heads_x_dims = sum(indexer.n_heads * indexer.head_dim for indexer in indexers) / len(indexers)
        return cls.from_args(model.args, heads_x_dims / dims, dims)

    @property
    def layer_weights(self) -> float:
        """Parameters of one block touched per token: q, k, v, o projections and the SwiGLU MLP."""
        if self.active_layer_weights is not None:
            return self.active_layer_weights
        attention = self.dim * self.head_dim * (2 * self.n_head + 2 * self.n_kv_head)
        return attention + 3 * self.dim * self.intermediate_size

    @property
    def indexer_weights(self) -> float:
        """Parameters of one lightning indexer: index queries, one key, per-head weights."""
        if self.active_indexer_weights is not None:
            return self.active_indexer_weights
        return self.dim * (self.index_heads * self.index_dim + self.index_dim + self.index_heads)

    @property
    def attention_flops_per_key(self) -> float:
        """One query against one key, all heads: q·k and p·v, a multiply-add each."""
        return 4 * self.n_head * (self.attention_dim or self.head_dim)

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token in one layer."""
        values = self.kv_values_per_token or 2 * self.n_kv_head * self.head_dim
        return values * self.bytes_per_value

    @property
    def index_key_bytes_per_token(self) -> int:
        return self.index_dim * self.bytes_per_value


@dataclass(frozen=True)
class GpuSpec:
    """Roofline and price of the accelerator the $ figures assume (H800-class by default)."""

    name: str = "H800"
    tflops: float = 989.0  # dense bf16
    bandwidth_tbs: float = 3.35
    price_per_hour: float = 2.0

    def seconds(self, flops: float, bytes_moved: float) -> float:
        return max(flops / (self.tflops * 1e12), bytes_moved / (self.bandwidth_tbs * 1e12))

    def dollars(self, seconds: float) -> float:
        return seconds * self.price_per_hour / 3600.0


def keys_seen(start: int, n_tokens: int, topk: int | None) -> int:
    """Σ over positions t = start … start + n_tokens - 1 of the keys one query attends: t + 1, or min(t + 1, k)."""
    end = start + n_tokens
    if topk is None or topk >= end:
        return (end * (end + 1) - start * (start + 1)) // 2
    full = max(0, min(end, topk) - start)  # positions whose t + 1 <= k see every key
    below = (start + full) * (start + full + 1) // 2 - start * (start + 1) // 2
    return below + (n_tokens - full) * topk


def keys_scored(start: int, n_tokens: int, topk: int) -> int:
    """Σ of the keys the indexer scores over positions start … start + n_tokens - 1: only queries that see more
    than k keys score them; one that sees at most k attends to all of them without index scores
    (indexer_model/dsa.py dsa_attention), so below k a sparse run costs only the index keys' projection."""
    first = max(start, topk)
    end = start + n_tokens
    return keys_seen(first, end - first, None) if end > first else 0


@dataclass(frozen=True)
class PhaseCost:
    flops: float
    bytes_moved: float
    attention_flops: float
    indexer_flops: float

    def __add__(self, other: "PhaseCost") -> "PhaseCost":
        return PhaseCost(*(a + b for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))


def phase_cost(
    shape: ModelShape, start: int, n_tokens: int, topk: int | None, logits_tokens: int
) -> PhaseCost:
    """FLOPs and bytes of running n_tokens new tokens at positions start … (topk None = dense attention).

    Weights are read once per forward pass; the KV cache (and, sparse, the index keys) once per new token for
    the keys it reads — the decode picture; a prefill is compute-bound and its bytes matter little.
    """
    sparse = topk is not None
    per_layer_attention = shape.attention_flops_per_key * keys_seen(start, n_tokens, topk)
    scored = keys_scored(start, n_tokens, topk) if sparse else 0
    per_layer_indexer = 2 * shape.index_heads * shape.index_dim * scored
    linear_weights = shape.layer_weights + (shape.indexer_weights if sparse else 0)
    linear = 2 * shape.n_layer * linear_weights * n_tokens + 2 * shape.dim * shape.vocab_size * logits_tokens
    weight_bytes = (shape.n_layer * linear_weights + shape.dim * shape.vocab_size) * shape.bytes_per_value
    cache_bytes = shape.kv_bytes_per_token * keys_seen(start, n_tokens, topk)
    cache_bytes += shape.index_key_bytes_per_token * scored
    return PhaseCost(
        flops=float(shape.n_layer * (per_layer_attention + per_layer_indexer) + linear),
        bytes_moved=float(weight_bytes + shape.n_layer * cache_bytes),
        attention_flops=float(shape.n_layer * per_layer_attention),
        indexer_flops=float(shape.n_layer * per_layer_indexer),
    )


def prefill_cost(shape: ModelShape, prompt_tokens: int, topk: int | None, dense_tail: int = 0) -> PhaseCost:
    """The prompt in one pass; logits only for its last position. Sparse with `dense_tail`: the prompt's last
    positions attend densely, computing no index scores but still projecting their index keys
    (indexer_model/generate.py prefill)."""
    tail = min(dense_tail, prompt_tokens) if topk is not None else 0
    if not tail:
        return phase_cost(shape, 0, prompt_tokens, topk, logits_tokens=1)
    body = phase_cost(shape, 0, prompt_tokens - tail, topk, logits_tokens=0)
    projection = PhaseCost(2 * shape.n_layer * shape.indexer_weights * tail, 0.0, 0.0, 0.0)
    return body + phase_cost(shape, prompt_tokens - tail, tail, None, logits_tokens=1) + projection


def decode_cost(shape: ModelShape, prompt_tokens: int, new_tokens: int, topk: int | None) -> PhaseCost:
    """One forward pass per generated token after the first (which comes out of the prefill)."""
    total = PhaseCost(0.0, 0.0, 0.0, 0.0)
    for position in range(prompt_tokens, prompt_tokens + max(0, new_tokens - 1)):
        total = total + phase_cost(shape, position, 1, topk, logits_tokens=1)
    return total


def dollars_per_million_tokens(
    shape: ModelShape, position: int, phase: str, topk: int | None, gpu: GpuSpec
) -> float:
    """Cost of one token at context `position`, scaled to a million (DeepSeek-V3.2's Figure 3 axes).

    Prefill tokens are batched (compute-bound: FLOPs only); a decode token pays the weights and the cache reads
    of its own forward pass (bytes and FLOPs, roofline)."""
    cost = phase_cost(shape, position, 1, topk, logits_tokens=0 if phase == "prefill" else 1)
    if phase == "prefill":
        seconds = cost.flops / (gpu.tflops * 1e12)
    elif phase == "decode":
        seconds = gpu.seconds(cost.flops, cost.bytes_moved)
    else:
        raise ValueError(f"phase {phase!r}: use prefill or decode")
    return gpu.dollars(seconds) * 1e6


def meter_answer(
    shape: ModelShape,
    prompt_tokens: int,
    new_tokens: int,
    topk: int,
    measured: dict[str, float],
    mode_ran: str,
    gpu: GpuSpec,
    sparse_decode: bool = True,
    dense_tail: int = 0,
) -> dict:
    """Sparse against dense for one answer: analytic FLOPs, bytes, roofline ms and $, plus what was measured.

    `measured` holds prefill_s and decode_s of the mode that ran (`mode_ran`: "dense" or "sparse").
    sparse_decode False: the sparse mode's decode steps attend densely (a sparse prefill only, as
    `--attention auto` answers), so they cost what dense ones do; `dense_tail`: so do the sparse prefill's last
    positions.
    """
    modes = {}
    for mode, mode_topk in (("dense", None), ("sparse", topk)):
        prefill = prefill_cost(shape, prompt_tokens, mode_topk, dense_tail)
        decode = decode_cost(shape, prompt_tokens, new_tokens, mode_topk if sparse_decode else None)
        seconds = gpu.seconds(prefill.flops, 0) + gpu.seconds(decode.flops, decode.bytes_moved)
        modes[mode] = {
            "prefill_flops": prefill.flops,
            "decode_flops": decode.flops,
            "decode_bytes": decode.bytes_moved,
            "attention_flops": prefill.attention_flops + decode.attention_flops,
            "indexer_flops": prefill.indexer_flops + decode.indexer_flops,
            "roofline_ms": seconds * 1e3,
            "dollars": gpu.dollars(seconds),
        }
    dense, sparse = modes["dense"], modes["sparse"]
    total = {mode: values["prefill_flops"] + values["decode_flops"] for mode, values in modes.items()}
    measured_s = measured.get("prefill_s", 0.0) + measured.get("decode_s", 0.0)
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "topk": topk,
        "mode_ran": mode_ran,
        "sparse_decode": sparse_decode,
        "dense_tail": dense_tail,
        "gpu": asdict(gpu),
        "dense": dense,
        "sparse": sparse,
        "flops_saving": 1.0 - total["sparse"] / total["dense"],
        "decode_bytes_saving": 1.0 - sparse["decode_bytes"] / dense["decode_bytes"]
        if dense["decode_bytes"]
        else 0.0,
        "measured": {
            **{key: round(value, 4) for key, value in measured.items()},
            "tokens_per_s": round(new_tokens / measured["decode_s"], 2) if measured.get("decode_s") else None,
            "dollars_at_price": gpu.dollars(measured_s),
        },
    }


def peak_memory_mb(device: str) -> float:
    """GPU: the allocator's peak since the last reset; CPU: the process's resident high-water mark."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_overlap(a: str, b: str) -> float:
    """F1 of the two answers' whitespace tokens (1.0 = same words)."""
    left, right = a.lower().split(), b.lower().split()
    if not left or not right:
        return float(left == right)
    common = sum(min(left.count(word), right.count(word)) for word in set(left))
    if not common:
        return 0.0
    precision, recall = common / len(left), common / len(right)
    return 2 * precision * recall / (precision + recall)
