"""Routing eval: does the agent retrieve when it should, with the right strategy, and do temporal questions
get the newest fact? Over `evals/data/routing.jsonl` (questions about the demo corpus, each labelled).

    python -m evals.routing [--model default|tiny] [--limit N] [--no-answers] [--out report.json]

Routing accuracy: decision and strategy both as labelled (the decide and plan nodes' own functions).
Temporal newest-fact accuracy: the full agent's answer contains the labelled fact (and, reported beside it,
whether the fact's source is the top reranked hit).
"""

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from corpora.demo_corpus import DEMO_DOCS
from indexer_model.generate import Generator, load_generator
from rag.ask import AskOptions
from rag.embed import load_embedder
from rag.ingest import ingest_folder
from rag.query_features import query_features
from rag.retrieve import Retriever
from rag.route import choose_strategy, decide_retrieval
from rag.store import ChunkStore

ROUTING_SET = Path(__file__).parent / "data" / "routing.jsonl"


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
    decision = decide_retrieval(question, features, best[0].score if best else 0.0, generator)
    if decision.choice == "no_retrieve":
        return "none", decision.reason
    strategy = choose_strategy(question, features, generator)
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


def evaluate_temporal(rows: list[dict], store: Path, model: str | None) -> list[dict]:
    """Run the full agent on each temporal question; did its answer state the labelled (newest) fact?"""
    from rag.agent import AgentContext, run_agent

    retriever = Retriever(ChunkStore(store), load_embedder())
    generator = load_generator(model)
    results = []
    for row in rows:
        options = AskOptions(question=row["question"], store=store, model=model, max_new_tokens=48)
        state = run_agent(row["question"], AgentContext(options, retriever, generator))
        answer = state["generation"].text.strip()
        top = state["packed"].sources if state.get("packed") else []
        reranked_first = next((entry["top"][0] for entry in state["trace"] if entry["node"] == "rerank"), "")
        results.append(
            {
                "question": row["question"],
                "fact": row["answer"],
                "answer": answer,
                "strategy": state["strategy"],
                "correct": newest_fact_answered(answer, row["answer"]),
                "source_first": reranked_first.startswith(row["source"] + ":"),
                "source_packed": row["source"] in [hit.path for hit in top],
            }
        )
        print(
            f"{'ok ' if results[-1]['correct'] else 'MISS'} {row['question']} → {answer[:80]!r}",
            file=sys.stderr,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default | tiny | …, as `dsarag ask --model`")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--no-answers", action="store_true", help="routing only: skip the temporal answers")
    parser.add_argument("--out", type=Path, default=None, help="also write the full report here (JSON)")
    args = parser.parse_args(argv)

    rows = load_routing_set()[: args.limit]
    store = Path(tempfile.mkdtemp(prefix="dsarag-routing-")) / "store"
    embedder = load_embedder()
    ingest_folder(DEMO_DOCS, ChunkStore(store), embedder)
    started = time.perf_counter()
    generator = load_generator(args.model)
    routed = evaluate_routing(rows, Retriever(ChunkStore(store), embedder), generator)
    routing_s = time.perf_counter() - started
    report: dict = {
        "model": generator.name,
        "questions": len(routed),
        "routing_accuracy": round(sum(item.correct for item in routed) / len(routed), 4),
        "routing_s": round(routing_s, 1),
        "by_label": {},
        "misrouted": [vars(item) for item in routed if not item.correct],
    }
    for label in sorted({item.expected for item in routed}):
        group = [item for item in routed if item.expected == label]
        report["by_label"][label] = f"{sum(item.correct for item in group)}/{len(group)}"
    del generator
    if not args.no_answers:
        started = time.perf_counter()
        temporal = evaluate_temporal([row for row in rows if "answer" in row], store, args.model)
        if temporal:
            report["temporal_questions"] = len(temporal)
            report["temporal_newest_fact_accuracy"] = round(
                sum(r["correct"] for r in temporal) / len(temporal), 4
            )
            report["temporal_source_first"] = round(
                sum(r["source_first"] for r in temporal) / len(temporal), 4
            )
            report["temporal_source_packed"] = round(
                sum(r["source_packed"] for r in temporal) / len(temporal), 4
            )
            report["temporal_s"] = round(time.perf_counter() - started, 1)
            report["temporal"] = temporal
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {key: value for key, value in report.items() if key not in ("misrouted", "temporal")}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
