"""Ingest throughput against raw sentence-transformers encoding of the same chunk texts, side by side.

    .venv/bin/python benchmarks/ingest_throughput.py --docs DIR [--repeat 2]

Prints chunks/s and tokens/s of a full `ingest` (walk, read, chunk, embed, index, commit into a fresh store)
and of `SentenceTransformer.encode` alone on the very chunks that ingest produced, and their ratio.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from dsarag.rag.embed import load_embedder
from dsarag.rag.ingest import ingest_folder
from dsarag.rag.store import ChunkStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is reported")
    options = parser.parse_args()

    embedder = load_embedder()
    embedder.encode(["warm-up"])
    ingest_runs, encode_runs = [], []
    for _ in range(options.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            store = ChunkStore(Path(tmp) / "store")
            report = ingest_folder(options.docs, store, embedder)
            ingest_runs.append(report)
            texts = store.read_chunks(store.read_manifest(), columns=["text"]).column("text").to_pylist()
        started = time.perf_counter()
        embedder.encode(texts)
        encode_runs.append(time.perf_counter() - started)

    best = min(ingest_runs, key=lambda report: report.seconds)
    encode_s = min(encode_runs)
    result = {
        "docs": str(options.docs),
        "files": best.files_seen,
        "chunks": best.chunks_embedded,
        "tokens": best.tokens_embedded,
        "ingest_s": round(best.seconds, 2),
        "ingest_chunks_per_s": round(best.chunks_embedded / best.seconds, 1),
        "ingest_tokens_per_s": round(best.tokens_embedded / best.seconds, 1),
        "encode_s": round(encode_s, 2),
        "encode_chunks_per_s": round(best.chunks_embedded / encode_s, 1),
        "encode_tokens_per_s": round(best.tokens_embedded / encode_s, 1),
        "ratio_ingest_to_encode": round(encode_s / best.seconds, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
