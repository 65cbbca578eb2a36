"""Trained lightning-indexer checkpoints: safetensors + config.json + metrics.json in one folder.

A checkpoint belongs to one base model, recognised by a fingerprint of its weights, so `load_generator`
finds the right indexers for whatever model folder the user passes (converted GGUF, HF folder, …).
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dsarag.base.atomic import atomic_write, atomic_write_json
from dsarag.base.errors import ModelError
from dsarag.indexer_model.indexer import LightningIndexer

BUNDLED_CHECKPOINTS = Path(__file__).parent / "checkpoints"
FINGERPRINT_SAMPLE = 4096  # values per tensor: enough to tell fine-tunes apart, cheap to compute


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape and a strided sample of its values in bf16.

    Computed from the loaded tensors (not file bytes), so the same weights give the same fingerprint
    whether they came from a GGUF, a converted folder or a Hugging Face checkpoint, on any machine.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".indexer." in name:
            continue  # the fingerprint names the base model, not the indexers attached to it
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_SAMPLE)
        sample = flat[::stride][:FINGERPRINT_SAMPLE].to(torch.bfloat16).float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def user_checkpoints() -> Path:
    from dsarag.base.paths import cache_dir

    return cache_dir() / "indexers"


def checkpoint_folders() -> list[Path]:
    """Where trained indexers are looked for: the user cache first, then the ones shipped with dsarag."""
    roots = [Path(p) for p in os.environ.get("DSARAG_INDEXERS", "").split(os.pathsep) if p]
    roots += [user_checkpoints(), BUNDLED_CHECKPOINTS]
    return [folder for root in roots if root.is_dir() for folder in sorted(root.iterdir()) if folder.is_dir()]


def find_checkpoint(fingerprint: str) -> Path | None:
    for folder in checkpoint_folders():
        config_path = folder / "config.json"
        if (
            config_path.is_file()
            and json.loads(config_path.read_text()).get("base_fingerprint") == fingerprint
        ):
            return folder
    return None


def save_checkpoint(folder: Path, indexers: nn.ModuleList, config: dict, metrics: dict) -> None:
    """Write weights (bf16), config and metrics; `config` must hold base_fingerprint and the indexer config."""
    tensors = {
        f"layers.{i}.{name}": tensor.detach().to(torch.bfloat16).contiguous().cpu()
        for i, indexer in enumerate(indexers)
        for name, tensor in indexer.state_dict().items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "indexer.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / "metrics.json", metrics)
    atomic_write_json(folder / "config.json", config)


def indexers_config(indexers: nn.ModuleList) -> dict:
    """The config a checkpoint records: the most common layer shape's, plus `layer_heads` / `layer_dims` for layers
    with other head counts or head dims (a harder layer may get a bigger indexer than the rest)."""
    shapes = [(indexer.n_heads, indexer.head_dim) for indexer in indexers]
    common = max(set(shapes), key=shapes.count)
    config = indexers[shapes.index(common)].config()
    layer_heads = {str(i): heads for i, (heads, _) in enumerate(shapes) if heads != common[0]}
    layer_dims = {str(i): dims for i, (_, dims) in enumerate(shapes) if dims != common[1]}
    return {
        **config,
        **({"layer_heads": layer_heads} if layer_heads else {}),
        **({"layer_dims": layer_dims} if layer_dims else {}),
    }


def load_checkpoint(
    folder: Path, dim: int, n_layer: int, dtype: torch.dtype = torch.float32
) -> nn.ModuleList:
    """Indexers of a checkpoint, after checking that their RoPE layout is the one this code implements."""
    config = json.loads((folder / "config.json").read_text())
    recorded = dict(config["indexer"])
    layer_heads = {int(layer): heads for layer, heads in recorded.pop("layer_heads", {}).items()}
    layer_dims = {int(layer): dims for layer, dims in recorded.pop("layer_dims", {}).items()}
    if config.get("n_layer") != n_layer:
        raise ModelError(
            f"{folder}: indexer for {config.get('n_layer')} layers, model has {n_layer} — retrain it"
        )
    indexers = nn.ModuleList(
        LightningIndexer(
            dim,
            recorded["rope_base"],
            layer_heads.get(i, recorded["n_heads"]),
            layer_dims.get(i, recorded["head_dim"]),
            recorded.get("index_sets", 1),
        )
        for i in range(n_layer)
    )
    common = next(i for i in range(n_layer) if i not in layer_dims)  # its RoPE dims are the recorded ones
    try:
        indexers[common].check_config({**recorded, "n_heads": indexers[common].n_heads})
    except ValueError as error:
        raise ModelError(
            f"{folder / 'config.json'}: {error} — retrain the indexer with this dsarag"
        ) from error
    state = load_file(str(folder / "indexer.safetensors"))
    scales = config.get("layer_topk_scales") or [1.0] * n_layer
    for i, indexer in enumerate(indexers):
        prefix = f"layers.{i}."
        indexer.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        indexer.topk_scale = float(scales[i])
    return indexers.to(dtype)


def write_topk_scales(folder: Path, scales: tuple[float, ...], measurement: dict) -> None:
    """Record per-layer top-k multipliers in a checkpoint's config.json, and how they were measured in its
    metrics.json (atomic writes; the weights are untouched)."""
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    atomic_write_json(folder / "metrics.json", {**metrics, "topk_budget": measurement})
    atomic_write_json(folder / "config.json", {**config, "layer_topk_scales": list(scales)})
