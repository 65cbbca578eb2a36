"""The decoder-only transformer of the Qwen2 and Llama families (gpt-fast style).

Attention is one call site: dense attention, or DSA (dsa.py) when a DSA config is given and trained indexers are
attached. Which kernels run is the model's `backend` (dsarag_kernels/backend.py), set once by `use_backend`
(the loader resolves it for the device and dtype; a model built otherwise resolves it on its first call). Positions (`input_pos`) are passed explicitly and the KV
cache is a small preallocated module of its own.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsarag.indexer_model.dsa import DSAConfig, dense_attention, dsa_attention
from dsarag.indexer_model.indexer import IndexKeyCache, LightningIndexer, rope_cos_sin
from dsarag.kernels.backend import TORCH, AttentionBackend, each_linear, gated_linear, resolve_backend

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    rope_base: float
    norm_eps: float
    max_seq_len: int
    qkv_bias: bool
    tie_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """From a Hugging Face config.json; raises ValueError for what this code does not implement."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"RoPE scaling {rope_type!r} is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config['hidden_act']!r} is not supported (only silu)")
        n_head = config["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            intermediate_size=config["intermediate_size"],
            rope_base=float(config.get("rope_theta") or rope.get("rope_theta") or 10_000.0),
            norm_eps=config.get("rms_norm_eps", 1e-6),
            max_seq_len=config.get("max_position_embeddings", 4096),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


class Linear(nn.Linear):
    """nn.Linear through the backend's product (`AttentionBackend.product`): on a CPU a decode step's weights are
    read by one compiled matrix-vector product over an int8 copy (or the bf16 weights on AVX512-BF16), two to four
    times PyTorch's speed there, and they are most of a decode step."""

    product = staticmethod(F.linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.product(x, self.weight, self.bias)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """rms_norm, or the backend's compiled version of it for a decode step (`AttentionBackend.rms_norm`)."""

    norm = staticmethod(rms_norm)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x, self.weight, self.eps)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate x (B, T, H, D) by position; the maths runs in float32."""
    cos, sin = (t[None, :, None, :] for t in rope)
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values (B, H_kv, S_max, D); `update` writes positions and returns the filled prefix."""

    def __init__(
        self, max_batch_size: int, max_seq_len: int, n_kv_head: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, n_keys: int | None) -> tuple[Tensor, Tensor]:
        """Write k, v at input_pos; return the first n_keys positions (the caller knows n_keys on the host, so
        no layer waits for the GPU to read input_pos back), or the whole cache when n_keys is None."""
        batch = k.shape[0]
        if n_keys is not None and k.shape[2] == 1:  # one token, at n_keys - 1: a slice copy costs less
            self.k_cache[:batch, :, n_keys - 1 : n_keys] = k
            self.v_cache[:batch, :, n_keys - 1 : n_keys] = v
        else:
            self.k_cache[:batch, :, input_pos] = k
            self.v_cache[:batch, :, input_pos] = v
        if n_keys is None:
            return self.k_cache[:batch], self.v_cache[:batch]
        return self.k_cache[:batch, :, :n_keys], self.v_cache[:batch, :, :n_keys]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_proj = Linear(args.dim, args.n_head * args.head_dim, bias=args.qkv_bias)
        self.k_proj = Linear(args.dim, args.n_kv_head * args.head_dim, bias=args.qkv_bias)
        self.v_proj = Linear(args.dim, args.n_kv_head * args.head_dim, bias=args.qkv_bias)
        self.o_proj = Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.indexer: LightningIndexer | None = None  # attached with a trained checkpoint (DSA)
        self.index_cache: IndexKeyCache | None = None
        self.backend = TORCH
        # (x, q_proj, k_proj, v_proj) -> q, k, v and apply_rope: the backend's (use_backend)
        self.qkv_product, self.rope = each_linear, apply_rope

    def use_backend(self, backend: AttentionBackend) -> None:
        """q, k and v in one product, the backend's; o_proj through its own."""
        self.backend = backend
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            linear.product = backend.linear  # the prefill's; a decode step runs qkv_product's stacked copies
        self.qkv_product = backend.joint_product([self.q_proj, self.k_proj, self.v_proj])
        self.o_proj.product = backend.product(self.o_proj.weight)
        self.rope = backend.rope(apply_rope)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, D), k and v (B, H_kv, T, D), with RoPE applied to q and k."""
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_product(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(batch, seq_len, self.n_head, self.head_dim)
        k = k.view(batch, seq_len, self.n_kv_head, self.head_dim)
        v = v.view(batch, seq_len, self.n_kv_head, self.head_dim)
        q, k = self.rope(q, rope), self.rope(k, rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        input_pos: Tensor,
        n_keys: int | None,
        dsa: DSAConfig | None = None,
    ) -> Tensor:
        """Dense attention, or DSA when `dsa` is given and an indexer is attached (x is the normed input).

        n_keys: cached positions after this call (input_pos[-1] + 1), known to the caller on the host; None
        for a decode step captured in a CUDA graph, which reads the whole cache and masks it by input_pos."""
        q, k, v = self.project(x, rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, n_keys)
        if self.indexer is None or dsa is None:
            if self.index_cache is not None and n_keys is not None:  # dense steps skip the indexer
                self.index_cache.invalidate_from(n_keys - x.shape[1])  # its keys go stale from here
            y = dense_attention(q, k, v, input_pos, whole_cache=n_keys is None, backend=self.backend)
        else:
            dsa = dsa.for_layer(self.indexer.topk_scale)
            idx_q, idx_w, idx_k = self.backend.project_index(self.indexer, x, input_pos)
            if self.index_cache is not None:
                idx_k = self.index_cache.update(input_pos, idx_k, n_keys)
            y = dsa_attention(q, k, v, idx_q, idx_w, idx_k, input_pos, n_keys, dsa, self.backend)
        return self.o_proj(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.dim, bias=False)
        # (x, gate_proj, up_proj) -> silu(gate) * up; the backend's (use_backend)
        self.gated_product = gated_linear

    def use_backend(self, backend: AttentionBackend) -> None:
        """The gate and up projections with their activation in one product, the backend's."""
        self.gate_proj.product = self.up_proj.product = backend.linear  # the prefill's
        self.gated_product = backend.gated_product(self.gate_proj, self.up_proj)
        self.down_proj.product = backend.product(self.down_proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gated_product(x, self.gate_proj, self.up_proj))


