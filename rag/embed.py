"""Sentence embeddings, normalized so inner product = cosine: our plain-PyTorch BERT encoder for
sentence-transformers BERT folders with mean pooling (the default embedder), sentence-transformers for others."""

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


class Embedder:
    """A sentence-transformers model in a local folder, loaded on first use (so bad input fails fast)."""

    def __init__(self, folder: Path, name: str, device: str | None = None) -> None:
        self.folder = Path(folder)
        self.name = name
        self.device = device
        self.tokenizer_json = self.folder / "tokenizer.json"
        pooling = json.loads((self.folder / "1_Pooling" / "config.json").read_text())
        self.dim = int(pooling["word_embedding_dimension"])

    @cached_property
    def model(self):  # noqa: ANN201 - SentenceEncoder or SentenceTransformer, imported lazily (slow imports)
        from dsarag.rag.bert_encoder import SentenceEncoder, is_plain_bert_mean_pooling

        if is_plain_bert_mean_pooling(self.folder):
            return SentenceEncoder(self.folder, self.device or _best_device())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        return SentenceTransformer(str(self.folder), device=self.device or _best_device())

    @property
    def on_gpu(self) -> bool:
        return self.model.device.type == "cuda"

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        from dsarag.rag.bert_encoder import SentenceEncoder

        if isinstance(self.model, SentenceEncoder):
            return self.model.encode(texts, batch_size)
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.astype(np.float32, copy=False)


def load_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    from dsarag.indexer_model.provision import embedder_path

    return Embedder(embedder_path(), name)


def _best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
