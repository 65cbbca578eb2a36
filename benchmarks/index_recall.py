"""Index build time, recall@10 against exact search and ms/query (one thread) for Flat, HNSW32 and IVF+OPQ.

    .venv/bin/python benchmarks/index_recall.py --sizes 100000 200000 [--queries 500]

Vectors: 384-d, unit length, drawn around real MiniLM embeddings of synthetic corpus chunks (corpora/
synthetic.py): `--anchors` chunks are embedded for real and every vector is an anchor plus Gaussian noise,
renormalized, so the set has the clustered structure of real text embeddings. Embedding 200K chunks for real
takes hours on a 2-core CPU; uniform random vectors would be a worst case that says little.
`--anchors-npy FILE` keeps the anchor embeddings in FILE (read if it exists, else computed and written), so a
machine without the embedder can run the index part.

Builds use `--build-threads` (default: every core); searches run with one thread, all queries in one call.
HNSW is searched at every `--ef-search`, IVF at every `--nprobe`, each passed to `rag.index.search`.
"""

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from corpora.synthetic import synthetic_records
from rag.index import build_index, search


def clustered_vectors(anchors: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = anchors[rng.integers(len(anchors), size=n)]
    vectors = vectors + rng.standard_normal(vectors.shape).astype(np.float32) * noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def anchor_embeddings(n_anchors: int, cache: Path | None) -> np.ndarray:
    """Real MiniLM embeddings of `n_anchors` synthetic chunks (from `cache` when it holds them)."""
    if cache is not None and cache.exists():
        anchors = np.load(cache)
        print(json.dumps({"anchors": len(anchors), "from": str(cache)}), flush=True)
        return anchors[:n_anchors]
    from rag.embed import load_embedder

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
    parser.add_argument("--factories", nargs="+", default=["Flat", "HNSW32", "OPQ48_192,IVF{nlist},PQ48"])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
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
            index_mb = faiss.serialize_index(index).nbytes / 1e6
            faiss.omp_set_num_threads(1)
            if "HNSW" in used:
                settings = [("efSearch", ef) for ef in options.ef_search]
            elif "IVF" in used:
                settings = [("nprobe", p) for p in options.nprobe]
            else:
                settings = [("search", "exact")]
            for name, value in settings:
                kwargs = {"ef_search": value} if name == "efSearch" else {}
                kwargs |= {"nprobe": value} if name == "nprobe" else {}
                search(index, queries[:20], 10, **kwargs)  # warm-up
                started = time.perf_counter()
                _, found = search(index, queries, 10, **kwargs)
                ms = (time.perf_counter() - started) * 1000 / len(queries)
                recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
                row = {
                    "n": n,
                    "factory": used,
                    "build_s": round(build_s, 1),
                    "build_threads": options.build_threads,
                }
                row |= {"index_mb": round(index_mb, 1), name: value, "recall@10": round(float(recall), 4)}
                row |= {"ms_per_query": round(ms, 3)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
