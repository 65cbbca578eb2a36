"""Bridge documents for multi-hop questions: a question about "the senator Scott Buchholz worked for" is answered
by a second document that the question never names, but the first one does ("… chief of staff to Barnaby
Joyce"). The names in the best hits that the question does not hold are searched (each with the question), and
the best chunk of a document not yet kept joins the ranking in place of its last ones.

Semantic retrieval only (the other strategies bring their own second rankings). Measured on the fit half of
HotpotQA train questions: both supporting documents among the 6 chunks 31 → 39 of 50; on SQuAD train questions
the chunks holding an answer are unchanged (docs/evals.md).
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


def with_bridge_documents(
    question: str, ranking: list[Hit], retriever: Retriever, k: int
) -> tuple[list[Hit], list[tuple[str, Hit]]]:
    """The ranking with up to BRIDGE_DOCUMENTS bridge hits placed after its first k - BRIDGE_DOCUMENTS, and
    each added hit with the name that found it."""
    keep = max(k - BRIDGE_DOCUMENTS, 1)
    names = list(
        dict.fromkeys(
            name for hit in ranking[:HITS_READ] for name in named_in(hit.text, question)[:NAMES_PER_HIT]
        )
    )
    if not names:
        return ranking, []
    candidates = retriever.semantic_many([f"{name} {question}" for name in names], CANDIDATES_PER_NAME)
    documents = {hit.path for hit in ranking[:keep]}
    added: list[tuple[str, Hit]] = []
    for name, found in zip(names, candidates, strict=True):
        candidate = next((hit for hit in found if hit.path not in documents), None)
        if candidate is not None and len(added) < BRIDGE_DOCUMENTS:
            added.append((name, candidate))
            documents.add(candidate.path)
    chosen = {hit.chunk_id for _, hit in added}
    rest = [hit for hit in ranking[keep:] if hit.chunk_id not in chosen]
    return ranking[:keep] + [hit for _, hit in added] + rest, added
