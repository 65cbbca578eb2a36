"""Lexical search with BM25 (bm25s): exact words and codes that embeddings blur (LHC-4471, idle_timeout)."""

import re

import bm25s

# Words plus codes kept whole: "LHC-4471", "RW-2.14", "idle_timeout_minutes", "3.8.1" are single terms,
# and their parts are indexed too, so "4471" alone still matches.
_TOKEN = re.compile(r"\w+(?:[-_.@]\w+)*")
_STOPWORDS = frozenset(bm25s.stopwords.STOPWORDS_EN)


def bm25_terms(text: str) -> list[str]:
    terms: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        whole = match.group(0)
        terms.append(whole)
        parts = re.split(r"[-_.@]", whole)
        if len(parts) > 1:
            terms.extend(part for part in parts if len(part) > 1)
    return [term for term in terms if term not in _STOPWORDS]


class BM25Index:
    """A BM25 index over chunk texts; search returns (row, score) in descending score order."""

    def __init__(self, texts: list[str]) -> None:
        self.n_docs = len(texts)
        self.model = bm25s.BM25()
        self.model.index([bm25_terms(text) or ["\0"] for text in texts], show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        terms = bm25_terms(query)
        k = min(k, self.n_docs)
        if not terms or k == 0:
            return []
        rows, scores = self.model.retrieve([terms], k=k, show_progress=False, n_threads=1)
        return [(int(row), float(score)) for row, score in zip(rows[0], scores[0], strict=True)]
