"""FAISS index choice by size, building with stable ids, and search."""

import numpy as np
import pytest

from rag.errors import BadInputError
from rag.index import build_index, choose_factory, search


def normalized(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_factory_follows_the_design_thresholds():
    assert choose_factory(1_000, 384) == "IDMap2,Flat"
    assert choose_factory(49_999, 384) == "IDMap2,Flat"
    assert choose_factory(50_000, 384) == "IDMap2,HNSW32"
    large = choose_factory(5_000_000, 384)
    assert large.startswith("OPQ48_192,IVF") and large.endswith(",PQ48")  # IVF keeps ids itself


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,Flat", "OPQ8_32,IVF16,PQ8x4"])
def test_every_index_type_returns_the_stable_chunk_ids(factory):
    vectors = normalized(2_000, 32)
    ids = np.arange(2_000, dtype=np.int64) * 7919 + 10**12  # large, non-contiguous ids
    index, used = build_index(vectors, ids, factory)
    assert used == (factory if "IVF" in factory else f"IDMap2,{factory}")
    scores, found = search(index, vectors[:5], 3)
    assert found.shape == (5, 3)
    assert set(found[:, 0]) <= set(ids)
    if "PQ" not in factory:  # exact vectors: each query finds itself first
        assert list(found[:, 0]) == list(ids[:5])
        assert np.allclose(scores[:, 0], 1.0, atol=1e-4)


def test_search_clamps_k_to_the_number_of_vectors():
    index, _ = build_index(normalized(3, 16), np.array([5, 6, 7]))
    _, found = search(index, normalized(1, 16, seed=1), 10)
    assert sorted(found[0]) == [5, 6, 7]


def test_invalid_factory_is_a_clear_error():
    with pytest.raises(BadInputError, match="not valid"):
        build_index(normalized(10, 16), np.arange(10), "NoSuchIndex99")
