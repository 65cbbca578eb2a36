"""Index build time, size, recall@10 against exact search and ms/query (one thread) for Flat, HNSW32 and IVF+OPQ.

    .venv/bin/python benchmarks/index_recall.py --sizes 100000 200000 [--queries 500]

Vectors: 384-d, unit length, drawn around real MiniLM embeddings of synthetic corpus chunks (corpora/
synthetic.py): `--anchors` chunks are embedded for real and every vector is an anchor plus Gaussian noise,
renormalized, so the set has the clustered structure of real text embeddings. Embedding 200K chunks for real
takes hours on a 2-core CPU; uniform random vectors would be a worst case that says little.
`--anchors-npy FILE` keeps the anchor embeddings in FILE (read if it exists, else computed and written), so a
machine without the embedder can run the index part.

Builds use `--build-threads` (default: every core); searches run with one thread, all queries in one call.
HNSW is searched at every `--ef-search`, IVF at every `--nprobe`, each passed to `rag.index.search`.
A refined factory (`...,Refine(SQ8)`) is also searched at every `--k-factor`, and two variants of its trained
base are measured beside it, without another build: the base alone (un-refined, serialized and read back)
and the base's candidates re-scored exactly with the float32 vectors held in memory (what `RFlat`, or
re-ranking with the embeddings the store keeps in its Parquet shards, would return).
Timings are the best of `--repeats` passes over all queries.
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from dsarag.corpora.synthetic import synthetic_records
from dsarag.rag.index import build_index, search, split_refine


def clustered_vectors(anchors: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = anchors[rng.integers(len(anchors), size=n)]
    vectors = vectors + rng.standard_normal(vectors.shape).astype(np.float32) * noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def rescored_exactly(
    index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int, nprobe: int, k_factor: int
) -> np.ndarray:
    """The ids of the k best of `index`'s k·k_factor candidates by exact inner product (ids = row numbers)."""
    _, candidates = search(index, queries, k * k_factor, nprobe=nprobe)
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for row, query in enumerate(queries):
        found = candidates[row] >= 0
        scores[row, found] = vectors[candidates[row, found]] @ query
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, best, axis=1)


def top10_ids(
    index: faiss.Index, queries: np.ndarray, setting: dict, rescore: np.ndarray | None
) -> np.ndarray:
    """The top-10 ids per query: `rag.index.search`, or its candidates re-scored exactly with `rescore`."""
    if rescore is not None:
        return rescored_exactly(index, rescore, queries, 10, **setting)
    return search(index, queries, 10, **setting)[1]


def best_time_ms(run, n_queries: int, repeats: int):
    """(result, ms per query) of the fastest of `repeats` calls of `run`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000 / n_queries)
    return result, min(times)


def anchor_embeddings(n_anchors: int, cache: Path | None) -> np.ndarray:
    """Real MiniLM embeddings of `n_anchors` synthetic chunks (from `cache` when it holds them)."""
    if cache is not None and cache.exists():
        anchors = np.load(cache)
        print(json.dumps({"anchors": len(anchors), "from": str(cache)}), flush=True)
        return anchors[:n_anchors]
    from dsarag.rag.embed import load_embedder

    embedder = load_embedder()
    texts = [
        " ".join(r["text"].split()[:120]) for r in synthetic_records(n_anchors, seed=7, sentences=(2, 9))
    ]
    started = time.perf_counter()
    anchors = embedder.encode(texts)
    print(
        json.dumps({"anchors": len(anchors), "embed_s": round(time.perf_counter() - started, 1)}), flush=True
    )
    if cache is not None:
        np.save(cache, anchors)
    return anchors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 200_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--anchors", type=int, default=2000)
    parser.add_argument(
        "--anchors-npy", type=Path, default=None, help="read/write the anchor embeddings here"
    )
    parser.add_argument("--noise", type=float, default=0.035, help="per-dimension noise (norm ≈ noise·√384)")
    parser.add_argument(
        "--factories", nargs="+", default=["Flat", "HNSW32", "OPQ48_192,IVF{nlist},PQ48,Refine(SQ8)"]
    )
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build-threads", type=int, default=faiss.omp_get_max_threads())
    options = parser.parse_args()

    anchors = anchor_embeddings(options.anchors, options.anchors_npy)
    for n in options.sizes:
        base = clustered_vectors(anchors, n, options.noise, seed=1)
        queries = clustered_vectors(anchors, options.queries, options.noise, seed=2)
        ids = np.arange(n, dtype=np.int64)
        faiss.omp_set_num_threads(1)
        exact, _ = build_index(base, ids, "Flat")
        _, truth = exact.search(queries, 10)
        for template in options.factories:
            factory = template.format(nlist=1 << round(np.log2(8 * np.sqrt(n))))
            faiss.omp_set_num_threads(options.build_threads)
            started = time.perf_counter()
            index, used = build_index(base, ids, factory)
            build_s = time.perf_counter() - started
            faiss.omp_set_num_threads(1)
            variants = [(used, index, None)]  # (name, index, float32 vectors to re-score its candidates with)
            if isinstance(index, faiss.IndexRefine):
                unrefined = split_refine(used)[0]
                alone = faiss.deserialize_index(faiss.serialize_index(faiss.downcast_index(index.base_index)))
                variants = [
                    (unrefined, alone, None),
                    *variants,
                    (f"{unrefined} + float32 re-score", alone, base),
                ]
            for name, variant, rescore in variants:
                index_bytes = faiss.serialize_index(variant).nbytes
                if "HNSW" in name:
                    settings = [{"ef_search": ef} for ef in options.ef_search]
                elif "IVF" in name and (isinstance(variant, faiss.IndexRefine) or rescore is not None):
                    settings = [
                        {"nprobe": p, "k_factor": f} for p in options.nprobe for f in options.k_factor
                    ]
                elif "IVF" in name:
                    settings = [{"nprobe": p} for p in options.nprobe]
                else:
                    settings = [{}]
                for setting in settings:
                    top10_ids(variant, queries[:20], setting, rescore)  # warm-up
                    run = partial(top10_ids, variant, queries, setting, rescore)
                    found, ms = best_time_ms(run, len(queries), options.repeats)
                    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
                    row = {"n": n, "factory": name, "build_s": round(build_s, 1)}
                    row |= {"build_threads": options.build_threads, "index_bytes": index_bytes}
                    row |= {"index_mb": round(index_bytes / 1e6, 1)}
                    row |= {"float_bytes": rescore.nbytes} if rescore is not None else {}
                    row |= setting or {"search": "exact"}
                    row |= {"recall@10": round(float(recall), 4), "ms_per_query": round(ms, 3)}
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
