"""Retrieval strategies: each turns a question into one or more ranked hit lists (fused later by dedup).

semantic: FAISS over embeddings. temporal: a wider semantic pool, re-ranked by recency afterwards.
hybrid: BM25 and FAISS side by side (fused by reciprocal rank). multi-query: the question plus LLM-written
sub-questions, each searched densely.
"""

import re

from dsarag.indexer_model.generate import Generator
from dsarag.rag.retrieve import Hit, Retriever

TEMPORAL_POOL_FACTOR = 4  # recency can only promote what relevance found: fetch a wider pool first
HYBRID_POOL_FACTOR = 2
MAX_SUB_QUESTIONS = 3
_SUB_QUESTION_MAX_CHARS = 200
SUB_QUESTION_PROMPT = (
    "Split the user's question into at most three short, self-contained search questions, one per line, "
    "each asking for one fact (for a comparison: one question per side). Write only the questions, each "
    "ending with a question mark. Example: for 'Was the 2024 budget bigger than the 2023 one?' write\n"
    "What was the 2024 budget?\nWhat was the 2023 budget?"
)


def retrieve_rankings(strategy: str, queries: list[str], retriever: Retriever, k: int) -> list[list[Hit]]:
    """Ranked hit lists for `queries` (the question first, then any sub-questions) under `strategy`."""
    question = queries[0]
    if strategy == "semantic":
        return [retriever.semantic(question, k)]
    if strategy == "temporal":
        return [retriever.semantic(question, k * TEMPORAL_POOL_FACTOR)]
    if strategy == "hybrid":
        pool = k * HYBRID_POOL_FACTOR
        return [retriever.semantic(question, pool), retriever.lexical(question, pool)]
    if strategy == "multi-query":
        return retriever.semantic_many(queries, k)
    raise ValueError(f"unknown retrieval strategy {strategy!r}")


def write_sub_questions(question: str, generator: Generator) -> list[str]:
    """The local LLM's sub-questions for `question`: at most three distinct, question-like lines; the
    original question is always searched as well, so an empty or garbled reply degrades to semantic."""
    messages = [
        {"role": "system", "content": SUB_QUESTION_PROMPT},
        {"role": "user", "content": question},
    ]
    reply = generator.answer(messages, max_new_tokens=64, attention="dense").text
    return parse_sub_questions(reply, question)


def parse_sub_questions(reply: str, question: str) -> list[str]:
    """Question lines of `reply` (list markers stripped), distinct, not the question itself, at most three."""
    sub_questions: list[str] = []
    for line in reply.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip()
        is_question = line.endswith("?") and 8 <= len(line) <= _SUB_QUESTION_MAX_CHARS
        if is_question and line.lower() != question.lower():
            sub_questions.append(line)
    return list(dict.fromkeys(sub_questions))[:MAX_SUB_QUESTIONS]
