"""`--model SPEC` → the HF-format folder (config.json + safetensors + tokenizer) to load. Never uses the network."""

import re
from pathlib import Path

from dsarag.base.errors import ModelError
from dsarag.indexer_model.provision import (
    DEFAULT_GENERATOR,
    convert_local_gguf,
    generator_path,
    registry_model,
)

ACCEPTED_FORMS = (
    "`default`, `tiny`, a registry name (see `dsarag models list`), a local Hugging Face model folder "
    "(config.json + safetensors), a Hugging Face id already in the local HF cache, or a path to a .gguf file"
)
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(spec: str | None) -> Path:
    """The folder of the generator named by `spec` (None → the default generator); ModelError when unknown."""
    if spec is None or not spec.strip() or spec.strip().lower() == "default":
        return generator_path(DEFAULT_GENERATOR)
    spec = spec.strip()
    model = registry_model(spec)
    if model is not None:
        if not model.is_gguf:
            raise ModelError(f"--model {spec!r} is the embedder, not a generator; pass {ACCEPTED_FORMS}")
        return generator_path(model.name)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return convert_local_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path}: no config.json; pass a Hugging Face model folder or a .gguf file", path
            )
        return path.resolve()
    if _HF_REPO_ID.fullmatch(spec) and not path.exists():
        snapshot = _hf_cache_snapshot(spec)
        if snapshot is not None:
            return snapshot
        raise ModelError(
            f"--model {spec!r}: not in the local Hugging Face cache (dsarag never downloads at run time); "
            f"fetch it with `hf download {spec}` or pass {ACCEPTED_FORMS}"
        )
    raise ModelError(f"--model {spec!r}: unknown model; pass {ACCEPTED_FORMS}")


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return snapshot if (snapshot / "config.json").is_file() else None
