"""Load a Hugging Face model folder (config.json + safetensors, sharded or not) into our Transformer.

The model is built on the meta device and the tensors read from safetensors are assigned in place, so
loading costs one read of the file and no initialization.
"""

import json
import re
from pathlib import Path

import torch

from dsarag.base.errors import ModelError
from dsarag.indexer_model.model import ModelArgs, Transformer
from dsarag.kernels.backend import resolve_backend
from dsarag.kernels.cpu_dsa import cpu_isa

# HF parameter names → ours (module names in model.py).
_RENAMES = (
    (r"^model\.embed_tokens\.", "tok_embeddings."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attention."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"layers.\1.feed_forward."),
)


def our_name(hf_name: str) -> str:
    for pattern, replacement in _RENAMES:
        name, count = re.subn(pattern, replacement, hf_name)
        if count:
            return name
    return hf_name


def load_config(folder: Path) -> tuple[dict, ModelArgs]:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
        return config, ModelArgs.from_config(config)
    except FileNotFoundError:
        raise ModelError(
            f"{config_path}: missing; a model folder needs config.json + safetensors", config_path
        ) from None
    except (json.JSONDecodeError, KeyError, ValueError) as error:
        raise ModelError(
            f"{config_path}: unusable model config ({error}); use a qwen2 or llama model", config_path
        ) from error


def safetensors_files(folder: Path) -> list[Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{folder}: no *.safetensors weights; convert the model to safetensors first", folder
        )
    return files


def load_state_dict(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of every shard under our names, in `dtype` (no copy when the file already holds it)."""
    from safetensors.torch import load_file

    state_dict = {}
    for path in safetensors_files(folder):
        for hf_name, tensor in load_file(path).items():
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; we compute it
                continue
            state_dict[our_name(hf_name)] = tensor.to(dtype)
    return state_dict


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 matmuls run ~3x
    slower than fp32 (measured: 231 ms vs 71 ms for a 1100x896x4864 product on an AVX-512 Xeon without BF16).
    Never under DSARAG_CPU_ISA=avx2, which runs this CPU as one with AVX2 only."""
    if cpu_isa() == "avx2":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 on GPUs and on CPUs with native bf16, else fp32 (faster there, at twice the memory)."""
    if torch.device(device).type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def load_model(
    folder: Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kernels: str = "auto",
    decode_weights: str | None = None,
) -> Transformer:
    """Our Transformer with the weights of an HF-format folder, in eval mode (dtype None: default_dtype), on the
    attention backend `kernels` resolves to for that device and dtype; `decode_weights` "model" keeps CPU decode
    steps on the model's own weights instead of int8 copies (None: $DSARAG_DECODE_WEIGHTS, else int8)."""
    folder = Path(folder)
    dtype = dtype or default_dtype(device)
    _, args = load_config(folder)
    model = build_model(args, load_state_dict(folder, dtype), folder).to(device)
    model.use_backend(resolve_backend(device, dtype, kernels, decode_weights))
    return model


def build_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], source: Path) -> Transformer:
    """Assign `state_dict` (our names) to a Transformer built on the meta device; `source` names it in errors."""
    with torch.device("meta"):
        model = Transformer(args)
    state_dict = dict(state_dict)
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)
        if "tok_embeddings.weight" in state_dict:
            state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(
            f"{source}: weights do not match config.json ({problem}); re-convert the model", source
        )
    model.load_state_dict(state_dict, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()
