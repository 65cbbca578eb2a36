"""Query-time dedup: the same chunk found by several rankings (merged by reciprocal-rank fusion), and
near-duplicate chunks — copied paragraphs, a policy and its revision with unchanged sections — judged by
embedding cosine."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dsarag.rag.fusion import reciprocal_rank_fusion
from dsarag.rag.retrieve import Hit

NEAR_DUPLICATE_COSINE = 0.95  # all-MiniLM-L6-v2: the same paragraph lightly reworded scores ≈ 0.95–0.99
# Two dated versions of one fact (a 2024 and a 2025 price list): measured 0.76–0.90 on the demo corpus,
# while chunks on neighbouring topics stay below ≈ 0.7.
VERSION_COSINE = 0.75


@dataclass
class DedupReport:
    kept: list[Hit]
    same_id: int  # hits merged because several rankings returned the same chunk
    near_duplicates: list[tuple[int, int, float]]  # (dropped id, kept id it repeats, cosine)

    def to_json(self) -> dict:
        return {
            "kept": len(self.kept),
            "same_chunk_merged": self.same_id,
            "near_duplicates_dropped": [
                {"dropped": dropped, "kept": kept, "cosine": cosine}
                for dropped, kept, cosine in self.near_duplicates
            ],
        }


def dedup_rankings(
    rankings: list[list[Hit]],
    embedding_of: Callable[[int], np.ndarray],
    threshold: float = NEAR_DUPLICATE_COSINE,
) -> DedupReport:
    """One ranked list from `rankings` (fused by reciprocal rank when there are several, so a chunk found
    twice appears once), without chunks whose embedding has cosine ≥ `threshold` with a better-ranked one
    of the same date (embeddings are normalized: the inner product is the cosine). Near-identical chunks of
    different dates are versions of a fact over time, not copies: both stay for the recency rerank."""
    merged = rankings[0] if len(rankings) == 1 else reciprocal_rank_fusion(rankings)
    same_id = sum(len(ranking) for ranking in rankings) - len(merged)
    kept: list[Hit] = []
    kept_vectors: list[np.ndarray] = []
    near: list[tuple[int, int, float]] = []
    for hit in merged:
        vector = embedding_of(hit.chunk_id)
        same_date = [i for i, other in enumerate(kept) if other.date == hit.date]
        if same_date:
            cosines = np.stack([kept_vectors[i] for i in same_date]) @ vector
            best = int(np.argmax(cosines))
            if cosines[best] >= threshold:
                near.append((hit.chunk_id, kept[same_date[best]].chunk_id, round(float(cosines[best]), 4)))
                continue
        kept.append(hit)
        kept_vectors.append(vector)
    return DedupReport(kept=kept, same_id=same_id, near_duplicates=near)


def drop_superseded_versions(
    hits: list[Hit], embedding_of: Callable[[int], np.ndarray], threshold: float = VERSION_COSINE
) -> tuple[list[Hit], list[tuple[int, int, float]]]:
    """For a time-bound question, after the recency rerank: drop a chunk that is another dated version of a
    better-ranked chunk (another document and date, cosine ≥ `threshold`). A small model shown the 2024
    and the 2025 price side by side often quotes the wrong one; the rerank already chose the version that
    fits the time asked about. Returns the kept hits and (dropped id, kept id, cosine)."""
    kept: list[Hit] = []
    dropped: list[tuple[int, int, float]] = []
    for hit in hits:
        vector = embedding_of(hit.chunk_id)
        versions = [
            (float(embedding_of(other.chunk_id) @ vector), other)
            for other in kept
            if other.path != hit.path and other.date != hit.date
        ]
        cosine, newer = max(versions, key=lambda item: item[0], default=(0.0, None))
        if newer is not None and cosine >= threshold:
            dropped.append((hit.chunk_id, newer.chunk_id, round(cosine, 4)))
            continue
        kept.append(hit)
    return kept, dropped
