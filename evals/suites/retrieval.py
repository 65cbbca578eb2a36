"""`retrieval`: recall@k, MRR@10 and nDCG@10 of document retrieval per index type and search parameters.

Data: `--data` a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv), or a QA JSONL file whose
"doc_ids" name the relevant documents (with `--corpus`); default the demo corpus and its questions. The
corpus is chunked and embedded once into `<out>/retrieval/store`; each setting builds its own FAISS index
from those embeddings (or runs BM25 / hybrid RRF), searches one query at a time (latency p50 / p95) and ranks
documents by their best chunk. Settings: `--indexes "Flat" "HNSW32:efSearch=128" "IVF64,Flat:nprobe=8" bm25
hybrid`; default a sweep chosen from the corpus size.
"""

import math
import re
import time
from dataclasses import dataclass

import numpy as np

from dsarag.base.errors import BadInputError
from dsarag.corpora.corpus_files import CorpusColumns
from dsarag.evals.datasets import DEMO_QA, load_beir, load_qa
from dsarag.evals.metrics import mean, ndcg_at_k, percentiles, recall_at_k, reciprocal_rank
from dsarag.evals.qa_corpus import doc_of, qa_retriever
from dsarag.evals.run import SuiteResult, SuiteRun, timed
from dsarag.rag.fusion import reciprocal_rank_fusion
from dsarag.rag.index import build_index, search
from dsarag.rag.ingest import IngestOptions, ingest
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore

NAME = "retrieval"
DESCRIPTION = "recall@k, MRR and nDCG@10 per index type and parameters, with query latency"
THRESHOLDS = ["best.ndcg@10>=0.5"]
CUTOFFS = (1, 5, 10)
CHUNK_DEPTH = 40  # chunks fetched per query, enough for 10 distinct documents in practice


@dataclass(frozen=True)
class Setting:
    spec: str  # "FACTORY[:efSearch=N|nprobe=N]", "bm25" or "hybrid"

    @property
    def label(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.spec.lower()).strip("-")

    @property
    def factory(self) -> str:
        return self.spec.split(":", 1)[0]

    @property
    def params(self) -> dict[str, int]:
        if ":" not in self.spec:
            return {}
        try:
            pairs = [part.split("=") for part in self.spec.split(":", 1)[1].split(",")]
            params = {name.strip(): int(value) for name, value in pairs}
        except ValueError:
            params = {"?": 0}
        if not set(params) <= {"efSearch", "nprobe"}:
            raise BadInputError(f"--indexes {self.spec!r}: parameters are efSearch=N or nprobe=N, e.g. HNSW32:efSearch=128")  # fmt: skip
        return params


