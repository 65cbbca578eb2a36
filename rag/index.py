"""FAISS index choice, building, updating and search. The index is named by a factory string, as FAISS does.

Flat and HNSW sit inside an `IDMap2` (they number vectors 0..n-1 themselves); IVF indexes keep the chunk ids
natively, with a hash-table direct map so `remove_ids` and `reconstruct` by id are cheap.

A factory ending in `,Refine(SQ8)` (or `,RFlat`) re-ranks: the base index finds `k * k_factor` candidates and
finer codes of the same vectors score them again. Both parts are kept in one `faiss.IndexRefine`, its refine
index an `IDMap2` so the codes are found by chunk id; FAISS's own `IndexRefine` methods look codes up by
position, so adding, removing and searching go through the functions here.
"""

import math
import re
from collections.abc import Iterable

import faiss
import numpy as np

from dsarag.base.errors import BadInputError

# Thresholds from the design: exact search is fast and perfect for small stores, HNSW up to a few million,
# IVF+OPQ for large or memory-bound stores.
FLAT_MAX_CHUNKS = 50_000
HNSW_MAX_CHUNKS = 2_000_000
# Measured in docs/benchmarks-pipeline.md, issue 7 (100K/200K vectors clustered around real MiniLM embeddings, one
# thread): efSearch 128 gives recall@10 1.0 at ≈ 0.3 ms/query; 64 does too at half that, kept as headroom
# for stores up to HNSW_MAX_CHUNKS and for real embeddings.
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
# A refined index re-scores k * REFINE_K_FACTOR candidates: fewer lose true neighbours that the PQ codes rank
# too low, more only cost time (docs/benchmarks-pipeline.md, issue 44).
REFINE_K_FACTOR = 16
# IVF training sample per inverted list: FAISS warns below 39, more than 256 adds little.
IVF_TRAIN_MIN_PER_LIST = 30
IVF_TRAIN_MAX_PER_LIST = 256
# The score FAISS gives an empty result slot of an inner-product search.
_NO_SCORE = -np.finfo(np.float32).max
# HNSW cannot delete: once this fraction of its vectors are tombstones the next update rebuilds it.
TOMBSTONE_REBUILD_FRACTION = 0.1


def choose_factory(n_vectors: int, dim: int) -> str:
    """The index factory string the design prescribes for a store of `n_vectors` embeddings."""
    if n_vectors < FLAT_MAX_CHUNKS:
        return "IDMap2,Flat"
    if n_vectors < HNSW_MAX_CHUNKS:
        return "IDMap2,HNSW32"
    # PQ codes keep the index small but cannot order near neighbours; 8-bit codes of the same vectors re-rank.
    pq_m = 48 if dim % 48 == 0 else 32
    n_lists = 1 << round(math.log2(8 * math.sqrt(n_vectors)))
    return f"OPQ{pq_m}_{4 * pq_m},IVF{n_lists},PQ{pq_m},Refine(SQ8)"


def normalize_factory(factory: str) -> str:
    """IVF factories keep ids natively; every other index gets an `IDMap2` in front for the chunk ids."""
    if "IVF" in factory:
        return factory.removeprefix("IDMap2,").removeprefix("IDMap,")
    return factory if factory.startswith("IDMap") else f"IDMap2,{factory}"


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty, untrained index for `factory` (normalized), with the project's build parameters."""
    base_factory, refine_factory = split_refine(factory)
    index = _faiss_index(dim, base_factory, factory)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    if refine_factory is None:
        return index
    refined = faiss.IndexRefine(index, faiss.IndexIDMap2(_faiss_index(dim, refine_factory, factory)))
    refined.k_factor = REFINE_K_FACTOR
    return refined


def split_refine(factory: str) -> tuple[str, str | None]:
    """("OPQ48_192,IVF4096,PQ48", "SQ8") for "OPQ48_192,IVF4096,PQ48,Refine(SQ8)"; (factory, None) without one."""
    match = _REFINE_SUFFIX.fullmatch(factory)
    if match is None:
        return factory, None
    return match["base"], match["refine"] or "Flat"


_REFINE_SUFFIX = re.compile(r"(?P<base>.+),(?:RFlat|Refine\((?P<refine>[^()]+)\))")


