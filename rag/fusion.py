"""Reciprocal-rank fusion: merge ranked lists by rank alone, so scores on different scales (BM25, cosine)
never have to be compared."""

from dsarag.rag.retrieve import Hit

RRF_K = 60  # the constant of Cormack et al. (2009): damps the weight of the very first ranks


def reciprocal_rank_fusion(rankings: list[list[Hit]], k: int = RRF_K) -> list[Hit]:
    """Hits of all rankings, each scored Σ 1 / (k + rank) over the rankings that hold it (rank from 1),
    best first; a chunk found by several rankings appears once, with its fused score."""
    fused: dict[int, float] = {}
    first_seen: dict[int, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            fused[hit.chunk_id] = fused.get(hit.chunk_id, 0.0) + 1.0 / (k + rank)
            first_seen.setdefault(hit.chunk_id, hit)
    order = sorted(fused, key=lambda chunk_id: -fused[chunk_id])
    return [_with_score(first_seen[chunk_id], fused[chunk_id]) for chunk_id in order]


def _with_score(hit: Hit, score: float) -> Hit:
    return Hit(**{**vars(hit), "score": score})
