"""Relevance × recency: the design's linear blend `(1 - w) · relevance + w · recency` with an exponential
half-life, inside the time window a question names."""

from dataclasses import dataclass
from datetime import date

from dsarag.rag.query_features import TimeWindow
from dsarag.rag.retrieve import Hit

RECENCY_WEIGHT = 0.5
HALF_LIFE_DAYS = 365.0


@dataclass(frozen=True)
class RecencyBlend:
    weight: float = RECENCY_WEIGHT
    half_life_days: float = HALF_LIFE_DAYS

    def recency(self, when: date, reference: date, window: TimeWindow | None) -> float:
        """1 at the reference date (and anywhere inside a closed window such as "in 2023": the question
        asks about the whole period), halving every half-life before it; 0 after the window's end (a
        document written later cannot be the answer "as of" or "in" that period)."""
        if window is not None and window.end is not None:
            if when > window.end:
                return 0.0
            if window.start is not None:
                reference = window.start
        age_days = max(0, (reference - when).days)
        return 0.5 ** (age_days / self.half_life_days)

    def rerank(
        self, hits: list[Hit], window: TimeWindow | None, newest: date, undated: frozenset[str] = frozenset()
    ) -> list[Hit]:
        """Hits re-scored and sorted by the blend; relevance is min-max normalized over the candidates so the
        weight means the same for cosine, BM25 or fused scores. Documents in `undated` (paths) have no date
        of their own: they get the candidates' mean recency, neither promoted nor demoted by it."""
        if not hits:
            return []
        reference = window.end if window is not None and window.end is not None else newest
        scores = [hit.score for hit in hits]
        low, high = min(scores), max(scores)
        recency = {
            hit.chunk_id: self.recency(hit.date, reference, window) for hit in hits if hit.path not in undated
        }
        neutral = sum(recency.values()) / len(recency) if recency else 0.5
        blended = []
        for hit in hits:
            relevance = (hit.score - low) / (high - low) if high > low else 1.0
            score = (1 - self.weight) * relevance + self.weight * recency.get(hit.chunk_id, neutral)
            blended.append(Hit(**{**vars(hit), "score": round(score, 6)}))
        return sorted(blended, key=lambda hit: -hit.score)
