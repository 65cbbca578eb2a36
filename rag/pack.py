"""Packing retrieved chunks into the prompt: numbered source tags inside a token budget."""

from collections.abc import Callable
from dataclasses import dataclass

from rag.retrieve import Hit

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources below. Give a short, direct answer and cite the "
    "sources you used as [1], [2]. If the sources do not contain the answer, say that you do not know."
)


@dataclass
class PackedContext:
    sources: list[Hit]  # source [n] is sources[n - 1]
    text: str
    tokens: int


def pack_sources(hits: list[Hit], count_tokens: Callable[[str], int], budget_tokens: int) -> PackedContext:
    """Take hits in relevance order while they fit the budget; the best hit is always kept (truncated if needed)."""
    blocks: list[str] = []
    sources: list[Hit] = []
    used = 0
    for hit in hits:
        block = f"[{len(sources) + 1}] {hit.path} (lines {hit.line_start}-{hit.line_end}, {hit.date})\n{hit.text.strip()}"
        cost = count_tokens(block) + 2
        if used + cost > budget_tokens:
            if sources:
                continue
            block = _truncate_to_tokens(block, count_tokens, budget_tokens)
            cost = budget_tokens
        blocks.append(block)
        sources.append(hit)
        used += cost
    return PackedContext(sources=sources, text="\n\n".join(blocks), tokens=used)


def build_messages(question: str, packed: PackedContext) -> list[dict]:
    user = f"Sources:\n\n{packed.text}\n\nQuestion: {question}" if packed.sources else question
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