def default_settings(n_chunks: int) -> list[Setting]:
    """Exact search, HNSW at three efSearch values, IVF at two nprobe (when the corpus can train one), BM25, hybrid."""
    specs = ["Flat", *(f"HNSW32:efSearch={ef}" for ef in (CHUNK_DEPTH, 128, 512))]
    nlist = min(round(4 * math.sqrt(n_chunks)), n_chunks // 39)  # ≥ 39 training vectors per list
    if nlist >= 2:
        specs += [f"IVF{nlist},Flat:nprobe=1", f"IVF{nlist},Flat:nprobe={max(2, nlist // 8)}"]
    return [Setting(spec) for spec in (*specs, "bm25", "hybrid")]


def judged_queries(run: SuiteRun) -> tuple[dict[str, str], dict[str, dict[str, float]], Retriever]:
    """(queries, qrels, retriever over the ingested corpus) from a BEIR folder or a QA file with doc_ids."""
    data = run.options.data
    if data is not None and data.is_dir():
        beir = load_beir(data)
        queries = dict(run.limited(list(beir.queries.items())))
        store = ChunkStore(run.folder / "store")
        columns = CorpusColumns(text="text", id="_id", title="title")
        with run.console.status("ingesting the corpus"):
            ingest([beir.corpus], store, run.embedder(), IngestOptions(columns=columns), run.console)
        return queries, {qid: beir.qrels[qid] for qid in queries}, Retriever(store, run.embedder())
    items = load_qa(data or DEMO_QA)
    retriever = qa_retriever(run, items)  # questions with a context get that context's id as their document
    items = run.limited([item for item in items if item.doc_ids])
    if not items:
        raise BadInputError(
            f'{data}: no question names its documents — give "doc_ids", or pass a BEIR folder', data
        )
    qrels = {item.id: dict.fromkeys(item.doc_ids, 1.0) for item in items}
    return {item.id: item.question for item in items}, qrels, retriever


def ranked_documents(chunk_paths: list[str], depth: int = 100) -> list[str]:
    return list(dict.fromkeys(doc_of(path) for path in chunk_paths))[:depth]


def resolve(ranked: list[str], judged: dict[str, float]) -> list[str]:
    """Map store paths to the qrels' document names where they differ only by root ("docs/faq.md")."""
    names = {}
    for doc in ranked:
        names[doc] = next((gold for gold in judged if doc == gold or doc.endswith("/" + gold) or gold.endswith("/" + doc)), doc)  # fmt: skip
    return [names[doc] for doc in ranked]


def evaluate(setting: Setting, retriever: Retriever, queries: dict[str, str], vectors: np.ndarray,
             qrels: dict[str, dict[str, float]]) -> dict:  # fmt: skip
    """Build (when it is a FAISS setting) and search; per-setting ranking metrics and latency."""
    build_s = 0.0
    if setting.spec not in ("bm25", "hybrid"):
        started = time.perf_counter()
        ids = np.array([row["chunk_id"] for row in retriever.rows], dtype=np.int64)
        index, _ = build_index(retriever.embeddings, ids, setting.factory)
        build_s = time.perf_counter() - started
    scores: dict[str, list[float]] = {"mrr@10": [], "ndcg@10": [], **{f"recall@{k}": [] for k in CUTOFFS}}
    latencies = []
    for position, (qid, text) in enumerate(queries.items()):
        started = time.perf_counter()
        if setting.spec == "bm25":
            paths = [hit.path for hit in retriever.lexical(text, CHUNK_DEPTH)]
        elif setting.spec == "hybrid":
            scores_, found = search(retriever.index, vectors[position : position + 1], CHUNK_DEPTH)
            dense = [
                retriever.hit(int(i), float(v)) for v, i in zip(scores_[0], found[0], strict=True) if i >= 0
            ]
            paths = [
                hit.path for hit in reciprocal_rank_fusion([dense, retriever.lexical(text, CHUNK_DEPTH)])
            ]
        else:
            _, found = search(index, vectors[position : position + 1], CHUNK_DEPTH, **_search_params(setting))
            paths = [retriever.rows[retriever.row_of_id[int(i)]]["path"] for i in found[0] if i >= 0]
        latencies.append(1e3 * (time.perf_counter() - started))
        ranked = resolve(ranked_documents(paths), qrels[qid])
        scores["mrr@10"].append(reciprocal_rank(ranked, qrels[qid], 10))
        scores["ndcg@10"].append(ndcg_at_k(ranked, qrels[qid], 10))
        for k in CUTOFFS:
            scores[f"recall@{k}"].append(recall_at_k(ranked, qrels[qid], k))
    latency = percentiles(latencies, (50, 95))
    return {
        "setting": setting.spec,
        "label": setting.label,
        **{name: mean(values) for name, values in scores.items()},
        "p50_ms": latency["p50"],
        "p95_ms": latency["p95"],
        "build_s": round(build_s, 3),
    }


def _search_params(setting: Setting) -> dict:
    params = setting.params
    return {key: value for key, value in (("ef_search", params.get("efSearch")), ("nprobe", params.get("nprobe"))) if value}  # fmt: skip


def run(run: SuiteRun) -> SuiteResult:
    queries, qrels, retriever = judged_queries(run)
    settings = [Setting(spec) for spec in run.options.indexes] if run.options.indexes else default_settings(len(retriever.rows))  # fmt: skip
    for setting in settings:
        _ = setting.params  # a malformed spec fails before the searches start
    vectors = retriever.embedder.encode(list(queries.values()))
    # Queries are embedded once, outside the timings: latency is the search alone (FAISS, BM25 or both).
    rows = []
    for number, setting in enumerate(settings, start=1):
        run.progress(number, len(settings), setting.spec)
        rows.append(run.log.run(setting.label, lambda setting=setting: timed(lambda: evaluate(setting, retriever, queries, vectors, qrels))))  # fmt: skip
    metrics: dict[str, float] = {}
    for row in rows:
        for name in ("ndcg@10", "recall@10", "p50_ms"):  # the rest is in the table
            metrics[f"{name}.{row['label']}"] = row[name]
    metrics["best.ndcg@10"] = max(row["ndcg@10"] for row in rows)
    metrics["best.recall@10"] = max(row["recall@10"] for row in rows)
    table = [
        {key: value for key, value in row.items() if key not in ("key", "label", "seconds")} for row in rows
    ]
    details = {"queries": len(queries), "chunks": len(retriever.rows), "documents": len({doc_of(r["path"]) for r in retriever.rows})}  # fmt: skip
    return SuiteResult(metrics, table, [], details)
