"""What the cost meter knows about a served model: the architecture table behind its dense-vs-sparse FLOPs, and
the meter of one served answer (token counts from the response's `usage`, times from its stream).

Known: DeepSeek-V3.2-Exp (MLA, mixture of experts, a lightning indexer keeping k = 2048 keys; its public
config.json), and any model on this machine that dsarag runs itself (its config.json). Others are "unknown":
measured times and tokens only.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsarag.base.errors import DsaragError
from dsarag.rag.cost import GpuSpec, ModelShape, meter_answer

if TYPE_CHECKING:
    from dsarag.indexer_model.generate import GenerationResult
    from dsarag.rag.remote_generator import RemoteGenerator


@dataclass(frozen=True)
class ServedArchitecture:
    name: str
    shape: ModelShape
    attention: str  # what every answer runs: "sparse" for a model trained with DSA, else "dense"
    topk: int  # the sparse side's k


def _deepseek_v32_exp() -> ServedArchitecture:
    dim, heads, q_rank, kv_rank, nope, rope, v_dim = 7168, 128, 1536, 512, 128, 64, 128
    index_heads, index_dim = 64, 128
    mla = dim * q_rank + q_rank * heads * (nope + rope) + dim * (kv_rank + rope)
    mla += kv_rank * heads * (nope + v_dim) + heads * v_dim * dim
    experts = (8 + 1) * 3 * dim * 2048 + dim * 256  # 8 routed + 1 shared SwiGLU experts, and the router
    layers, dense_layers = 61, 3
    mlp = (dense_layers * 3 * dim * 18432 + (layers - dense_layers) * experts) / layers
    shape = ModelShape(
        n_layer=layers,
        n_head=heads,
        n_kv_head=1,
        head_dim=kv_rank + rope,
        dim=dim,
        intermediate_size=2048,
        vocab_size=129280,
        index_heads=index_heads,
        index_dim=index_dim,
        bytes_per_value=1,  # FP8 weights, KV cache and index keys
        # Decoding absorbs the up-projections: each head scores the 576-value latent and reads 512 of it.
        attention_dim=(kv_rank + rope + kv_rank) / 2,
        kv_values_per_token=kv_rank + rope,
        active_layer_weights=mla + mlp,
        active_indexer_weights=q_rank * index_heads * index_dim + dim * index_dim + dim * index_heads,
    )
    return ServedArchitecture("DeepSeek-V3.2-Exp", shape, "sparse", 2048)


SERVED_ARCHITECTURES = {"deepseek-v3.2-exp": _deepseek_v32_exp, "deepseek-v3.2": _deepseek_v32_exp}


def served_architecture(model: str) -> ServedArchitecture | None:
    """The table's entry for a served model name (an "org/name" repo id or the bare name), else the local
    model of that name's config, else None."""
    key = model.strip().lower().rsplit("/", 1)[-1]
    if key in SERVED_ARCHITECTURES:
        return SERVED_ARCHITECTURES[key]()
    from dsarag.indexer_model.dsa import DSAConfig
    from dsarag.indexer_model.resolve import resolve_model
    from dsarag.indexer_model.weights import load_config

    if key.endswith(".gguf"):
        return None
    try:
        _, args = load_config(resolve_model(model))
    except (DsaragError, OSError):
        return None
    return ServedArchitecture(model, ModelShape.from_args(args), "dense", DSAConfig().topk)


def meter_served(generator: "RemoteGenerator", generation: "GenerationResult", gpu: GpuSpec) -> dict:
    """The cost meter of a served answer; its analytic part only where the architecture is known."""
    served = {"endpoint": generator.endpoint.base_url, "model": generator.served_model}
    measured = {"prefill_s": generation.prefill_s, "decode_s": generation.decode_s}
    architecture = served_architecture(generator.served_model)
    if architecture is None:
        return {
            "prompt_tokens": generation.prompt_tokens,
            "new_tokens": generation.new_tokens,
            "mode_ran": generation.attention,
            "served": served | {"architecture": "unknown"},
            "measured": {
                **{key: round(value, 4) for key, value in measured.items()},
                "tokens_per_s": round(generation.decode_steps / generation.decode_s, 2)
                if generation.decode_s
                else None,
            },
        }
    ran = generation.attention if generation.attention in ("dense", "sparse") else architecture.attention
    meter = meter_answer(
        architecture.shape,
        generation.prompt_tokens,
        generation.new_tokens,
        generation.topk or architecture.topk,
        measured,
        ran,
        gpu,
    )
    meter["measured"]["backend"] = "remote"
    return meter | {"served": served | {"architecture": architecture.name}}
