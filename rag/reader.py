"""Reading the packed sources: yes or no, a short answer copied from one source, or a refusal.

Constrained reading restricts each generated token. Yes/no questions choose between " yes" and " no" in one
step. Under `--reader span`, factoid questions are read by copy-constrained decoding: every token must continue
a span of one source's tokens (spans do not cross lines), so the answer is a quote of a source by construction,
that source is cited, and the sentence holding the span is shown as evidence. Both may choose " none" instead
(the sources do not say, SQuAD 2.0's no-answer option); the first step's log-odds of the best answer token
against it is the answerability score. Any reader declines a question naming a number or a name that no packed
source holds.
Other questions are answered freely by the agent and checked by rag/grounding.py.
"""

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dsarag.indexer_model.generate import GenerationResult, Generator
from dsarag.rag.pack import PackedContext

SPAN_PROMPT = (
    "Answer the question from the numbered sources. Reply with the exact words from the sources that answer "
    "it, as short as possible: a name, number, date or short phrase. If the sources do not state the "
    "answer, reply: none"
)
YES_NO_PROMPT = (
    "Answer the question from the numbered sources with yes or no. If the sources do not say, reply: none"
)
REPLY_START = "Answer:"
NULL_ANSWER = " none"
SPAN_MAX_TOKENS = 24
# Decline where " none" is the likelier first token; no other margin separated answerable from unanswerable
# questions on the development set (docs/evals.md, "Answer quality on questions nobody here wrote").
DECLINE_MARGIN = 0.0

_YES_NO_START = re.compile(
    r"^\s*(is|are|was|were|do|does|did|can|could|has|have|had|will|would|should|shall)\b", re.I
)
_OPEN_QUESTION = re.compile(
    r"^\s*(why|how (do|does|did|can|could|should|would|is|are|was|were)\b|explain|describe|summari[sz]e|"
    r"list|compare|what (are|were) the (main|key|differences|steps|reasons))|\b(step by step|in detail)\b",
    re.I,
)
_ALTERNATIVES = re.compile(r",?\s+or\s+[^,?]+\?\s*$", re.I)  # "…, A or B?" names its answers
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w|\.\d|')")  # a full stop ends a number; 70's is a decade
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
# Capitalized words that are a question's grammar, not a name it asks about.
_NOT_NAMES = frozenset(
    "What Which Who Whom Whose When Where Why How The A An In On At To For From By With And Or Of Is Are Was Were "
    "Do Does Did Has Have Had Can Could Would Should Will I".split()
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[])|\n")


@dataclass
class Reading:
    """What the reader made of the sources: the reply, and how it was reached."""

    # "span" | "yes-no" | "missing" (declined before reading: a number or name no source holds) | "probe"
    # (declined after the prefill of a free answer: rag/answerability.py)
    mode: str
    answer: str  # the short answer: a span of a source, "yes" or "no"; "" when declined
    answerable: bool
    score: float | None  # log P(best answer's first token) - log P(" none"): > -DECLINE_MARGIN answers
    sources: tuple[int, ...] = ()  # the [n] cited: the span's source, or for yes/no each compared side's
    quote: str = ""  # the sentence of the span's source holding the span
    generation: GenerationResult | None = None
    features: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "answer": self.answer,
            "answerable": self.answerable,
            "score": None if self.score is None else round(self.score, 3),
            "sources": list(self.sources),
            "quote": self.quote,
        }

    def reply(self, packed: PackedContext) -> str:
        """The text shown: the short answer and its source, then the sentence stating it; or the refusal
        with the closest sources."""
        if not self.answerable:
            closest = "; ".join(f"[{n}] {hit.citation}" for n, hit in enumerate(packed.sources[:3], start=1))
            missing = self.features.get("missing_numbers", []) + self.features.get("missing_names", [])
            notes = (
                [f"none of them mentions {', '.join(missing)}"] if missing and self.mode == "missing" else []
            )
            if notes and self.features.get("spelled_like"):
                notes.append(f"they mention {', '.join(self.features['spelled_like'].values())}")
            why = f" ({'; '.join(notes)})" if notes else ""
            return f"The documents do not contain the answer{why}. Closest sources: {closest}."
        markers = "".join(f" [{number}]" for number in self.sources)
        if self.mode == "yes-no":
            return f"{self.answer.capitalize()}.{markers}"
        answer = f"{self.answer}{markers}"
        return f'{answer}\n\n[{self.sources[0]}] "{self.quote}"' if self.quote else answer


