"""`temporal`: time-bound questions answered by the full agent — does the answer state the newest fact?

Data: `--data` a JSONL file with "question", "answers" (the fact true at the asked time) and optional
"doc_ids" (its document), with `--corpus`; default the answered questions of the bundled routing set.
Also reported: whether the fact's document was the top reranked hit, and whether it was packed at all.
"""

from dsarag.evals.datasets import ROUTING_SET, QAItem, load_qa
from dsarag.evals.metrics import mean
from dsarag.evals.qa_corpus import agent_answer, doc_of, qa_retriever, same_doc
from dsarag.evals.routing import newest_fact_answered
from dsarag.evals.run import SuiteResult, SuiteRun, timed

NAME = "temporal"
DESCRIPTION = "newest-fact accuracy of time-bound questions through the agent"
THRESHOLDS = ["newest_fact_accuracy>=0.9"]
MAX_NEW_TOKENS = 48


def score(item: QAItem, reply: dict) -> dict:
    reranked_first = next((entry["top"][0] for entry in reply["trace"] if entry["node"] == "rerank" and entry.get("top")), "")  # fmt: skip
    packed = [doc_of(hit.path) for hit in reply["sources"]]
    return {
        "question": item.question,
        "fact": item.answers[0],
        "reply": reply["answer"],
        "strategy": reply["strategy"],
        "correct": any(newest_fact_answered(reply["answer"], fact) for fact in item.answers),
        "source_first": any(
            same_doc(doc_of(reranked_first.rsplit(":", 1)[0]), gold) for gold in item.doc_ids
        ),
        "source_packed": any(same_doc(doc, gold) for doc in packed for gold in item.doc_ids),
    }


def run(run: SuiteRun) -> SuiteResult:
    items = [item for item in load_qa(run.options.data or ROUTING_SET) if item.answers]
    items = run.limited(items)
    retriever = qa_retriever(run, items)
    run.generator()  # loaded before any question is asked in parallel

    def answered(item: QAItem) -> dict:
        return timed(lambda: score(item, agent_answer(run, retriever, item.question, max_new_tokens=MAX_NEW_TOKENS)))  # fmt: skip

    rows = run.logged_rows(items, lambda item: item.id, answered, lambda item: item.question[:70])
    metrics = {
        "newest_fact_accuracy": mean([row["correct"] for row in rows]),
        "source_first": mean([row["source_first"] for row in rows]),
        "source_packed": mean([row["source_packed"] for row in rows]),
        "seconds_per_question": mean([row["seconds"] for row in rows]),
    }
    table = [
        {"question": r["question"], "fact": r["fact"], "reply": r["reply"][:80], "ok": r["correct"]}
        for r in rows
    ]
    return SuiteResult(metrics, table, [], {"model": run.generator().name})
