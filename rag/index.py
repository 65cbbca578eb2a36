"""FAISS index choice, building and search. The index is named by a factory string, as FAISS does."""

import math

import faiss
import numpy as np

from rag.errors import BadInputError

# Thresholds from the design: exact search is fast and perfect for small stores, HNSW up to a few million,
# IVF+OPQ for large or memory-bound stores.
FLAT_MAX_CHUNKS = 50_000
HNSW_MAX_CHUNKS = 2_000_000
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32


def choose_factory(n_vectors: int, dim: int) -> str:
    """The index factory string the design prescribes for a store of `n_vectors` embeddings."""
    if n_vectors < FLAT_MAX_CHUNKS:
        return "IDMap2,Flat"
    if n_vectors < HNSW_MAX_CHUNKS:
        return "IDMap2,HNSW32"
    pq_m = 48 if dim % 48 == 0 else 32
    n_lists = 1 << round(math.log2(8 * math.sqrt(n_vectors)))
    return f"IDMap2,OPQ{pq_m}_{4 * pq_m},IVF{n_lists},PQ{pq_m}"


def build_index(
    embeddings: np.ndarray, ids: np.ndarray, factory: str | None = None
) -> tuple[faiss.Index, str]:
    """Build an inner-product index over normalized embeddings with the chunk ids as FAISS ids."""
    n_vectors, dim = embeddings.shape
    factory = factory or choose_factory(n_vectors, dim)
    if not factory.startswith("IDMap"):
        factory = f"IDMap2,{factory}"
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise BadInputError(f"index factory {factory!r} is not valid for FAISS ({error})") from error
    if not index.is_trained:
        # IVF/PQ need a training sample; more than ~256 vectors per list adds little.
        sample = embeddings[np.random.default_rng(0).permutation(n_vectors)[: 256 * 1024]]
        index.train(sample)
    if n_vectors:
        index.add_with_ids(np.ascontiguousarray(embeddings, dtype=np.float32), ids.astype(np.int64))
    return index, factory


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, chunk_ids) of the k nearest chunks per query; missing slots have id -1."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.nprobe = IVF_NPROBE
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