def reading_mode(question: str, reader: str = "span") -> str:
    """How `question` is read under `reader`: yes-no for polar questions (auto and span), span for factoid
    questions (span only), free for the rest (explanations, lists, summaries; every question under free)."""
    if reader == "free" or _OPEN_QUESTION.search(question):
        return "free"
    if _YES_NO_START.search(question) and not _ALTERNATIVES.search(question):
        return "yes-no"
    return "span" if reader == "span" else "free"


def declined_for_missing_terms(question: str, packed: PackedContext) -> Reading | None:
    """A refusal when the question names a number, year or name that none of the packed sources holds: they
    answer another question (SQuAD 2.0's unanswerable questions swap in such a term)."""
    features = {
        "missing_numbers": missing_numbers(question, packed.text),
        "missing_names": missing_names(question, packed.text),
    }
    features = {key: terms for key, terms in features.items() if terms}
    if not features:
        return None
    spelled = {name: spelled_like(name, packed.text) for name in features.get("missing_names", [])}
    if any(spelled.values()):
        features["spelled_like"] = {name: word for name, word in spelled.items() if word}
    return Reading("missing", "", False, None, features=features)


class CopyConstraint:
    """Logits filter for `generate`: the reply continues some span of the allowed token sequences.

    The sequences are laid end to end in one array with -1 between them; `state` holds every position where
    the reply so far ends inside a sequence, so the next token may be any token found there. The filter also
    records the unconstrained log-probabilities it needs for scoring (first step, chosen tokens)."""

    def __init__(self, sequences: list[list[int]], stop_ids: set[int], max_tokens: int) -> None:
        flat: list[int] = []
        self.owner: list[int] = []  # the sequence each position belongs to
        for number, sequence in enumerate(sequences):
            flat += [*sequence, -1]
            self.owner += [number] * (len(sequence) + 1)
        self.tokens = np.array(flat, dtype=np.int64)
        self.stop_ids = sorted(stop_ids)
        self.max_tokens = max_tokens
        self.state = np.flatnonzero(self.tokens >= 0)
        self.first_logprobs: Tensor | None = None
        self.token_logprobs: list[float] = []
        self._last_logprobs: Tensor | None = None

    def __call__(self, ids: list[int], logits: Tensor) -> Tensor:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if ids:
            self.token_logprobs.append(float(self._last_logprobs[ids[-1]]))
            self.state = self.state[self.tokens[self.state] == ids[-1]] + 1
        else:
            self.first_logprobs = logprobs
        self._last_logprobs = logprobs
        allowed = self.tokens[self.state] if len(ids) < self.max_tokens else self.tokens[:0]
        allowed = np.unique(allowed[allowed >= 0])
        if ids:
            allowed = np.concatenate([allowed, self.stop_ids])
        masked = torch.full_like(logits, float("-inf"))
        index = torch.from_numpy(allowed).to(logits.device)
        masked[index] = logits[index]
        return masked

    def finish(self, ids: list[int]) -> None:
        """Record the last token's log-probability (generation may stop before calling the filter again)."""
        if len(self.token_logprobs) < len(ids) and self._last_logprobs is not None:
            self.token_logprobs.append(float(self._last_logprobs[ids[-1]]))
            self.state = self.state[self.tokens[self.state] == ids[-1]] + 1

    def matched_sequences(self, n_tokens: int) -> list[int]:
        """The sequences (in order) holding the whole reply of `n_tokens` tokens."""
        return sorted({self.owner[position - 1] for position in self.state if position >= n_tokens})


