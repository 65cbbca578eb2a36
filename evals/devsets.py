"""Development sets from public QA data: a folder of documents and the questions about them, as a user has them.

`prepare_squad` turns SQuAD 2.0 articles into one text file each, with their answerable and unanswerable
questions; `prepare_hotpot` turns HotpotQA distractor questions into a folder of short encyclopedia pages
(every question's gold and distractor paragraphs, pooled), so both supporting pages must be found among
many; `prepare_musique` does the same for MuSiQue's 2- to 4-hop questions; `prepare_qa` halves a JSONL QA file
that has its documents beside it (the demo corpus). Questions are drawn with a seed; `split` keeps two disjoint
halves of the questions apart, so a threshold fitted on one can be reported on the other. Use train splits only:
the benchmarks' dev and test splits stay out of development.
"""

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from dsarag.base.atomic import atomic_write
from dsarag.base.errors import BadInputError, MissingInputError
from dsarag.evals.datasets import load_qa

SPLITS = ("fit", "report")


@dataclass
class DevSet:
    folder: Path
    docs: Path
    questions: Path
    counts: dict[str, int]

    def to_json(self) -> dict:
        return {"docs": str(self.docs), "questions": str(self.questions), "counts": self.counts}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_name(title: str) -> str:
    """A page title as a portable file name: 'Kiss and Tell (1945 film)' → 'Kiss_and_Tell_1945_film.txt'."""
    stem = re.sub(r"[^\w-]+", "_", title).strip("_")[:120] or "untitled"
    return f"{stem}.txt"


