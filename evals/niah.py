"""Multi-key needle in a haystack: pass keys hidden at chosen depths of filler text, one asked for at a time.

A case holds one haystack (filler token ids with several needles "The pass key for <name> is <5 digits>."
inserted at line starts near the requested depths) and one question per needle, asked through the model's
chat template; the assistant's reply is opened with "The pass key for <name> is" so that the value comes next. Every question shares the prompt up to the end of the haystack (`prefix_ids`), so a runner
can prefill the haystack once and branch into each question. Answers are scored by exact value match.
"""

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.generate import decode_one_token, prefill, sample
from dsarag.indexer_model.model import Transformer

FIRST_NAMES = tuple(
    "Alice Bruno Chiara Dmitri Elena Farid Greta Hiroshi Ines Jonas Kwame Lucia Mateo Nadia Oskar Priya".split()
)
LAST_NAMES = tuple(
    "Moreau Lindqvist Okafor Petrov Tanaka Alvarez Novak Haddad Brennan Castillo Dubois Eriksen".split()
)
HAYSTACK_MARKER = "\x00HAYSTACK\x00"
INTRO = "Read the document below. Several pass keys are hidden in it; remember them.\n\n"
SNAP_TOKENS = 64  # how far past its requested depth a needle may move to reach the start of a line


class ChatEncoder(Protocol):
    """What the generator needs of a tokenizer (indexer_model.tokenizer.ChatTokenizer fits)."""

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


@dataclass(frozen=True)
class Needle:
    name: str
    value: str
    depth: float  # requested share of the haystack before the needle
    position: int  # token offset of the needle's first token in the haystack

    @property
    def sentence(self) -> str:
        return needle_sentence(self.name, self.value)


@dataclass
class NiahCase:
    length: int  # the longest prompt of the case, in tokens (template and question included)
    needles: list[Needle]
    prefix_ids: list[int]  # template opening, intro and haystack: shared by every question
    question_ids: list[
        list[int]
    ]  # per needle: question, assistant opening and answer prefix, after the prefix
    haystack_start: int  # offset of the haystack's first token in prefix_ids
    haystack_len: int
    meta: dict = field(default_factory=dict)

    def prompt_ids(self, index: int) -> list[int]:
        return self.prefix_ids + self.question_ids[index]

    def to_json(self) -> dict:
        return {
            "length": self.length,
            "needles": [vars(needle) for needle in self.needles],
            "prefix_ids": self.prefix_ids,
            "question_ids": self.question_ids,
            "haystack_start": self.haystack_start,
            "haystack_len": self.haystack_len,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict) -> "NiahCase":
        return cls(**{**data, "needles": [Needle(**needle) for needle in data["needles"]]})


def needle_sentence(name: str, value: str) -> str:
    return f"The pass key for {name} is {value}."


def question_text(name: str) -> str:
    return f"What is the pass key for {name}? Answer with the number only."


def answer_prefix(name: str) -> str:
    """The start of the assistant's reply, given (as RULER does) so the next tokens are the value."""
    return f"The pass key for {name} is"