def _source_segments(text: str, generator: Generator) -> list[list[int]]:
    """A source's token ids cut at every token that holds a line break (an answer stays on one line)."""
    segments: list[list[int]] = [[]]
    for token_id in generator.tokenizer.encode(" " + text.strip()):
        if "\n" in generator.tokenizer.decode([token_id]):
            segments.append([])
        else:
            segments[-1].append(token_id)
    return [segment for segment in segments if segment]


def sentence_with(text: str, answer: str) -> str:
    """The sentence of `text` that holds `answer` (the first one), else ""."""
    start = text.find(answer)
    if start < 0:
        start = text.lower().find(answer.lower())
    if start < 0:
        return ""
    bounds = [0, *(match.end() for match in _SENTENCE_END.finditer(text)), len(text)]
    begin = max(bound for bound in bounds if bound <= start)
    end = min((bound for bound in bounds if bound >= start + len(answer)), default=len(text))
    return " ".join(text[begin:end].split())


def messages_for(system: str, question: str, blocks: list[tuple[int, str]]) -> list[dict]:
    sources = "\n\n".join(f"[{number}] {text}" for number, text in blocks)
    user = f"Sources:\n\n{sources}\n\nQuestion: {question}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def read_span(
    generator: Generator, question: str, blocks: list[tuple[int, str]], attention: str, topk: int | None
) -> Reading:
    """A span of one source block (source [n], text), or a refusal, with the sentence holding the span."""
    tokenizer = generator.tokenizer
    segments, segment_source = [], []
    for number, text in blocks:
        for segment in _source_segments(text, generator):
            segments.append(segment)
            segment_source.append(number)
    null = tokenizer.encode(NULL_ANSWER)
    constraint = CopyConstraint([*segments, null], generator.stop_ids, SPAN_MAX_TOKENS)
    generation = generator.answer(
        messages_for(SPAN_PROMPT, question, blocks),
        max_new_tokens=SPAN_MAX_TOKENS,
        attention=attention,
        topk=topk,
        reply_start=REPLY_START,
        constrain=constraint,
    )
    constraint.finish(generation.token_ids)
    matched = constraint.matched_sequences(len(generation.token_ids))
    spans = [segment_source[index] for index in matched if index < len(segments)]
    score = _answer_score(constraint, null[0])
    features = {
        "score": score,
        "mean_logprob": float(np.mean(constraint.token_logprobs)) if constraint.token_logprobs else 0.0,
        "tokens": len(generation.token_ids),
    }
    answer = generation.text.strip()
    if not spans or score < -DECLINE_MARGIN:
        return Reading("span", "", False, score, generation=generation, features=features)
    source = spans[0]
    missing = missing_numbers(question, dict(blocks)[source])
    if missing:
        features["missing_numbers"] = missing
        return Reading("span", "", False, score, generation=generation, features=features)
    quote = sentence_with(dict(blocks)[source], answer)
    return Reading("span", answer, True, score, (source,), quote, generation, features)


def read_yes_no(
    generator: Generator,
    question: str,
    blocks: list[tuple[int, str]],
    attention: str,
    topk: int | None,
    compared: tuple[str, ...] = (),
) -> Reading:
    """yes or no (or a refusal), read off one constrained step after the prompt; cited: for each side the
    question compares, the best-ranked source that names it."""
    tokenizer = generator.tokenizer
    options = [tokenizer.encode(word) for word in (" yes", " no", NULL_ANSWER)]
    constraint = CopyConstraint(options, generator.stop_ids, 1)
    generation = generator.answer(
        messages_for(YES_NO_PROMPT, question, blocks),
        max_new_tokens=1,
        attention=attention,
        topk=topk,
        reply_start=REPLY_START,
        constrain=constraint,
    )
    score = _answer_score(constraint, options[2][0])
    answer = generation.text.strip().lower()
    answerable = answer in ("yes", "no") and score >= -DECLINE_MARGIN
    if not answerable:
        return Reading("yes-no", "", False, score, generation=generation)
    return Reading("yes-no", answer, True, score, sources_naming(compared, blocks), generation=generation)