def _load_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise MissingInputError(f"{path}: not found — pass the {what} file", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BadInputError(f"{path}: invalid JSON ({error.msg}) — pass the {what} file", path) from None


def _half(items: list, seed: int, split: str) -> list:
    """One half of a seeded shuffle: 'fit' the first, 'report' the second (disjoint, for fitting vs reporting)."""
    if split not in SPLITS:
        raise BadInputError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    order = list(items)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return order[:half] if split == "fit" else order[half:]


def _write(folder: Path, pages: dict[str, str], rows: list[dict], source: Path) -> DevSet:
    docs = folder / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for name, text in pages.items():
        atomic_write(docs / name, lambda tmp, text=text: tmp.write_text(text + "\n", encoding="utf-8"))
    questions = folder / "qa.jsonl"
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(questions, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    counts: dict[str, int] = {"documents": len(pages), "questions": len(rows)}
    for row in rows:
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
    manifest = {"source": str(source), "sha256": sha256_of(source), "counts": counts}
    atomic_write(folder / "source.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return DevSet(folder, docs, questions, counts)


def prepare_squad(
    source: Path,
    folder: Path,
    articles: int | None = None,
    per_article: int = 4,
    unanswerable: int = 20,
    seed: int = 0,
    split: str = "fit",
) -> DevSet:
    """SQuAD 2.0 JSON → `folder/docs/<title>.txt` (each article's paragraphs, blank-line separated; the first
    `articles`, default all) and `folder/qa.jsonl`: `per_article` answerable questions of each article (kind
    'factoid', the article as their document) and `unanswerable` of the unanswerable ones (kind
    'unanswerable', no answers). The two splits hold the same documents and disjoint questions."""
    data = _load_json(Path(source), "SQuAD 2.0 (train-v2.0.json)")
    try:
        drawn = [(article["title"], article["paragraphs"]) for article in data["data"]][:articles]
    except (KeyError, TypeError):
        raise BadInputError(f"{source}: not SQuAD JSON — expected data → title, paragraphs", source) from None
    pages: dict[str, str] = {}
    rows: list[dict] = []
    unanswerable_pool: list[dict] = []
    for title, paragraphs in drawn:
        name = file_name(title)
        pages[name] = "\n\n".join(paragraph["context"].strip() for paragraph in paragraphs)
        qas = [qa | {"title": title, "doc": name} for paragraph in paragraphs for qa in paragraph["qas"]]
        answerable = [qa for qa in qas if qa.get("answers") and not qa.get("is_impossible")]
        unanswerable_pool += [qa for qa in qas if qa.get("is_impossible")]
        rows += [_squad_row(qa, "factoid") for qa in _half(answerable, seed, split)[:per_article]]
    rows += [_squad_row(qa, "unanswerable") for qa in _half(unanswerable_pool, seed, split)[:unanswerable]]
    random.Random(seed).shuffle(rows)
    return _write(Path(folder), pages, rows, Path(source))


def _squad_row(qa: dict, kind: str) -> dict:
    return {
        "id": qa["id"],
        "question": qa["question"].strip(),
        "answers": list(dict.fromkeys(answer["text"] for answer in qa.get("answers", []))),
        "doc_ids": [qa["doc"]],
        "kind": kind,
        "answerable": kind != "unanswerable",
        "title": qa["title"],
    }


def prepare_hotpot(
    source: Path, folder: Path, questions: int = 24, seed: int = 0, split: str = "fit"
) -> DevSet:
    """HotpotQA (distractor setting) JSON → one page per paragraph title of the drawn questions (gold and
    distractors pooled: 10 per question) and their questions, kind 'comparison' or 'bridge', with both
    supporting pages as their documents."""
    data = _load_json(Path(source), "HotpotQA (hotpot_train_v1.1.json)")
    if not isinstance(data, list) or not data or "supporting_facts" not in data[0]:
        raise BadInputError(
            f"{source}: not HotpotQA JSON — expected a list of questions with context and supporting_facts",
            source,
        )
    pages: dict[str, str] = {}
    rows: list[dict] = []
    for row in _half(data, seed, split)[:questions]:
        for title, sentences in row["context"]:
            text = "".join(sentences).strip()
            if text:
                pages.setdefault(file_name(title), f"{title}\n\n{text}")
        gold = list(dict.fromkeys(title for title, _ in row["supporting_facts"]))
        rows.append(
            {
                "id": row["_id"],
                "question": row["question"].strip(),
                "answers": [row["answer"]],
                "doc_ids": [file_name(title) for title in gold],
                "kind": row.get("type", "multi-hop"),
                "answerable": True,
                "level": row.get("level", ""),
            }
        )
    return _write(Path(folder), pages, rows, Path(source))


def prepare_musique(
    source: Path, folder: Path, questions: int = 24, seed: int = 0, split: str = "fit"
) -> DevSet:
    """MuSiQue-Ans JSON (a list of questions) → one page per paragraph title of the drawn questions (20 per
    question, supporting and not, pooled) and their answerable questions, kind '2hop' / '3hop' / '4hop', with
    the supporting pages as their documents; the answer's aliases are answers too."""
    data = _load_json(Path(source), "MuSiQue (musique_ans_v1.0_train.json as a list)")
    if not isinstance(data, list) or not data or "question_decomposition" not in data[0]:
        raise BadInputError(
            f"{source}: not MuSiQue JSON — expected a list of questions with paragraphs and "
            "question_decomposition",
            source,
        )
    paragraphs: dict[str, dict[str, None]] = {}  # title → its distinct paragraphs, in order
    rows: list[dict] = []
    # "answerable" is a bool in MuSiQue's files and the string "True" / "False" in some copies.
    answerable = [row for row in data if str(row.get("answerable", True)) != "False"]
    for row in _half(answerable, seed, split)[:questions]:
        for paragraph in row["paragraphs"]:
            if paragraph["paragraph_text"].strip():
                paragraphs.setdefault(paragraph["title"], {})[paragraph["paragraph_text"].strip()] = None
        gold = [paragraph["title"] for paragraph in row["paragraphs"] if paragraph.get("is_supporting")]
        rows.append(
            {
                "id": row["id"],
                "question": row["question"].strip(),
                "answers": [row["answer"], *row.get("answer_aliases", [])],
                "doc_ids": list(dict.fromkeys(file_name(title) for title in gold)),
                "kind": row["id"].split("__")[0][:4],
                "answerable": True,
            }
        )
    # Paragraphs sharing a title (MuSiQue has many) share its page, so no supporting one is lost.
    pages = {file_name(title): "\n\n".join([title, *texts]) for title, texts in paragraphs.items()}
    return _write(Path(folder), pages, rows, Path(source))


def prepare_qa(source: Path, folder: Path, seed: int = 0, split: str = "fit") -> DevSet:
    """A JSONL QA file with its `docs/` folder beside it (the demo corpus's layout: `corpora/demo/qa.jsonl`) →
    one half of its questions, rows unchanged, and a copy of the documents (file names keep their dates)."""
    source = Path(source)
    docs = source.parent / "docs"
    if not docs.is_dir():
        raise MissingInputError(
            f"{docs}: no docs/ folder beside {source.name} — put its documents there", docs
        )
    rows = [
        item.meta
        | {"id": item.id, "question": item.question, "answers": item.answers, "doc_ids": item.doc_ids}
        for item in load_qa(source)
    ]
    pages = {path.name: path.read_text(encoding="utf-8").rstrip("\n") for path in sorted(docs.iterdir())}
    return _write(Path(folder), pages, _half(rows, seed, split), source)
