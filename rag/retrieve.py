"""Semantic retrieval: embed the question, search FAISS, return the chunks with their citations."""

from dataclasses import dataclass
from datetime import date

from rag.embed import Embedder
from rag.index import search
from rag.store import ChunkStore

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
    """Reads a committed store generation once and answers semantic searches over it."""

    def __init__(self, store: ChunkStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder
        self.manifest = store.read_manifest()
        self.index = store.read_index(self.manifest)
        chunks = store.read_chunks(self.manifest, columns=CHUNK_COLUMNS)
        self.rows = chunks.to_pylist()
        self.row_of_id = {row["chunk_id"]: i for i, row in enumerate(self.rows)}

    def semantic(self, question: str, k: int) -> list[Hit]:
        query = self.embedder.encode([question])
        scores, ids = search(self.index, query, k, exclude_ids=self.manifest.tombstones)
        return [
            self._hit(int(chunk_id), float(score))
            for score, chunk_id in zip(scores[0], ids[0], strict=True)
            if chunk_id >= 0
        ]

    def _hit(self, chunk_id: int, score: float) -> Hit:
        return Hit(**self.rows[self.row_of_id[chunk_id]], score=score)
