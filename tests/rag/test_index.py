"""FAISS index choice by size, building with stable ids, search, and the re-ranked (refined) IVF index."""

import faiss
import numpy as np
import pytest

from dsarag.base.errors import BadInputError
from dsarag.rag.index import (
    IVF_NPROBE,
    REFINE_K_FACTOR,
    add_vectors,
    build_index,
    choose_factory,
    index_params,
    merge_into,
    new_index,
    remove_ids,
    search,
    train,
)


def normalized(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_factory_follows_the_design_thresholds():
    assert choose_factory(1_000, 384) == "IDMap2,Flat"
    assert choose_factory(49_999, 384) == "IDMap2,Flat"
    assert choose_factory(50_000, 384) == "IDMap2,HNSW32"
    large = choose_factory(5_000_000, 384)
    assert large.startswith("OPQ48_192,IVF") and large.endswith(",PQ48,Refine(SQ8)")  # IVF keeps ids itself
    assert isinstance(new_index(384, large), faiss.IndexRefine)


@pytest.mark.parametrize(
    "factory",
    ["Flat", "HNSW32", "IVF16,Flat", "OPQ8_32,IVF16,PQ8x4", "IVF16,PQ8x4,Refine(SQ8)", "HNSW32,RFlat"],
)
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


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 100 centres, each neighbourhood finer than 4-bit PQ codes can tell apart."""
    rng = np.random.default_rng(seed)
    centres = normalized(100, dim, seed=seed + 1)
    vectors = centres[rng.integers(100, size=n)] + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def clustered_set() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4,000 clustered vectors, their large non-contiguous chunk ids, and 200 queries from the same clusters."""
    vectors = clustered(4_200, 64)
    ids = np.arange(4_000, dtype=np.int64) * 7919 + 10**12
    return vectors[:4_000], ids, vectors[4_000:]


def test_refine_stage_lifts_pq_recall_on_clustered_vectors(clustered_set):
    vectors, ids, queries = clustered_set
    _, truth = search(build_index(vectors, ids, "Flat")[0], queries, 10)
    pq_only, _ = build_index(vectors, ids, "IVF16,PQ8x4")
    refined, used = build_index(vectors, ids, "IVF16,PQ8x4,Refine(SQ8)")
    assert used == "IVF16,PQ8x4,Refine(SQ8)" and isinstance(refined, faiss.IndexRefine)
    assert refined.ntotal == 4_000
    pq_recall = recall_at_10(search(pq_only, queries, 10)[1], truth)
    refined_recall = recall_at_10(search(refined, queries, 10)[1], truth)
    assert pq_recall < 0.7 and refined_recall >= 0.9
    assert recall_at_10(search(refined, queries, 10, k_factor=1)[1], truth) == pytest.approx(pq_recall)
    assert index_params(refined) == {"nlist": 16, "nprobe": IVF_NPROBE, "k_factor": REFINE_K_FACTOR}


def test_refined_index_deletes_ids_from_both_stages_and_keeps_them_deleted_on_disk(clustered_set):
    vectors, ids, _ = clustered_set
    index, _ = build_index(vectors, ids, "IVF16,PQ8x4,Refine(SQ8)")
    gone = ids[:50]
    assert remove_ids(index, gone) == 50 and index.ntotal == 3_950
    with pytest.raises(RuntimeError):  # the refine codes left with the PQ codes
        faiss.downcast_index(index.refine_index).reconstruct(int(gone[0]))
    loaded = faiss.deserialize_index(faiss.serialize_index(index))
    assert isinstance(loaded, faiss.IndexRefine) and loaded.ntotal == 3_950
    _, found = search(loaded, vectors[:60], 10)
    assert not set(found.ravel().tolist()) & set(gone.tolist())
    assert found[50:, 0].tolist() == ids[50:60].tolist()  # the rest still find themselves first


def test_refined_parts_filled_apart_merge_into_one_index(clustered_set):
    vectors, ids, queries = clustered_set
    trained = new_index(64, "IVF16,PQ8x4,Refine(SQ8)")
    train(trained, vectors)
    whole, first, second = (faiss.deserialize_index(faiss.serialize_index(trained)) for _ in range(3))
    add_vectors(whole, vectors, ids)
    add_vectors(first, vectors[:2_000], ids[:2_000])
    add_vectors(second, vectors[2_000:], ids[2_000:])
    for index in (first, second):  # FAISS merges IVF lists only without the id map, as fill_on_ray does
        faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.NoMap)
    merge_into(first, second)
    faiss.extract_index_ivf(first).set_direct_map_type(faiss.DirectMap.Hashtable)
    assert first.ntotal == 4_000
    assert search(first, queries, 10)[1].tolist() == search(whole, queries, 10)[1].tolist()
    assert remove_ids(first, ids[-5:]) == 5


def test_unrefined_ivf_index_files_still_load_and_search(clustered_set, tmp_path):
    vectors, ids, queries = clustered_set
    index, _ = build_index(vectors, ids, "IVF16,PQ8x4")
    faiss.write_index(index, str(tmp_path / "index-1.faiss"))
    loaded = faiss.read_index(
        str(tmp_path / "index-1.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    )
    assert not isinstance(loaded, faiss.IndexRefine)
    assert search(loaded, queries, 10)[1].tolist() == search(index, queries, 10)[1].tolist()
    assert index_params(loaded) == {"nlist": 16, "nprobe": IVF_NPROBE}
