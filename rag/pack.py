"""Packing retrieved chunks into the prompt: numbered source tags inside a token budget."""

from collections.abc import Callable
from dataclasses import dataclass, field

from dsarag.rag.retrieve import Hit

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources below. Give a short, direct answer and cite the "
    "sources you used as [1], [2]. Each source shows its date: when sources disagree, use the one that fits "
    "the time the question asks about, else the newest. If the sources do not contain the answer, say that "
    "you do not know."
)
GENERAL_PROMPT = "You are a helpful assistant. Give a short, direct answer."


@dataclass
class PackedContext:
    sources: list[Hit]  # source [n] is sources[n - 1]
    text: str
    tokens: int
    budget: int = 0
    skipped: list[Hit] = field(default_factory=list)  # did not fit the budget
    truncated: bool = False  # the best hit alone was larger than the budget and was cut

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "budget": self.budget,
            "sources": [f"[{n}] {hit.citation}" for n, hit in enumerate(self.sources, start=1)],
            "skipped": [hit.citation for hit in self.skipped],
            "truncated": self.truncated,
        }


def pack_sources(hits: list[Hit], count_tokens: Callable[[str], int], budget_tokens: int) -> PackedContext:
    """Choose hits in relevance order while they fit the budget, then lay them out grouped by document
    (documents in order of their best hit) and in reading order inside a document, numbered [1], [2], ….

    Truncation: the best hit is always kept, cut to the budget if it alone is too large; a later hit that
    does not fit is skipped whole (a smaller one after it may still fit)."""
    chosen: list[tuple[Hit, int]] = []
    skipped: list[Hit] = []
    used = 0
    truncated = False
    for hit in hits:
        cost = count_tokens(_block(0, hit)) + 2  # + the blank line between blocks
        if used + cost > budget_tokens and chosen:
            skipped.append(hit)
            continue
        if used + cost > budget_tokens:
            truncated = True
            cost = budget_tokens
        chosen.append((hit, cost))
        used += cost
    document_rank: dict[str, int] = {}
    for hit, _ in chosen:
        document_rank.setdefault(hit.path, len(document_rank))
    ordered = sorted(chosen, key=lambda item: (document_rank[item[0].path], item[0].char_start))
    blocks = [_block(number, hit) for number, (hit, _) in enumerate(ordered, start=1)]
    if truncated:
        blocks = [_truncate_to_tokens(blocks[0], count_tokens, budget_tokens)]
    return PackedContext(
        sources=[hit for hit, _ in ordered],
        text="\n\n".join(blocks),
        tokens=used,
        budget=budget_tokens,
        skipped=skipped,
        truncated=truncated,
    )


def _block(number: int, hit: Hit) -> str:
    return f"[{number}] {hit.path} (lines {hit.line_start}-{hit.line_end}, {hit.date})\n{hit.text.strip()}"


def build_messages(question: str, packed: PackedContext | None) -> list[dict]:
    """The chat for the generator; without sources (the agent chose not to retrieve) a plain assistant turn."""
    if packed is None or not packed.sources:
        return [{"role": "system", "content": GENERAL_PROMPT}, {"role": "user", "content": question}]
    user = f"Sources:\n\n{packed.text}\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _truncate_to_tokens(text: str, count_tokens: Callable[[str], int], budget_tokens: int) -> str:
    low, high = 0, len(text)
    while low < high:  # longest prefix that fits, by bisection on characters
        middle = (low + high + 1) // 2
        if count_tokens(text[:middle]) <= budget_tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low]
