"""The plain-PyTorch BERT encoder gives sentence-transformers' embeddings for the default embedder."""

import json
import shutil

import numpy as np
from sentence_transformers import SentenceTransformer

from dsarag.rag.bert_encoder import SentenceEncoder, is_plain_bert_mean_pooling
from dsarag.rag.embed import Embedder

TEXTS = [
    "The workshop opens at 9am on Saturdays.",
    "",
    "word " * 600,  # past the 256-token limit: truncated alike
    "Ünïcödé — text\twith\nnewlines and LHC-4471",
    "short",
    "What changed in the Q3 contract?",
]


def test_encoder_matches_sentence_transformers_on_the_default_embedder(embedder):
    ours = SentenceEncoder(embedder.folder, "cpu").encode(TEXTS, batch_size=4)
    reference = SentenceTransformer(str(embedder.folder), device="cpu").encode(
        TEXTS, batch_size=4, normalize_embeddings=True, convert_to_numpy=True
    )
    assert ours.shape == (len(TEXTS), embedder.dim) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # Batching and padding do not change a text's vector.
    np.testing.assert_allclose(
        SentenceEncoder(embedder.folder, "cpu").encode(TEXTS[:1], 1)[0], ours[0], atol=1e-6
    )


def test_the_default_embedder_runs_on_our_encoder(embedder):
    assert is_plain_bert_mean_pooling(embedder.folder)
    assert isinstance(embedder.model, SentenceEncoder)


def test_other_pooling_falls_back_to_sentence_transformers(tmp_path, embedder):
    folder = tmp_path / "cls-pooling"
    shutil.copytree(embedder.folder, folder)
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    assert not is_plain_bert_mean_pooling(folder)
    other = Embedder(folder, "cls-pooling")
    assert isinstance(other.model, SentenceTransformer)
    vectors = other.encode(TEXTS[:2])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
