"""The models and open stores a long-lived process (`dsarag serve`) keeps loaded between questions."""

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from dsarag.rag.embed import Embedder
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore

if TYPE_CHECKING:
    from dsarag.indexer_model.generate import Generator

OPEN_STORES = 4  # retrievers kept open (FAISS index + chunk rows + BM25), least recently used dropped first


class WarmModels:
    """One generator, the embedder, and a retriever per recently asked store, reopened when the store commits."""

    def __init__(self, generator: "Generator", embedder: Embedder) -> None:
        self.generator, self.embedder = generator, embedder
        self._retrievers: OrderedDict[Path, tuple[tuple[int, int, int], Retriever]] = OrderedDict()
        self._lock = threading.Lock()

    def retriever(self, store: ChunkStore) -> Retriever:
        """The store's retriever, reopened when its manifest was replaced since (every commit renames a new one
        over it, so its inode, size or mtime changes)."""
        if not store.exists():
            return Retriever(store, self.embedder)  # raises the store's own error: missing, naming the fix
        stat = store.manifest_path.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        folder = store.folder.resolve()
        with self._lock:
            cached = self._retrievers.get(folder)
            if cached is not None and cached[0] == key:
                self._retrievers.move_to_end(folder)
                return cached[1]
        retriever = Retriever(store, self.embedder)
        with self._lock:
            self._retrievers[folder] = (key, retriever)
            self._retrievers.move_to_end(folder)
            while len(self._retrievers) > OPEN_STORES:
                self._retrievers.popitem(last=False)
        return retriever

    @property
    def open_stores(self) -> list[str]:
        with self._lock:
            return [str(folder) for folder in self._retrievers]
