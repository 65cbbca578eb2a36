"""Per-layer top-k: one attention budget spread over the layers by how much keys are worth to each layer.

Layers differ: some keep 0.95 of their attention mass with 256 keys, others 0.75 with 512
(docs/dsa-quality.md). Giving the second kind more keys and the first fewer, with the same keys in all,
keeps more mass for the same attention work. A checkpoint records one multiplier of k per layer
(`layer_topk_scales` in its config.json, measured by `dsarag indexer budget`), so any k a caller picks is
spread the same way.
"""

from collections.abc import Mapping, Sequence

SCALES = (1.0, 0.5, 2.0)  # 1.0 first: among equal totals the uniform choice wins
UNITS = {0.5: 1, 1.0: 2, 2.0: 4}  # in halves of k


def allocate_topk_scales(recall: Mapping[int, Sequence[float]], topk: int) -> tuple[float, ...]:
    """Multipliers of `topk`, one per layer, each 1/2, 1 or 2, averaging exactly 1, that maximise the summed
    attention-mass recall. recall[k][layer] is measured at k = topk / 2, topk and 2 * topk. Exact: dynamic
    programming over the layers, the budget counted in halves of topk."""
    for k in (topk // 2, topk, topk * 2):
        if k not in recall:
            raise ValueError(f"recall at k = {k} is needed to spread k = {topk} over layers")
    n_layers = len(recall[topk])
    budget = 2 * n_layers
    best: dict[int, tuple[float, tuple[float, ...]]] = {0: (0.0, ())}  # units spent -> (recall, choices)
    for layer in range(n_layers):
        after: dict[int, tuple[float, tuple[float, ...]]] = {}
        for spent, (total, choices) in best.items():
            for scale in SCALES:
                units = spent + UNITS[scale]
                value = total + recall[int(topk * scale)][layer]
                if units <= budget and (units not in after or value > after[units][0] + 1e-12):
                    after[units] = (value, (*choices, scale))
        best = after
    return best[budget][1]


def budget_recall(recall: Mapping[int, Sequence[float]], topk: int, scales: Sequence[float]) -> float:
    """Mean recall over layers when layer i keeps topk * scales[i] keys."""
    return sum(recall[int(topk * scale)][layer] for layer, scale in enumerate(scales)) / len(scales)