def pick_keys(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """`count` distinct (name, five-digit value) pairs."""
    if count > min(len(FIRST_NAMES), len(LAST_NAMES)):
        raise ValueError(f"at most {min(len(FIRST_NAMES), len(LAST_NAMES))} needles per haystack")
    firsts = rng.choice(len(FIRST_NAMES), count, replace=False)
    lasts = rng.choice(len(LAST_NAMES), count, replace=False)
    values = rng.choice(np.arange(10_000, 100_000), count, replace=False)
    return [
        (f"{FIRST_NAMES[f]} {LAST_NAMES[s]}", str(v)) for f, s, v in zip(firsts, lasts, values, strict=True)
    ]


def insertion_points(
    filler: Sequence[int], depths: Sequence[float], line_ends: set[int], snap: int = SNAP_TOKENS
) -> list[int]:
    """Where each needle goes in `filler`: at round(depth * len), moved forward to just after the next line
    break (a token in `line_ends`, the ids whose text holds a newline) when one lies within `snap` tokens."""
    points = []
    for depth in depths:
        point = round(depth * len(filler))
        for candidate in range(point, min(point + snap, len(filler))):
            if candidate > 0 and filler[candidate - 1] in line_ends:
                point = candidate
                break
        points.append(point)
    return points


def insert_needles(
    filler: Sequence[int], needle_ids: list[list[int]], points: list[int]
) -> tuple[list[int], list[int]]:
    """(haystack, position of each needle in it): each needle's ids spliced into `filler` at its point."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    haystack: list[int] = []
    positions = [0] * len(points)
    start = 0
    for i in order:
        haystack.extend(filler[start : points[i]])
        positions[i] = len(haystack)
        haystack.extend(needle_ids[i])
        start = points[i]
    haystack.extend(filler[start:])
    return haystack, positions


def template_parts(tokenizer: ChatEncoder, question: str) -> tuple[str, str]:
    """The chat-rendered prompt before and after the haystack for one question."""
    content = f"{INTRO}{HAYSTACK_MARKER}\n\n{question}"
    before, after = tokenizer.render_chat([{"role": "user", "content": content}]).split(HAYSTACK_MARKER)
    return before, after


def build_case(
    tokenizer: ChatEncoder,
    filler: Sequence[int],
    length: int,
    depths: Sequence[float],
    rng: np.random.Generator,
    line_ends: set[int] | None = None,
) -> NiahCase:
    """One haystack of filler ids with a needle at each depth, whose longest prompt is `length` tokens.

    `filler` must hold at least `length` ids; `line_ends` are the token ids holding a newline (needles then
    start lines). Raises ValueError when the template and needles leave no room for a haystack."""
    keys = pick_keys(rng, len(depths))
    needle_ids = [tokenizer.encode(f"{needle_sentence(name, value)}\n") for name, value in keys]
    parts = [template_parts(tokenizer, question_text(name)) for name, _ in keys]
    before_ids = tokenizer.encode(parts[0][0])
    question_ids = [
        tokenizer.encode(after + answer_prefix(name))
        for (_, after), (name, _) in zip(parts, keys, strict=True)
    ]
    filler_len = length - len(before_ids) - max(map(len, question_ids)) - sum(map(len, needle_ids))
    if filler_len <= 0:
        raise ValueError(f"length {length} leaves no room for a haystack")
    if len(filler) < filler_len:
        raise ValueError(f"filler of {len(filler)} ids is shorter than the {filler_len} needed")
    filler = [int(token) for token in filler[:filler_len]]
    points = insertion_points(filler, depths, line_ends or set())
    haystack, positions = insert_needles(filler, needle_ids, points)
    needles = [
        Needle(name, value, float(depth), position)
        for (name, value), depth, position in zip(keys, depths, positions, strict=True)
    ]
    return NiahCase(
        length=len(before_ids) + len(haystack) + max(map(len, question_ids)),
        needles=needles,
        prefix_ids=before_ids + haystack,
        question_ids=question_ids,
        haystack_start=len(before_ids),
        haystack_len=len(haystack),
    )


def extract_value(answer: str) -> str | None:
    """The first run of digits in the answer (thousands separators dropped), or None."""
    match = re.search(r"\d[\d,]*", answer)
    return match.group().replace(",", "") if match else None


def is_correct(answer: str, value: str) -> bool:
    """Exact match of the first number in the answer with the needle's value."""
    return extract_value(answer) == value


# --- answering cases with a model -----------------------------------------------------------------------


@torch.inference_mode()
def answer_case(
    model: Transformer, case: NiahCase, dsa: DSAConfig | None, max_new_tokens: int, stop_ids: set[int]
) -> dict:
    """Greedy answers (token ids) to every question of a case: the shared haystack is prefilled once and each
    question is prefilled after it, overwriting the previous question's cache positions."""
    device = str(model.output.weight.device)
    prefix_len = len(case.prefix_ids)
    model.setup_caches(1, prefix_len + max(map(len, case.question_ids)) + max_new_tokens)
    _synchronize(device)
    started = time.perf_counter()
    prefix = torch.tensor([case.prefix_ids], device=device)
    # A dense tail longer than a question reaches into the shared prefix: as far as the shortest question needs.
    shortest_prompt = prefix_len + min(map(len, case.question_ids))
    prefill(model, prefix, torch.arange(prefix_len, device=device), dsa, prompt_end=shortest_prompt)
    _synchronize(device)
    prefill_s = time.perf_counter() - started
    answers = []
    for question in case.question_ids:
        positions = torch.arange(prefix_len, prefix_len + len(question), device=device)
        logits = prefill(model, torch.tensor([question], device=device), positions, dsa)
        answers.append(
            greedy_continue(model, logits, prefix_len + len(question), max_new_tokens, stop_ids, dsa)
        )
    return {
        "answers": answers,
        "prefill_s": round(prefill_s, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }


def greedy_continue(
    model: Transformer,
    logits: torch.Tensor,
    position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    dsa: DSAConfig | None,
) -> list[int]:
    """Up to `max_new_tokens` greedy tokens after `logits`, the next one going to `position`; the steps attend
    densely when `dsa.sparse_decode` is False, as `generate` does."""
    device = logits.device
    step_dsa = dsa if dsa is not None and dsa.sparse_decode else None
    ids: list[int] = []
    for step in range(max_new_tokens):
        token = sample(logits)
        if int(token) in stop_ids:
            break
        ids.append(int(token))
        if step < max_new_tokens - 1:
            logits = decode_one_token(
                model, token.view(1, 1), torch.tensor([position + step], device=device), step_dsa
            )
    return ids


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
