"""External eval data, read without code changes: QA JSONL, SQuAD JSON, BEIR folders, text-folder haystacks.

Every loader raises BadInputError with the file (and line) and the fix when the data does not fit, so a run
stops before any model is loaded.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dsarag.base.atomic import atomic_write
from dsarag.base.errors import BadInputError, MissingInputError
from dsarag.corpora.demo_corpus import DEMO_DOCS
from dsarag.corpora.readers import UnreadableDocumentError, read_document
from dsarag.corpora.synthetic import synthetic_records
from dsarag.corpora.walk import walk_folder

DEMO_QA = DEMO_DOCS.parent / "qa.jsonl"
ROUTING_SET = Path(__file__).parent / "data" / "routing.jsonl"
QA_FORMAT_HINT = 'one JSON object per line with "question" and "answers" (optional "context" or "doc_ids")'


@dataclass
class QAItem:
    id: str
    question: str
    answers: list[str]
    context: str | None = None  # the passage holding the answer (SQuAD); becomes a corpus document
    doc_ids: list[str] = field(default_factory=list)  # documents that support the answer
    meta: dict = field(default_factory=dict)  # every other field of the row (labels such as "strategy")


@dataclass
class BeirSet:
    corpus: Path  # corpus.jsonl: {"_id", "title", "text"} per line
    queries: dict[str, str]  # query id → text, only queries with judgements
    qrels: dict[str, dict[str, float]]  # query id → {doc id: grade}
    split: str


def load_qa(path: Path) -> list[QAItem]:
    """A SQuAD-format .json file or a JSONL file of questions (see QA_FORMAT_HINT)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"{path}: QA file not found — pass a JSONL or SQuAD .json file with --data", path
        )
    if path.suffix == ".json":
        return load_squad(path)
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(_qa_row(path, number, line))
    if not items:
        raise BadInputError(f"{path}: no questions in it — write {QA_FORMAT_HINT}", path)
    return items


def _qa_row(path: Path, number: int, line: str) -> QAItem:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadInputError(f"{where}: invalid JSON ({error.msg}) — write {QA_FORMAT_HINT}", path) from None
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
        raise BadInputError(f'{where}: no "question" text — write {QA_FORMAT_HINT}', path)
    answers = row.pop("answers", row.pop("answer", []))  # "answer": the demo QA file's single answer
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise BadInputError(f'{where}: "answers" must be a list of strings — write {QA_FORMAT_HINT}', path)
    doc_ids = row.pop("doc_ids", row.pop("source", []))  # "source": the demo QA file's supporting file
    doc_ids = [doc_ids] if isinstance(doc_ids, str) else [str(doc) for doc in doc_ids]
    context = row.pop("context", None)
    if context is not None and not isinstance(context, str):
        raise BadInputError(f'{where}: "context" must be a string — write {QA_FORMAT_HINT}', path)
    return QAItem(
        id=str(row.pop("id", number)),
        question=row.pop("question").strip(),
        answers=answers,
        context=context,
        doc_ids=doc_ids,
        meta=row,
    )


def load_squad(path: Path) -> list[QAItem]:
    """SQuAD v1/v2 JSON: data → paragraphs → qas; v2's unanswerable questions come with no answers."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        articles = data["data"]
        items = [
            QAItem(
                id=str(qa["id"]),
                question=qa["question"].strip(),
                answers=list(dict.fromkeys(answer["text"] for answer in qa["answers"])),
                context=paragraph["context"],
                meta={"title": article.get("title", "")} | _squad_kind(qa),
            )
            for article in articles
            for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]
            if qa.get("answers") or qa.get("is_impossible", False)
        ]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise BadInputError(
            f"{path}: not SQuAD JSON ({type(error).__name__}: {error}) — expected "
            '{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text"}]}]}]}]}',
            path,
        ) from None
    if not items:
        raise BadInputError(f"{path}: no questions in this SQuAD file", path)
    return items


def _squad_kind(qa: dict) -> dict:
    return {"kind": "unanswerable", "answerable": False} if qa.get("is_impossible", False) else {}


def context_id(context: str) -> str:
    return "ctx-" + hashlib.sha256(context.encode()).hexdigest()[:12]


def contexts_corpus(items: list[QAItem], path: Path) -> Path:
    """Write the items' contexts (each once) as a JSONL corpus and point each item's doc_ids at its context."""
    contexts: dict[str, str] = {}
    for item in items:
        if item.context:
            item.doc_ids = [context_id(item.context)]
            contexts.setdefault(item.doc_ids[0], item.context)
    lines = [json.dumps({"id": doc, "text": text}) for doc, text in contexts.items()]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return path


def load_beir(folder: Path, split: str | None = None) -> BeirSet:
    """A BEIR dataset folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv (test, else dev, else train)."""
    folder = Path(folder)
    fix = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/test.tsv"
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise MissingInputError(f"{folder / name}: not found — {fix}", folder)
    splits = [split] if split else ["test", "dev", "train"]
    qrels_path = next((folder / "qrels" / f"{name}.tsv" for name in splits if (folder / "qrels" / f"{name}.tsv").is_file()), None)  # fmt: skip
    if qrels_path is None:
        raise MissingInputError(f"{folder / 'qrels'}: no {' / '.join(splits)}.tsv — {fix}", folder)
    qrels: dict[str, dict[str, float]] = {}
    for number, line in enumerate(qrels_path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if number == 1 and not fields[-1].strip().lstrip("-").isdigit():
            continue  # the header "query-id corpus-id score"
        if len(fields) < 3:
            raise BadInputError(
                f"{qrels_path}:{number}: expected query-id<TAB>corpus-id<TAB>score", qrels_path
            )
        qrels.setdefault(fields[0], {})[fields[1]] = float(fields[2])
    queries = {}
    for number, line in enumerate((folder / "queries.jsonl").read_text(encoding="utf-8").splitlines(), start=1):  # fmt: skip
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            queries[str(row["_id"])] = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BadInputError(
                f'{folder / "queries.jsonl"}:{number}: expected {{"_id": …, "text": …}}', folder
            ) from None
    judged = {qid: text for qid, text in queries.items() if qid in qrels}
    if not judged:
        raise BadInputError(f"{qrels_path}: no judgement names a query of queries.jsonl", qrels_path)
    return BeirSet(folder / "corpus.jsonl", judged, {qid: qrels[qid] for qid in judged}, qrels_path.stem)


def folder_text(folder: Path) -> str:
    """Every readable document under `folder`, joined: a NIAH haystack from the user's own text."""
    texts = []
    for path in walk_folder(Path(folder)).files:
        try:
            texts.append(read_document(path))
        except UnreadableDocumentError:
            continue
    text = "\n\n".join(text for text in texts if text.strip())
    if not text:
        raise MissingInputError(
            f"{folder}: no readable text for a haystack — pass a folder of text files", folder
        )
    return text


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    """Plausible prose from the bundled generator (corpora/synthetic.py), at least `n_chars` long."""
    parts, total = [], 0
    for record in synthetic_records(max(1, n_chars // 1500 + 1) * 4, seed=seed):
        parts.append(record["text"])
        total += len(record["text"]) + 2
        if total >= n_chars:
            break
    return "\n\n".join(parts)
