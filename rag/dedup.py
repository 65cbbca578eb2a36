"""Query-time dedup: the same chunk found by several rankings (merged by reciprocal-rank fusion), and
near-duplicate chunks — copied paragraphs, a policy and its revision with unchanged sections — judged by
embedding cosine."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rag.fusion import reciprocal_rank_fusion
from rag.retrieve import Hit

NEAR_DUPLICATE_COSINE = 0.95  # all-MiniLM-L6-v2: the same paragraph lightly reworded scores ≈ 0.95–0.99


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
