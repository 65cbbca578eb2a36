"""Sentence embeddings (sentence-transformers), normalized so inner product = cosine."""

import os
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


class Embedder:
    """A sentence-transformers model loaded from a local folder; never touches the network."""

    def __init__(self, folder: Path, name: str, device: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(str(folder), device=device or _best_device())
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self.tokenizer_json = Path(folder) / "tokenizer.json"

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.astype(np.float32, copy=False)


def load_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    from indexer_model.provision import embedder_path

    return Embedder(embedder_path(), name)


def _best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
