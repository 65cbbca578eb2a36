"""Scores shared by the eval suites: answer matching (SQuAD's normalization), ranking metrics, percentiles."""

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, articles or extra spaces (SQuAD's rule); "1,140" reads as "1140"."""
    text = _THOUSANDS.sub("", text.lower())
    text = "".join(char for char in text if char not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def strip_citations(text: str) -> str:
    """The reply without its [n] source markers, which are not part of the answer."""
    return re.sub(r"\s*\[\d+\]", "", text)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals one of the normalized answers."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best word-overlap F1 of the prediction against any of the answers."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not predicted and not gold:
            best = 1.0
    return best


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when one normalized answer appears in the normalized prediction (for chatty generators)."""
    normalized = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(answer)} " in normalized for answer in answers if answer.strip()))


def recall_at_k(ranked: Sequence[str], relevant: dict[str, float], k: int) -> float:
    """Share of the relevant documents among the first k."""
    positive = {doc for doc, grade in relevant.items() if grade > 0}
    if not positive:
        return 0.0
    return len(positive.intersection(ranked[:k])) / len(positive)


def reciprocal_rank(ranked: Sequence[str], relevant: dict[str, float], k: int = 10) -> float:
    """1 / rank of the first relevant document within the first k, else 0."""
    for rank, doc in enumerate(ranked[:k], start=1):
        if relevant.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: dict[str, float], k: int = 10) -> float:
    """Normalized discounted cumulative gain with graded relevance (gain = grade), as in BEIR."""
    gains = [relevant.get(doc, 0.0) for doc in ranked[:k]]
    dcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))
    ideal = sorted((grade for grade in relevant.values() if grade > 0), reverse=True)[:k]
    idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """{"p50": …, "p95": …, "p99": …} (linear interpolation), empty for no values."""
    if not values:
        return {}
    return {f"p{point}": float(np.percentile(values, point)) for point in points}


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
