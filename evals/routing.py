"""Routing: does the agent retrieve when it should, with the right strategy? The labelled questions of
`evals/data/routing.jsonl` (about the demo corpus) and the decide and plan nodes' own functions; run through
`dsarag eval run routing` and `dsarag eval run temporal` (evals/suites/).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from dsarag.evals.datasets import ROUTING_SET
from dsarag.indexer_model.generate import Generator
from dsarag.rag.query_features import query_features
from dsarag.rag.retrieve import Retriever
from dsarag.rag.route import choose_strategy, decide_retrieval, label_scores


def load_routing_set(path: Path = ROUTING_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Routed:
    question: str
    expected: str  # the labelled strategy ("none" = no retrieval)
    predicted: str
    reason: str

    @property
    def correct(self) -> bool:
        return self.expected == self.predicted


def route(question: str, retriever: Retriever, generator: Generator) -> tuple[str, str]:
    """The strategy the agent's decide and plan nodes would take ("none" = answer without retrieval)."""
    features = query_features(question)
    best = retriever.semantic(question, 1)
    scores = label_scores(question, generator, ("retrieval", "strategy"))
    decision = decide_retrieval(features, best[0].score if best else 0.0, scores["retrieval"])
    if decision.choice == "no_retrieve":
        return "none", decision.reason
    strategy = choose_strategy(features, scores["strategy"], retriever.has_dated_documents)
    return strategy.choice, f"{decision.reason}; {strategy.reason}"


def evaluate_routing(rows: list[dict], retriever: Retriever, generator: Generator) -> list[Routed]:
    routed = []
    for row in rows:
        predicted, reason = route(row["question"], retriever, generator)
        routed.append(Routed(row["question"], row["strategy"], predicted, reason))
    return routed


def newest_fact_answered(answer: str, fact: str) -> bool:
    """The fact appears in the answer, ignoring case, spacing and thousands separators."""

    def normalize(text: str) -> str:
        return re.sub(r"(?<=\d),(?=\d{3})|\s+", "", text.lower())

    return normalize(fact) in normalize(answer)
