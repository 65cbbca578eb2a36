"""Bridge documents for multi-hop questions: a question about "the senator Scott Buchholz worked for" is answered
by a second document that the question never names, but the first one does ("… chief of staff to Barnaby
Joyce"). A name in the best hits that is another document's title links to that document, as a wiki link would;
the other names the question does not hold are searched (each with the question). The chunk of each such
document closest to the question joins the ranking in place of its last ones.

Semantic retrieval only (the other strategies bring their own second rankings). docs/evals.md has the
measurements on HotpotQA and SQuAD train questions.
"""

import re

from dsarag.rag.retrieve import Hit, Retriever

BRIDGE_DOCUMENTS = 2  # ranking slots given to bridge documents
HITS_READ = 2  # the best hits whose names are followed
NAMES_PER_HIT = 3
CANDIDATES_PER_NAME = 3  # chunks looked at per name for one from a new document
# A name: capitalized words, possibly joined by a lower-case particle ("Bank of England", "Ludwig van Beethoven").
_NAME = re.compile(r"[A-Z][\w'’.-]+(?:\s+(?:(?:of|the|de|del|da|van|von)\s+)?[A-Z][\w'’.-]+)*")
# Capitalized because they open a sentence, not because they name something.
_NOT_NAMES = frozenset(
    "The A An In On At It He She His Her Its They Their This That These Those There Here Before After During "
    "When While Although However Since As For From By With If Then Today Also But And Or".split()
)


def named_in(text: str, question: str) -> list[str]:
    """Names in `text` that the question does not hold, once each: names of several words first (a person, a
    title; a single capitalized word is as often a nationality or a month), each group in order of appearance."""
    asked = question.lower()
    names = []
    for match in _NAME.finditer(text):
        name = match.group(0).strip(" .")
        if len(name) >= 4 and name.split()[0] not in _NOT_NAMES and name.lower() not in asked:
            names.append(name)
    return sorted(dict.fromkeys(names), key=lambda name: len(name.split()) == 1)


def titles_named_in(text: str, question: str, documents_titled: dict[str, list[str]]) -> list[str]:
    """Titles of documents that names in `text` hold and the question does not, once each, in order of
    appearance; the longest titles inside a name first ("Senator Barnaby Joyce of Tamworth" names the
    documents "Barnaby Joyce" and "Tamworth", not "Joyce")."""
    asked = question.lower()
    titles = []
    for match in _NAME.finditer(text):
        words = match.group(0).strip(" .").split()
        covered = [False] * len(words)
        found = []
        for n in range(len(words), 0, -1):
            for start in range(len(words) - n + 1):
                span = " ".join(words[start : start + n])
                free = not any(covered[start : start + n])
                if free and span in documents_titled and span.lower() not in asked:
                    found.append((start, span))
                    covered[start : start + n] = [True] * n
        titles += [span for _, span in sorted(found)]
    return list(dict.fromkeys(titles))


def with_bridge_documents(
    question: str, ranking: list[Hit], retriever: Retriever, k: int
) -> tuple[list[Hit], list[tuple[str, Hit]]]:
    """The ranking with up to BRIDGE_DOCUMENTS bridge hits placed after its first k - BRIDGE_DOCUMENTS, and
    each added hit with the name that found it."""
    keep = max(k - BRIDGE_DOCUMENTS, 1)
    documents = {hit.path for hit in ranking[:keep]}
    added: list[tuple[str, Hit]] = []

    def add(name: str, hit: Hit) -> None:
        if len(added) < BRIDGE_DOCUMENTS and hit.path not in documents:
            added.append((name, hit))
            documents.add(hit.path)

    titled = retriever.documents_titled
    linked: dict[str, str] = {}  # document → the title that links to it
    for hit in ranking[:HITS_READ]:
        for title in titles_named_in(hit.text, question, titled):
            for path in titled[title]:
                if path not in documents and len(linked) < BRIDGE_DOCUMENTS:
                    linked.setdefault(path, title)
    for hit in retriever.best_chunks_of(list(linked), question):
        add(linked[hit.path], hit)
    names = list(
        dict.fromkeys(
            name for hit in ranking[:HITS_READ] for name in named_in(hit.text, question)[:NAMES_PER_HIT]
        )
    )
    if names and len(added) < BRIDGE_DOCUMENTS:
        candidates = retriever.semantic_many([f"{name} {question}" for name in names], CANDIDATES_PER_NAME)
        for name, found in zip(names, candidates, strict=True):
            candidate = next((hit for hit in found if hit.path not in documents), None)
            if candidate is not None:
                add(name, candidate)
    if not added:
        return ranking, []
    chosen = {hit.chunk_id for _, hit in added}
    rest = [hit for hit in ranking[keep:] if hit.chunk_id not in chosen]
    return ranking[:keep] + [hit for _, hit in added] + rest, added
