"""`docqa`: answers of the full ask agent over a corpus, scored against reference answers and documents.

Data: `--data` a JSONL file ("question", "answers", optional "context" or "doc_ids") or a SQuAD .json file;
default the bundled demo corpus and its 68 questions. Scores per question: exact match and F1 (SQuAD's
normalization), `answer_in_reply` (a reference answer appears in the reply: fair to chatty generators),
`citation_accuracy` (a source the reply cites with [n] is a reference document) and `source_recall` (a
reference document was among the packed sources), over the questions that name documents.
"""

from collections import defaultdict

from evals.datasets import DEMO_QA, QAItem, load_qa
from evals.metrics import contains_answer, exact_match, mean, strip_citations, token_f1
from evals.qa_corpus import agent_answer, cited_sources, doc_of, qa_retriever, same_doc
from evals.run import SuiteResult, SuiteRun, timed

NAME = "docqa"
DESCRIPTION = "document QA through the agent: exact match, F1, answer in reply, citation accuracy"
THRESHOLDS = ["answer_in_reply>=0.6", "citation_accuracy>=0.6"]
MAX_NEW_TOKENS = 64


def answer_scores(reply: str, answers: list[str]) -> dict:
    """Exact match, F1 and answer-in-reply of a reply, its [n] citation markers left out."""
    text = strip_citations(reply)
    return {
        "exact_match": exact_match(text, answers),
        "f1": token_f1(text, answers),
        "answer_in_reply": contains_answer(text, answers),
    }


def score(item: QAItem, reply: dict) -> dict:
    sources = [doc_of(hit.path) for hit in reply["sources"]]
    cited = [doc_of(hit.path) for hit in cited_sources(reply["answer"], reply["sources"])]
    row = {
        "id": item.id,
        "question": item.question,
        "answers": item.answers,
        "reply": reply["answer"],
        "strategy": reply["strategy"],
        "kind": item.meta.get("kind", ""),
        **answer_scores(reply["answer"], item.answers),
        "cited": cited,
        "attention": reply["attention"],
    }
    if item.doc_ids:
        row["citation_ok"] = any(same_doc(doc, gold) for doc in cited for gold in item.doc_ids)
        row["source_ok"] = any(same_doc(doc, gold) for doc in sources for gold in item.doc_ids)
    return row


def run(run: SuiteRun) -> SuiteResult:
    items = run.limited(load_qa(run.options.data or DEMO_QA))
    retriever = qa_retriever(run, items)
    ask = {"max_new_tokens": MAX_NEW_TOKENS, "attention": run.options.attention}
    rows = []
    for number, item in enumerate(items, start=1):
        run.progress(number, len(items), item.question[:70])
        rows.append(
            run.log.run(item.id, lambda item=item: timed(lambda: score(item, agent_answer(run, retriever, item.question, **ask))))
        )  # fmt: skip
    return docqa_result(rows, run.generator().name)


def docqa_result(rows: list[dict], model: str) -> SuiteResult:
    """The suite's metrics and per-kind table from its item rows."""
    judged = [row for row in rows if "citation_ok" in row]
    metrics = {
        "exact_match": mean([row["exact_match"] for row in rows]),
        "f1": mean([row["f1"] for row in rows]),
        "answer_in_reply": mean([row["answer_in_reply"] for row in rows]),
        "seconds_per_question": mean([row["seconds"] for row in rows]),
    }
    if judged:
        metrics["citation_accuracy"] = mean([row["citation_ok"] for row in judged])
        metrics["source_recall"] = mean([row["source_ok"] for row in judged])
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_kind[row["kind"] or "all"].append(row)
    table = [
        {
            "kind": kind,
            "questions": len(group),
            "exact_match": mean([r["exact_match"] for r in group]),
            "f1": mean([r["f1"] for r in group]),
            "answer_in_reply": mean([r["answer_in_reply"] for r in group]),
            "citation_accuracy": mean([r["citation_ok"] for r in group if "citation_ok" in r]),
        }
        for kind, group in sorted(by_kind.items())
    ]
    misses = [{"id": r["id"], "question": r["question"], "answers": r["answers"], "reply": r["reply"]} for r in rows if not r["answer_in_reply"]]  # fmt: skip
    return SuiteResult(metrics, table, [], {"model": model, "misses": misses})