def _faiss_index(dim: int, factory: str, whole_factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise BadInputError(
            f"index factory {whole_factory!r} is not valid for FAISS ({str(error).strip().splitlines()[-1]}) — "
            "try Flat, HNSW32 or OPQ16_64,IVF1024,PQ16,Refine(SQ8)"
        ) from error


def training_sample_size(index: faiss.Index, n_vectors: int) -> int:
    """How many vectors to train on: 256 per IVF list at most, everything when that is fewer."""
    ivf = faiss.try_extract_index_ivf(index)
    per_list = ivf.nlist if ivf is not None else 1024
    return min(n_vectors, IVF_TRAIN_MAX_PER_LIST * per_list)


def train(index: faiss.Index, sample: np.ndarray) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and len(sample) < IVF_TRAIN_MIN_PER_LIST * ivf.nlist:
        raise BadInputError(
            f"IVF{ivf.nlist} needs at least {IVF_TRAIN_MIN_PER_LIST * ivf.nlist} vectors to train, the store "
            f"has {len(sample)} — pick fewer lists (e.g. IVF{max(1, len(sample) // 100)}) or HNSW32"
        )
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def add_vectors(index: faiss.Index, embeddings: np.ndarray, ids: np.ndarray) -> None:
    if not len(ids):
        return
    embeddings, ids = np.ascontiguousarray(embeddings, dtype=np.float32), ids.astype(np.int64)
    if isinstance(index, faiss.IndexRefine):
        base, refine = _refine_parts(index)
        base.add_with_ids(embeddings, ids)
        refine.add_with_ids(embeddings, ids)
        index.ntotal = base.ntotal
    else:
        index.add_with_ids(embeddings, ids)


def merge_into(index: faiss.Index, other: faiss.Index) -> None:
    """Move `other`'s vectors into `index` (same factory and training), e.g. shards filled elsewhere."""
    if isinstance(index, faiss.IndexRefine):
        for part, other_part in zip(_refine_parts(index), _refine_parts(other), strict=True):
            part.merge_from(other_part, 0)
        index.ntotal = _refine_parts(index)[0].ntotal
    else:
        index.merge_from(other, 0)


def can_remove(index: faiss.Index) -> bool:
    """Flat and IVF indexes delete for real; HNSW cannot, so its deletions are tombstones."""
    return _hnsw_of(index) is None


def remove_ids(index: faiss.Index, ids: Iterable[int]) -> int:
    ids = np.fromiter(ids, dtype=np.int64)
    if not len(ids):
        return 0
    if isinstance(index, faiss.IndexRefine):
        base, refine = _refine_parts(index)
        removed = remove_ids(base, ids)
        remove_ids(refine, ids)
        index.ntotal = base.ntotal
        return removed
    if faiss.try_extract_index_ivf(index) is not None:  # the hash-table direct map looks each id up itself
        return int(index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
    return int(index.remove_ids(faiss.IDSelectorBatch(ids)))


def build_index(
    embeddings: np.ndarray, ids: np.ndarray, factory: str | None = None
) -> tuple[faiss.Index, str]:
    """Build an inner-product index over normalized embeddings with the chunk ids as FAISS ids."""
    n_vectors, dim = embeddings.shape
    factory = normalize_factory(factory or choose_factory(n_vectors, dim))
    index = new_index(dim, factory)
    if not index.is_trained:
        sample = embeddings[
            np.random.default_rng(0).permutation(n_vectors)[: training_sample_size(index, n_vectors)]
        ]
        train(index, sample)
    add_vectors(index, embeddings, ids)
    return index, factory


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    exclude_ids: Iterable[int] = (),
    ef_search: int = HNSW_EF_SEARCH,
    nprobe: int = IVF_NPROBE,
    k_factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, chunk_ids) of the k nearest chunks per query; missing slots have id -1.

    `exclude_ids` are the store's tombstones (manifest.tombstones): vectors still in an HNSW graph whose
    chunks are gone; FAISS skips them during the search, so k live results still come back. A refined
    index re-scores `k * k_factor` candidates (default: the index's own k_factor)."""
    k = max(1, min(k, index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not isinstance(index, faiss.IndexRefine):
        return _search_base(index, queries, k, exclude_ids, ef_search, nprobe)
    base, refine = _refine_parts(index)
    n_candidates = max(k, round(k * (k_factor or index.k_factor)))
    _, candidates = _search_base(base, queries, n_candidates, exclude_ids, ef_search, nprobe)
    scores = np.full(candidates.shape, _NO_SCORE, dtype=np.float32)
    for row, query in enumerate(queries):  # one query at a time keeps the decoded candidates small
        found = candidates[row] >= 0
        if found.any():
            scores[row, found] = refine.reconstruct_batch(candidates[row, found]) @ query
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, best, axis=1), np.take_along_axis(candidates, best, axis=1)


def _search_base(
    index: faiss.Index, queries: np.ndarray, k: int, exclude_ids: Iterable[int], ef_search: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    hnsw = _hnsw_of(index)
    if hnsw is None:
        return index.search(queries, k)
    params = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
    excluded = np.fromiter(exclude_ids, dtype=np.int64)
    if len(excluded):
        params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded))
    return index.search(queries, k, params=params)


def index_params(index: faiss.Index) -> dict:
    """The search and build parameters that matter for this index type, for `dsarag index info`."""
    if isinstance(index, faiss.IndexRefine):
        return index_params(faiss.downcast_index(index.base_index)) | {"k_factor": index.k_factor}
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        return {
            "M": hnsw.hnsw.nb_neighbors(1),
            "efConstruction": hnsw.hnsw.efConstruction,
            "efSearch": HNSW_EF_SEARCH,
        }
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nlist": ivf.nlist, "nprobe": IVF_NPROBE}
    return {"search": "exact"}


def _refine_parts(index: faiss.IndexRefine) -> tuple[faiss.Index, faiss.IndexIDMap2]:
    return faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexHNSW) else None
