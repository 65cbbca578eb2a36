"""Ingest pipeline throughput and peak memory at growing corpus sizes, against raw encoding.

    .venv/bin/python benchmarks/ingest_scale.py --records 250 500 1000 [--batch-chunks 256]

For each size: a synthetic JSONL corpus (corpora/synthetic.py, seed 0) is ingested by `dsarag ingest` in a
fresh process (peak RSS of that process from wait4; the read/chunk worker is a separate process and not
counted), then `Embedder.encode` alone embeds the very chunk texts the store holds, in this process.
Flat peak RSS across sizes = bounded memory; ingest chunks/s ÷ encode chunks/s = pipeline efficiency.
Raw encode uses the pipeline's batch size (256 on a GPU, 64 on a CPU). `--workers` is passed to `dsarag ingest`
(default: its own, cores − 1); restrict the cores with `taskset` and hide the GPU with `CUDA_VISIBLE_DEVICES=`
to measure a laptop-sized CPU. `embed_s` and `index_s` are the pipeline's own time inside `encode` (the first
call loads the model) and in the index update.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpora.synthetic import write_synthetic_jsonl
from rag.embed import load_embedder
from rag.store import ChunkStore

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--batch-chunks", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="read/chunk processes of `dsarag ingest`")
    options = parser.parse_args()
    embedder = load_embedder()
    embedder.encode(["warm-up"])
    for n_records in options.records:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_synthetic_jsonl(Path(tmp) / "corpus.jsonl", n_records)
            corpus_mb = corpus.stat().st_size / 1e6
            store = Path(tmp) / "store"
            command = [
                sys.executable,
                "-m",
                "cli.app",
                "ingest",
                str(corpus),
                "--store",
                str(store),
                "--json",
            ]
            command += ["--id-column", "id", "--title-column", "title", "--date-column", "date"]
            command += ["--batch-chunks", str(options.batch_chunks)]
            if options.workers is not None:
                command += ["--workers", str(options.workers)]
            pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            process = subprocess.Popen(
                command,
                env={**os.environ, "PYTHONPATH": pythonpath},
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            out = process.stdout.read()
            _, status, usage = os.wait4(process.pid, 0)
            report = json.loads(out)
            chunk_store = ChunkStore(store)
            texts = chunk_store.read_chunks(chunk_store.read_manifest(), ["text"]).column("text").to_pylist()
            started = time.perf_counter()
            embedder.encode(texts, batch_size=256 if embedder.on_gpu else 64)
            encode_s = time.perf_counter() - started
        pipeline_s = report["seconds"]
        row = {
            "records": n_records,
            "corpus_mb": round(corpus_mb, 2),
            "chunks": report["chunks_embedded"],
            "tokens": report["tokens_embedded"],
            "batches": report["batches_committed"],
            "ingest_s": round(pipeline_s, 1),
            "ingest_chunks_per_s": round(report["chunks_embedded"] / pipeline_s, 1),
            "ingest_tokens_per_s": round(report["tokens_embedded"] / pipeline_s),
            "encode_chunks_per_s": round(len(texts) / encode_s, 1),
            "ratio": round(encode_s / pipeline_s, 3),
            "embed_s": round(report["embed_seconds"], 1),
            "index_s": round(report["index_seconds"], 1),
            "index": report["index_factory"],
            "device": "cuda" if embedder.on_gpu else "cpu",
            "peak_rss_mb": round(usage.ru_maxrss / 1024),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
