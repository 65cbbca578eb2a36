"""Retrieval over one committed store generation: dense (FAISS) and lexical (BM25) search → hits with citations."""

from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property

import numpy as np

from dsarag.rag.bm25 import BM25Index
from dsarag.rag.embed import Embedder
from dsarag.rag.index import search
from dsarag.rag.store import ChunkStore, embeddings_of

CHUNK_COLUMNS = ["chunk_id", "path", "text", "char_start", "char_end", "line_start", "line_end", "date"]


@dataclass
class Hit:
    chunk_id: int
    path: str
    text: str
    char_start: int
    char_end: int
    line_start: int
    line_end: int
    date: date
    score: float

    @property
    def citation(self) -> str:
        return f"{self.path}:{self.line_start}-{self.line_end}"


class Retriever:
    """Reads a committed store generation once and answers dense and lexical searches over it."""

    def __init__(self, store: ChunkStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder
        # One committed generation, read without the write lock: an ingest may be committing meanwhile.
        self.manifest, self.index, chunks = store.read_committed(
            lambda manifest: (
                manifest,
                store.read_index(manifest),
                store.read_chunks(manifest, columns=[*CHUNK_COLUMNS, "embedding"]),
            )
        )
        self.embeddings = embeddings_of(chunks)  # row i ↔ self.rows[i]; for near-duplicate checks
        self.rows = chunks.drop_columns(["embedding"]).to_pylist()
        self.row_of_id = {row["chunk_id"]: i for i, row in enumerate(self.rows)}

    @cached_property
    def bm25(self) -> BM25Index:
        """Built on first lexical search (≈ 1 s per 10K chunks), so purely dense questions never pay for it."""
        return BM25Index([row["text"] for row in self.rows])

    def semantic(self, question: str, k: int) -> list[Hit]:
        return self.semantic_many([question], k)[0]

    def semantic_many(self, questions: list[str], k: int) -> list[list[Hit]]:
        """Dense search for several queries in one embedding batch."""
        scores, ids = search(
            self.index, self.embedder.encode(questions), k, exclude_ids=self.manifest.tombstones
        )
        return [
            [
                self.hit(int(chunk_id), float(score))
                for score, chunk_id in zip(row_scores, row_ids, strict=True)
                if chunk_id >= 0
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def lexical(self, question: str, k: int) -> list[Hit]:
        """BM25 search; hits with a zero score (no query term in the chunk) are left out."""
        return [
            Hit(**self.rows[row], score=score) for row, score in self.bm25.search(question, k) if score > 0
        ]

    def embedding(self, chunk_id: int) -> np.ndarray:
        return self.embeddings[self.row_of_id[chunk_id]]

    @cached_property
    def undated_paths(self) -> frozenset[str]:
        """Documents whose date is their file's modification day: no date of their own was found (front
        matter, file name), so their date says when the file was copied, not when it was written."""
        return frozenset(
            path
            for path, record in self.manifest.files.items()
            if record.date == datetime.fromtimestamp(record.mtime_ns / 1e9, tz=UTC).date().isoformat()
        )

    @cached_property
    def has_dated_documents(self) -> bool:
        """Whether any document states its own date: without one, a date in a question names a fact of the
        documents (an encyclopedia's "in 2008"), not a time window over them."""
        return any(path not in self.undated_paths for path in self.manifest.files)

    def newest_date(self) -> date:
        """The newest date a document states of itself (the reference for "latest" questions)."""
        dated = [row["date"] for row in self.rows if row["path"] not in self.undated_paths]
        return max(dated or [row["date"] for row in self.rows])

    def hit(self, chunk_id: int, score: float) -> Hit:
        return Hit(**self.rows[self.row_of_id[chunk_id]], score=score)
