"""Ingest pipeline throughput and peak memory at growing corpus sizes, against raw encoding.

    .venv/bin/python benchmarks/ingest_scale.py --records 250 500 1000 [--batch-chunks 256]
        [--workers 0 1 default] [--encode-limit 20000] [--fresh-encode]

For each size: a synthetic JSONL corpus (corpora/synthetic.py, seed 0) is ingested by `dsarag ingest` in a
fresh process, once per `--workers` setting (peak RSS of that process from wait4; the read/chunk workers are
separate processes and not counted), then `Embedder.encode` alone embeds the very chunk texts the store holds,
in this process (model loaded and warmed up, once per size). Flat peak RSS across sizes = bounded memory;
ingest chunks/s ÷ encode chunks/s = pipeline efficiency. Raw encode uses the pipeline's batch size (256 on a
GPU, 64 on a CPU); `--encode-limit` encodes only the first N texts (the rate is what is compared).
`--workers` values go to `dsarag ingest --workers` ("default": its own, usable cores − 1). Restrict the cores
with `taskset` and hide the GPU with `CUDA_VISIBLE_DEVICES=` to measure a laptop-sized CPU. `embed_s` and
`index_s` are the pipeline's own time inside `encode` (the first call loads the model) and in the index update.

`--fresh-encode` also encodes the same texts in a fresh process, as the pipeline would (slices of
`--batch-chunks`), timing the import of sentence-transformers, the model load and each slice: what the
pipeline pays before its first vector that raw encode (model already warm) does not.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsarag.corpora.synthetic import write_synthetic_jsonl
from dsarag.rag.embed import load_embedder
from dsarag.rag.store import ChunkStore

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath}


def _setting() -> dict:
    return {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
    }


def run_ingest(corpus: Path, store: Path, batch_chunks: int, workers: str) -> tuple[dict, int]:
    """`dsarag ingest --json` in a fresh process: its report and its peak RSS in MB."""
    command = [sys.executable, "-m", "dsarag.cli.app", "ingest", str(corpus), "--store", str(store), "--json"]
    command += ["--id-column", "id", "--title-column", "title", "--date-column", "date"]
    command += ["--batch-chunks", str(batch_chunks)]
    if workers != "default":
        command += ["--workers", workers]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = process.stdout.read()
    _, _, usage = os.wait4(process.pid, 0)
    return json.loads(out), round(usage.ru_maxrss / 1024)


def fresh_encode(texts: list[str], batch_chunks: int, folder: Path) -> dict:
    """Encode `texts` in a new process, timed by phase (see `child_encode`)."""
    texts_file = folder / "texts.json"
    texts_file.write_text(json.dumps(texts))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child-encode", str(texts_file), "--batch-chunks", str(batch_chunks)],
        env=_env(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    wall_s = time.perf_counter() - started
    return json.loads(out) | {"fresh_wall_s": round(wall_s, 1)}


def child_encode(texts_file: Path, batch_chunks: int) -> None:
    texts = json.loads(texts_file.read_text())
    started = time.perf_counter()
    import sentence_transformers  # noqa: F401 - timed: the import the pipeline's first encode pays

    imported = time.perf_counter()
    embedder = load_embedder()
    batch_size = 256 if embedder.on_gpu else 64  # on_gpu loads the model
    loaded = time.perf_counter()
    slices = []
    for first in range(0, len(texts), batch_chunks):
        slice_started = time.perf_counter()
        embedder.encode(texts[first : first + batch_chunks], batch_size=batch_size)
        slices.append(round(time.perf_counter() - slice_started, 2))
    print(
        json.dumps(
            {
                "fresh_import_s": round(imported - started, 1),
                "fresh_load_s": round(loaded - imported, 1),
                "fresh_slice_s": slices,
                "fresh_encode_s": round(sum(slices), 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--batch-chunks", type=int, default=256)
    parser.add_argument(
        "--workers",
        nargs="+",
        default=["default"],
        help="read/chunk processes of `dsarag ingest`, one run each: numbers or 'default'",
    )
    parser.add_argument("--encode-limit", type=int, default=None, help="raw encode: only the first N texts")
    parser.add_argument("--fresh-encode", action="store_true", help="also encode in a fresh process")
    parser.add_argument("--child-encode", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child_encode:
        child_encode(options.child_encode, options.batch_chunks)
        return
    embedder = load_embedder()
    embedder.encode(["warm-up"])
    batch_size = 256 if embedder.on_gpu else 64
    for n_records in options.records:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_synthetic_jsonl(Path(tmp) / "corpus.jsonl", n_records)
            corpus_mb = corpus.stat().st_size / 1e6
            raw = None
            for run, workers in enumerate(options.workers):
                store = Path(tmp) / f"store{run}"
                report, peak_rss_mb = run_ingest(corpus, store, options.batch_chunks, workers)
                if raw is None:  # once per size: the texts are the same for every setting
                    chunk_store = ChunkStore(store)
                    manifest = chunk_store.read_manifest()
                    texts = chunk_store.read_chunks(manifest, ["text"]).column("text").to_pylist()
                    encoded = texts[: options.encode_limit] if options.encode_limit else texts
                    started = time.perf_counter()
                    embedder.encode(encoded, batch_size=batch_size)
                    raw = {"encoded": len(encoded), "rate": len(encoded) / (time.perf_counter() - started)}
                pipeline_s = report["seconds"]
                pipeline_rate = report["chunks_embedded"] / pipeline_s
                row = {
                    "records": n_records,
                    "corpus_mb": round(corpus_mb, 2),
                    "workers": workers,
                    **_setting(),
                    "chunks": report["chunks_embedded"],
                    "tokens": report["tokens_embedded"],
                    "batches": report["batches_committed"],
                    "ingest_s": round(pipeline_s, 1),
                    "ingest_chunks_per_s": round(pipeline_rate, 1),
                    "ingest_tokens_per_s": round(report["tokens_embedded"] / pipeline_s),
                    "encode_chunks": raw["encoded"],
                    "encode_chunks_per_s": round(raw["rate"], 1),
                    "ratio": round(pipeline_rate / raw["rate"], 3),
                    "embed_s": round(report["embed_seconds"], 1),
                    "index_s": round(report["index_seconds"], 1),
                    "index": report["index_factory"],
                    "device": "cuda" if embedder.on_gpu else "cpu",
                    "peak_rss_mb": peak_rss_mb,
                }
                print(json.dumps(row), flush=True)
                shutil.rmtree(store, ignore_errors=True)
            if options.fresh_encode:
                fresh = fresh_encode(texts, options.batch_chunks, Path(tmp))
                print(
                    json.dumps({"records": n_records, "chunks": len(texts), **_setting(), **fresh}),
                    flush=True,
                )


if __name__ == "__main__":
    main()
