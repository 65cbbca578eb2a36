"""`routing`: the agent's decide and plan nodes against labelled questions (retrieve or not, and the strategy).

Data: `--data` a JSONL file with "question" and "strategy" (none | semantic | temporal | hybrid |
multi-query) and `--corpus` for the documents; default the bundled set of 105 questions about the demo corpus.
"""

from collections import defaultdict

from dsarag.base.errors import BadInputError
from dsarag.evals.datasets import ROUTING_SET, QAItem, load_qa
from dsarag.evals.qa_corpus import qa_retriever
from dsarag.evals.routing import route
from dsarag.evals.run import SuiteResult, SuiteRun, timed
from dsarag.rag.ask import STRATEGY_CHOICES

NAME = "routing"
DESCRIPTION = "agent decisions (retrieve?, strategy) against labels"
THRESHOLDS = ["accuracy>=0.85"]


def run(run: SuiteRun) -> SuiteResult:
    path = run.options.data or ROUTING_SET
    items = run.limited(load_qa(path))
    for item in items:
        if item.meta.get("strategy") not in STRATEGY_CHOICES:
            raise BadInputError(
                f'{path}: question {item.id} has no "strategy" label — give each line one of {", ".join(STRATEGY_CHOICES)}',
                path,
            )
    retriever = qa_retriever(run, items)
    generator = run.generator()

    def decided(item: QAItem) -> dict:
        def decide() -> dict:
            predicted, reason = route(item.question, retriever, generator)
            return {"question": item.question, "expected": item.meta["strategy"], "predicted": predicted, "reason": reason}  # fmt: skip

        return timed(decide)

    rows = run.logged_rows(items, lambda item: item.id, decided, lambda item: item.question[:70])
    by_label: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_label[row["expected"]].append(row["predicted"] == row["expected"])
    metrics = {"accuracy": sum(row["predicted"] == row["expected"] for row in rows) / len(rows)}
    metrics["decision_accuracy"] = sum((row["predicted"] == "none") == (row["expected"] == "none") for row in rows) / len(rows)  # fmt: skip
    metrics |= {f"accuracy.{label}": sum(hits) / len(hits) for label, hits in sorted(by_label.items())}
    table = [
        {"label": label, "questions": len(hits), "correct": sum(hits)}
        for label, hits in sorted(by_label.items())
    ]
    misrouted = [row for row in rows if row["predicted"] != row["expected"]]
    return SuiteResult(metrics, table, [], {"model": generator.name, "misrouted": misrouted})
