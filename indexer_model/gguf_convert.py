"""GGUF → Hugging Face folder (config.json, bf16 model.safetensors, tokenizer files), done once per file.

Weights are dequantized with the `gguf` package. llama.cpp's converter permutes the Q and K projections of
`llama` models for its interleaved RoPE; we undo that so every model uses the half-split (NeoX) layout.
"""

import json
import re
from pathlib import Path

import numpy as np
import torch

from dsarag.base.errors import ModelError

SUPPORTED_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# Chat end markers of common templates: generation stops on any of them that the vocabulary holds.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: Path):  # noqa: ANN202 - gguf.GGUFReader, imported lazily (slow import)
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as error:  # the reader raises ValueError/struct errors on truncated files
        raise ModelError(f"{path}: not a readable GGUF file ({error}); re-download it", path) from error


def _field(reader, key: str, default: object = None) -> object:  # noqa: ANN001
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _tidy_float(value: float) -> float:
    """GGUF stores floats as f32 (1e-5 reads back as 9.99999974e-06); keep 7 significant digits."""
    return float(f"{value:.7g}")


def gguf_config(reader, path: Path) -> dict:  # noqa: ANN001
    """The Hugging Face config.json of a GGUF file, from its metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            path,
        )
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelError(f"{path}: RoPE scaling {scaling!r} is not supported; use a model without it", path)
    tensor_names = {tensor.name for tensor in reader.tensors}
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    default_theta = 1_000_000.0 if arch == "qwen2" else 10_000.0
    config = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "rope_theta": _tidy_float(_field(reader, f"{arch}.rope.freq_base", default_theta)),
        "rms_norm_eps": _tidy_float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": eos,
    }
    if arch == "llama":
        config |= {"attention_bias": "blk.0.attn_q.bias" in tensor_names, "mlp_bias": False}
    else:
        config |= {"use_sliding_window": False}
    return config


def _hf_name(gguf_name: str) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    raise KeyError(gguf_name)


def unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of a Q or K projection (interleaved RoPE → half-split rows per head)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_state_dict(reader, config: dict, path: Path, dtype: torch.dtype = torch.bfloat16) -> dict:  # noqa: ANN001
    """Dequantized weights under Hugging Face parameter names, in `dtype`."""
    from gguf.quants import dequantize

    state_dict = {}
    for tensor in reader.tensors:
        try:
            name = _hf_name(tensor.name)
        except KeyError:
            raise ModelError(
                f"{path}: unexpected tensor {tensor.name!r} for a {config['model_type']} model", path
            ) from None
        weight = dequantize(tensor.data, tensor.tensor_type)
        expected = tuple(
            int(size) for size in reversed(tensor.shape.tolist())
        )  # GGUF lists dims innermost first
        weight = weight.reshape(expected)
        if config["model_type"] == "llama" and ".q_proj." in name:
            weight = unpermute_rope(weight, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".k_proj." in name:
            weight = unpermute_rope(weight, config["num_key_value_heads"])
        state_dict[name] = torch.tensor(
            weight, dtype=dtype
        )  # a copy: F32 tensors are read-only views of the file
    return state_dict


def read_gguf(path: Path, dtype: torch.dtype = torch.bfloat16) -> tuple[dict, dict]:
    """(config.json dict, state dict with HF names) of a GGUF file."""
    reader = _reader(path)
    config = gguf_config(reader, path)
    return config, gguf_state_dict(reader, config, path, dtype)


def _save_tokenizer(gguf_path: Path, folder: Path) -> list[int]:
    """Build the tokenizer from the GGUF (transformers' converter), save it; return the chat end token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ModelError(
            f"{gguf_path}: the GGUF has no chat template; use an instruct (chat) model", gguf_path
        )
    tokenizer.save_pretrained(folder)
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]


def convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Write an HF-format folder for `gguf_path` into `folder` (an empty, private temp folder)."""
    from safetensors.torch import save_file

    config, state_dict = read_gguf(gguf_path, torch.bfloat16)
    if config["tie_word_embeddings"]:
        state_dict.pop("lm_head.weight", None)
    end_ids = _save_tokenizer(gguf_path, folder)
    eos_ids = [config["eos_token_id"], *(i for i in end_ids if i != config["eos_token_id"])]
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids, "do_sample": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    # One metadata key only: safetensors writes metadata in hash order, and the file should be reproducible.
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