def sources_naming(names: tuple[str, ...], blocks: list[tuple[int, str]]) -> tuple[int, ...]:
    """For each name, the first (best-ranked) source whose text holds it, once each, in source order."""
    found = {next((n for n, text in blocks if name.lower() in text.lower()), None) for name in names}
    return tuple(sorted(number for number in found if number is not None))


def read(
    mode: str,
    generator: Generator,
    question: str,
    packed: PackedContext,
    attention: str,
    topk: int | None,
    compared: tuple[str, ...] = (),
) -> Reading:
    """The constrained reading of `question` over the packed sources (mode "span" or "yes-no"); `compared`:
    the sides a comparison names (rag/query_features.py), which a yes or no cites."""
    blocks = [(number, hit.text) for number, hit in enumerate(packed.sources, start=1)]
    if mode == "yes-no":
        return read_yes_no(generator, question, blocks, attention, topk, compared)
    return read_span(generator, question, blocks, attention, topk)


def missing_numbers(question: str, source_text: str) -> list[str]:
    """Numbers and years the question names that its answer's source does not hold: the source answers
    another question ("hacked in November 2004" against a source that says 2014)."""
    held = set(_NUMBER.findall(source_text.replace(",", "")))
    return [number for number in _NUMBER.findall(question.replace(",", "")) if number not in held]


def _ascii_words(text: str) -> list[str]:
    """The words of `text` without accents ("Frédéric" → "Frederic"), a typographic apostrophe kept as "'"."""
    folded = unicodedata.normalize("NFKD", text.replace("\u2019", "'")).encode("ascii", "ignore").decode()
    return _WORD.findall(folded)


def _folded_stems(text: str) -> set[str]:
    """Lower-case words without accents and plural / possessive endings: "Frédéric's" and "frederic" match."""
    return {_stem(word.lower()) for word in _ascii_words(text)}


def _stem(word: str) -> str:
    for suffix in ("'s", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def missing_names(question: str, source_text: str) -> list[str]:
    """Names the question asks about (capitalized words of 3 letters or more past its first word) that no
    source holds, accents and plural endings aside ("filming started in Australia" against sources that name
    England only). Acronyms are left out: sources often spell them out (NYC, New York City)."""
    held = _folded_stems(source_text)
    words = _ascii_words(question)
    names = [
        w for w in words[1:] if w[0].isupper() and not w.isupper() and len(w) >= 3 and w not in _NOT_NAMES
    ]
    return [name for name in dict.fromkeys(names) if _stem(name.lower()) not in held]


def spelled_like(name: str, source_text: str) -> str | None:
    """A word of the sources one typing slip from `name` (a letter added, dropped, changed or two swapped),
    for names of 5 letters or more: "Brittish" → "British". The question may have a typo; the decline says so."""
    if len(name) < 5:
        return None
    target = name.lower()
    for word in dict.fromkeys(_ascii_words(source_text)):
        if word[0].lower() == target[0] and word.lower() != target and _one_slip(target, word.lower()):
            return word
    return None


def _one_slip(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
    if len(a) < len(b):  # one letter added
        return a[first:] == b[first + 1 :]
    swapped = first + 1 < len(a) and a[first] == b[first + 1] and a[first + 1] == b[first]
    return a[first + 1 :] == b[first + 1 :] or (swapped and a[first + 2 :] == b[first + 2 :])


def _answer_score(constraint: CopyConstraint, null_id: int) -> float:
    """First step: the best non-null allowed token's log-probability minus the null answer's."""
    first = constraint.first_logprobs
    allowed = np.unique(constraint.tokens[constraint.tokens >= 0])
    allowed = torch.from_numpy(allowed[allowed != null_id])
    if first is None or not len(allowed):
        return float("-inf")
    return float(first[allowed].max() - first[null_id])
