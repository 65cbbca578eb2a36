"""Retrieval over one committed store generation: dense (FAISS) and lexical (BM25) search → hits with citations."""

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property
from pathlib import PurePosixPath

import numpy as np

from dsarag.corpora.corpus_files import CORPUS_KINDS
from dsarag.rag.bm25 import BM25Index
from dsarag.rag.embed import Embedder
from dsarag.rag.index import search
from dsarag.rag.store import ChunkStore, embeddings_of

CHUNK_COLUMNS = ["chunk_id", "path", "text", "char_start", "char_end", "line_start", "line_end", "date"]
TITLE_MAX_WORDS = 12  # a document's first line longer than this is prose, not its title
_QUALIFIER = re.compile(r"\s*\([^()]*\)$")  # "Woman's Viewpoint (magazine)" is also "Woman's Viewpoint"


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
                store.read_chunks(manifest, columns=[*CHUNK_COLUMNS, "title", "embedding"]),
            )
        )
        self.embeddings = embeddings_of(chunks)  # row i ↔ self.rows[i]; for near-duplicate checks
        self.rows = chunks.drop_columns(["title", "embedding"]).to_pylist()
        self.record_titles = chunks.column("title").to_pylist()  # a corpus record's title column, else None
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

    def best_chunks_of(self, paths: list[str], question: str) -> list[Hit]:
        """For each document of `paths`, its chunk closest to the question."""
        if not paths:
            return []
        vector = self.embedder.encode([question])[0]
        hits = []
        for path in paths:
            rows = self.rows_of_path[path]
            scores = self.embeddings[rows] @ vector
            best = int(np.argmax(scores))
            hits.append(Hit(**self.rows[rows[best]], score=float(scores[best])))
        return hits

    @cached_property
    def rows_of_path(self) -> dict[str, list[int]]:
        rows: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            rows.setdefault(row["path"], []).append(i)
        return rows

    @cached_property
    def documents_titled(self) -> dict[str, list[str]]:
        """Each title → the documents it names: a document's first line when it reads as a heading, a file's
        name with underscores as spaces, a corpus record's title column; each also without a "(qualifier)"."""
        documents: dict[str, list[str]] = {}
        for path, rows in self.rows_of_path.items():
            first = min(rows, key=lambda row: self.rows[row]["char_start"])
            line = self.rows[first]["text"].strip().split("\n", 1)[0].lstrip("#").strip()
            file, _, record = path.partition("#")
            # A corpus file's record ("notes.jsonl#r7"): the file's name is not its title.
            is_record = bool(record) and PurePosixPath(file).suffix.lower() in CORPUS_KINDS
            names = (
                {self.record_titles[first] or ""}
                if is_record
                else {PurePosixPath(path).stem.replace("_", " ")}
            )
            if len(line.split()) <= TITLE_MAX_WORDS and not line.endswith("."):
                names.add(line)
            for name in names | {_QUALIFIER.sub("", name) for name in names}:
                if len(name.strip()) >= 4:
                    documents.setdefault(name.strip(), []).append(path)
        return documents

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
