"""`docqa`: answers of the full ask agent over a corpus, scored against reference answers and documents.

Data: `--data` a JSONL file ("question", "answers", optional "context" or "doc_ids", "kind", and
"answerable": false for questions the documents do not answer) or a SQuAD .json file (v2's unanswerable
questions included); default the bundled demo corpus and its 68 questions. `dsarag eval prepare` builds such
sets from public QA data. Per question kind the report separates retrieval from reading: `gold_packed` (every
reference document was packed into the prompt) beside `right` (answered, with a reference answer in the
reply) and `right_when_packed`; the short answer's exact match and F1; abstention (declined unanswerable
questions, wrongly declined answerable ones); citations (verified: the cited source holds a reference answer;
added by the tool rather than written by the model); the routing decision and seconds per question.
"""

from collections import Counter, defaultdict

from dsarag.evals.datasets import DEMO_QA, QAItem, load_qa
from dsarag.evals.metrics import contains_answer, exact_match, mean, percentiles, strip_citations, token_f1
from dsarag.evals.qa_corpus import agent_answer, cited_sources, doc_of, qa_retriever, same_doc
from dsarag.evals.run import SuiteResult, SuiteRun, timed
from dsarag.rag.grounding import says_not_known

NAME = "docqa"
DESCRIPTION = (
    "document QA through the agent: answer in reply, EM/F1, gold packed vs right, abstention, citations"
)
THRESHOLDS = ["answer_in_reply>=0.6", "citation_accuracy>=0.6"]


def answer_scores(reply: str, answers: list[str]) -> dict:
    """Exact match, F1 and answer-in-reply of a reply, its [n] citation markers left out."""
    text = strip_citations(reply)
    return {
        "exact_match": exact_match(text, answers),
        "f1": token_f1(text, answers),
        "answer_in_reply": contains_answer(text, answers),
    }


def answer_part(reply: str) -> str:
    """The answer itself: the reply's first paragraph, without the evidence quote or citation note after it."""
    return reply.strip().split("\n\n", 1)[0]


def holds_answer(source_text: str, answers: list[str]) -> bool:
    return bool(contains_answer(source_text, answers))


def score(item: QAItem, reply: dict) -> dict:
    answerable = bool(item.meta.get("answerable", True)) and bool(item.answers)
    short = reply.get("short_answer") or answer_part(reply["answer"])
    declined = reply["declined"] if "declined" in reply else says_not_known(reply["answer"])
    sources = reply["sources"]
    cited_hits = cited_sources(reply["answer"], sources)
    cited = [doc_of(hit.path) for hit in cited_hits]
    packed = [doc_of(hit.path) for hit in sources]
    row = {
        "id": item.id,
        "question": item.question,
        "answers": item.answers,
        "reply": reply["answer"],
        "short_answer": short,
        "kind": item.meta.get("kind", "") or ("answerable" if answerable else "unanswerable"),
        "answerable": answerable,
        "declined": declined,
        "answerability": reply.get("answerability"),
        "strategy": reply["strategy"],
        "sub_questions": reply.get("sub_questions", []),
        "cited": cited,
        "citations_added": reply.get("citations_added", 0),
        "attention": reply["attention"],
        "timings": reply.get("timings", {}),
    }
    if answerable:
        row |= answer_scores(short, item.answers)
        row["answer_in_reply"] = contains_answer(strip_citations(reply["answer"]), item.answers)
        row["right"] = bool(row["answer_in_reply"]) and not declined
        row["cited_verified"] = [holds_answer(hit.text, item.answers) for hit in cited_hits]
    if item.doc_ids:
        row["citation_ok"] = any(same_doc(doc, gold) for doc in cited for gold in item.doc_ids)
        row["source_ok"] = any(same_doc(doc, gold) for doc in packed for gold in item.doc_ids)
        row["gold_packed"] = all(any(same_doc(doc, gold) for doc in packed) for gold in item.doc_ids)
        row["gold_cited"] = all(any(same_doc(doc, gold) for doc in cited) for gold in item.doc_ids)
    return row


def run(run: SuiteRun) -> SuiteResult:
    items = run.limited(load_qa(run.options.data or DEMO_QA))
    retriever = qa_retriever(run, items)
    ask = {"attention": run.options.attention, "reader": run.options.reader, "abstain": run.options.abstain}
    generator = run.generator()

    def answered(item: QAItem) -> dict:
        return timed(lambda: score(item, agent_answer(run, retriever, item.question, **ask)))

    rows = run.logged_rows(items, lambda item: item.id, answered, lambda item: item.question[:70])
    return docqa_result(rows, generator.name)


def _share(rows: list[dict], key: str) -> float | None:
    values = [float(row[key]) for row in rows if key in row]
    return mean(values) if values else None


def group_metrics(rows: list[dict]) -> dict:
    """The figures of one group of rows (a question kind, or all); None where no row has the field."""
    answerable = [row for row in rows if row["answerable"]]
    unanswerable = [row for row in rows if not row["answerable"]]
    packed = [row for row in answerable if row.get("gold_packed")]
    declined = [row for row in rows if row["declined"]]
    verified = [ok for row in answerable for ok in row.get("cited_verified", [])]
    citations = sum(len(row["cited"]) for row in rows)
    return {
        "questions": len(rows),
        "answer_in_reply": _share(answerable, "answer_in_reply"),
        "exact_match": _share(answerable, "exact_match"),
        "f1": _share(answerable, "f1"),
        "right": _share(answerable, "right"),
        "gold_packed": _share(rows, "gold_packed"),
        "right_when_packed": _share(packed, "right"),
        "declined_unanswerable": _share(unanswerable, "declined"),
        "declined_answerable": _share(answerable, "declined"),
        "decline_precision": mean([not row["answerable"] for row in declined]) if declined else None,
        "citation_accuracy": _share(rows, "citation_ok"),
        "gold_cited": _share(rows, "gold_cited"),
        "citations_verified": mean(verified) if verified else None,
        "citations_added": sum(row["citations_added"] for row in rows) / citations if citations else None,
        "seconds_p50": percentiles([row["seconds"] for row in rows], (50,)).get("p50"),
    }


def docqa_result(rows: list[dict], model: str) -> SuiteResult:
    """The suite's metrics (over all questions) and the per-kind table from its item rows."""
    overall = group_metrics(rows)
    metrics = {name: value for name, value in overall.items() if value is not None and name != "questions"}
    metrics["source_recall"] = _share(rows, "source_ok") or 0.0
    metrics["seconds_per_question"] = mean([row["seconds"] for row in rows])
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    table = [{"kind": kind, **group_metrics(group)} for kind, group in sorted(by_kind.items())]
    if len(by_kind) > 1:
        table.append({"kind": "all", **overall})
    routing = {
        kind: dict(Counter(row["strategy"] for row in group)) for kind, group in sorted(by_kind.items())
    }
    misses = [
        {key: row[key] for key in ("id", "kind", "question", "answers", "reply", "strategy", "gold_packed") if key in row}
        for row in rows
        if (row["answerable"] and not row.get("right")) or (not row["answerable"] and not row["declined"])
    ]  # fmt: skip
    return SuiteResult(metrics, table, [], {"model": model, "routing": routing, "misses": misses})