def layer_step(
    block: "Block", x: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor, n_keys: int | None
) -> Tensor:
    """A layer with dense attention, as `Block.dense_step` runs it where the backend has no compiled decode step."""
    return block.layer(x, rope, input_pos, n_keys)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        input_pos: Tensor,
        n_keys: int | None,
        dsa: DSAConfig | None = None,
    ) -> Tensor:
        if dsa is None:  # dense attention: the backend's step (use_backend), by default `layer`
            return self.dense_step(self, x, rope, input_pos, n_keys)
        return self.layer(x, rope, input_pos, n_keys, dsa)

    def layer(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        input_pos: Tensor,
        n_keys: int | None,
        dsa: DSAConfig | None = None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, n_keys, dsa)
        return h + self.feed_forward(self.ffn_norm(h))

    dense_step = staticmethod(layer_step)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # nn.Embedding's own init imports torch._dynamo on the meta device (weights.build_model, which assigns
        # the checkpoint over it): 2-3 s of every `dsarag ask`. Randomly built models still get its init.
        self.tok_embeddings = nn.Embedding(
            args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim)
        )
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.backend: AttentionBackend | None = None

    def attention_backend(self) -> AttentionBackend:
        """The kernels this model runs on: the loader's choice, else resolved for the weights' device and dtype
        the first time they are needed."""
        if self.backend is None:
            self.use_backend(resolve_backend(self.output.weight.device, self.output.weight.dtype))
        return self.backend

    def use_backend(self, backend: AttentionBackend) -> None:
        """Run attention, the indexers' projections and the linear products on `backend`'s kernels."""
        self.backend = backend
        for layer in self.layers:
            layer.attention.use_backend(backend)
            layer.feed_forward.use_backend(backend)
            layer.dense_step = backend.decode_layer(layer, layer_step)
        self.output.product = backend.product(self.output.weight)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.norm = backend.rms_norm(rms_norm)

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Give every layer a KV cache for `max_seq_len` positions (kept when the current one is big enough)."""
        first = self.layers[0].attention.kv_cache
        if (
            first is not None
            and first.max_seq_len >= max_seq_len
            and first.k_cache.shape[0] >= max_batch_size
        ):
            return
        weight = self.output.weight
        for layer in self.layers:
            attention = layer.attention
            attention.kv_cache = KVCache(
                max_batch_size, max_seq_len, self.args.n_kv_head, self.args.head_dim, weight.dtype
            ).to(weight.device)
            if attention.indexer is not None:
                attention.index_cache = IndexKeyCache(
                    max_batch_size, max_seq_len, attention.indexer.head_dim, weight.dtype
                ).to(weight.device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
            layer.attention.index_cache = None

    def attach_indexers(self, indexers: nn.ModuleList) -> None:
        """Give each attention layer its trained lightning indexer (enables DSA; caches are rebuilt)."""
        weight = self.output.weight
        for layer, indexer in zip(self.layers, indexers, strict=True):
            layer.attention.indexer = indexer.to(device=weight.device, dtype=weight.dtype).eval()
        self.clear_caches()

    @property
    def has_indexers(self) -> bool:
        return self.layers[0].attention.indexer is not None

    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor,
        last_logits_only: bool = True,
        dsa: DSAConfig | None = None,
        whole_cache: bool = False,
    ) -> Tensor:
        """Logits (B, 1, V) for the last position, or (B, T, V) for all of `idx` (B, T) at `input_pos` (T,).

        `dsa` switches attention to DeepSeek Sparse Attention for this call (needs attached indexers).
        `whole_cache`: one decode token, attention over the whole preallocated cache masked by input_pos, and
        no host sync, so the step can be captured in a CUDA graph (`indexer_model.cuda_graph`); DSA then runs
        on the Triton kernels whatever the context length (with k at least the context, they select every key)."""
        self.attention_backend()
        x = self.tok_embeddings(idx)
        rope = rope_cos_sin(input_pos, self.args.head_dim, self.args.rope_base)
        # The one host sync of an eager step: each layer's cache view needs the key count.
        n_keys = None if whole_cache else int(input_pos[-1]) + 1
        for number, layer in enumerate(self.layers):
            x = layer(x, rope, input_pos, n_keys, None if dsa is None or number in dsa.dense_layers else dsa)
        if last_logits_only:
            x = x[:, -1:]
        return self.output(self.norm(x))
