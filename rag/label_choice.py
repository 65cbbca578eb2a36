"""Constrained decisions by the local LLM: score a fixed set of labels by the model's log-likelihood.

The prompt ends where the assistant's reply begins, and each label is scored by the log-probability of its first
token there (labels are chosen so their first tokens differ). The scores are calibrated by subtracting the same
labels' log-probabilities for a content-free question ("N/A"), which removes the model's prior preference for
some labels (Zhao et al., 2021, "Calibrate before use").

A decision's prompt is the same up to the question (system prompt, then "Question:"). The first pass for a model,
over the content-free prompt, gives the calibration and that opening's keys and values, which are kept; each
question then costs one short forward pass over its own tokens and the prompt's ending (~25 of ~110 tokens).
A served model (rag/remote_generator.py) is asked for one token with the first step's top log-probabilities,
the labels' first tokens biased alike so that they lead the list; the content-free question once per model.
A label missing from the list (a server that reports logprobs before the bias) scores as the least listed.
"""

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsarag.indexer_model.generate import Generator
from dsarag.rag.remote_generator import RemoteGenerator

CONTENT_FREE_QUESTION = "N/A"


@dataclass
class _CachedOpening:
    ids: list[int]  # the prompt tokens every question's prompt starts with (system prompt, then "Question:")
    keys_values: list[tuple[Tensor, Tensor]]  # per layer, (1, H_kv, len(ids), D)
    baseline: list[float]  # the labels' log-probabilities for the content-free question


@dataclass
class LabelChoice:
    instruction: str  # the system prompt: what is decided and what each label means
    labels: tuple[str, ...]
    _openings: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False
    )

    def scores(self, generator: Generator | RemoteGenerator, question: str) -> dict[str, float] | None:
        """Calibrated log-probabilities of the labels for `question` (higher = more likely); they are
        log-softmax-normalized over the labels, so they read as log-probabilities of a choice. None where a
        served model offers no log-probabilities."""
        if isinstance(generator, RemoteGenerator):
            baseline = self._served_baseline(generator)
            raw = self._served_logprobs(generator, question) if baseline is not None else None
            if raw is None:
                return None
        else:
            opening = self._opening(generator)
            raw, baseline = self._label_logprobs(generator, opening, question), opening.baseline
        calibrated = [value - prior for value, prior in zip(raw, baseline, strict=True)]
        normalizer = math.log(sum(math.exp(value) for value in calibrated))
        return {label: value - normalizer for label, value in zip(self.labels, calibrated, strict=True)}

    def uniform(self) -> dict[str, float]:
        """Every label equally likely: the model's vote left out."""
        return {label: -math.log(len(self.labels)) for label in self.labels}

    def messages(self, question: str) -> list[dict]:
        return [
            {"role": "system", "content": self.instruction},
            {
                "role": "user",
                "content": f"Question: {question}\nAnswer with one word: {' or '.join(self.labels)}.",
            },
        ]

    def prompt_ids(self, generator: Generator, question: str) -> list[int]:
        return generator.chat_prompt_ids(self.messages(question))

    def _served_baseline(self, generator: RemoteGenerator) -> list[float] | None:
        if generator not in self._openings:
            self._openings[generator] = self._served_logprobs(generator, CONTENT_FREE_QUESTION)
        return self._openings[generator]

    def _served_logprobs(self, generator: RemoteGenerator, question: str) -> list[float] | None:
        _, top = generator.scored_reply(self.messages(question), max_new_tokens=1, options=self.labels)
        if top is None:
            return None
        return [label_logprob(top, label, generator.first_token_text(label)) for label in self.labels]

    @torch.inference_mode()
    def _opening(self, generator: Generator) -> _CachedOpening:
        """The cached opening of this model's prompts, from one pass over the content-free question's prompt:
        its keys and values up to the question, and its label log-probabilities (the calibration)."""
        opening = self._openings.get(generator)
        if opening is None:
            content_free = self.prompt_ids(generator, CONTENT_FREE_QUESTION)
            # Where two questions' prompts part is where the question begins (its first word may merge with
            # the space after "Question:", so the split is found on tokens, not on text).
            ids = _common_prefix(content_free, self.prompt_ids(generator, "x"))
            model = generator.model
            model.setup_caches(max_batch_size=1, max_seq_len=len(content_free))
            logits = model(_tensor(model, [content_free]), _positions(model, 0, len(content_free)))[0, -1]
            keys_values = [
                (
                    layer.attention.kv_cache.k_cache[:1, :, : len(ids)].clone(),
                    layer.attention.kv_cache.v_cache[:1, :, : len(ids)].clone(),
                )
                for layer in model.layers
            ]  # copied out: the next generation overwrites the model's cache
            opening = _CachedOpening(ids, keys_values, self._logprobs(generator, logits))
            self._openings[generator] = opening
        return opening

    @torch.inference_mode()
    def _label_logprobs(self, generator: Generator, opening: _CachedOpening, question: str) -> list[float]:
        """One forward pass over the question and the prompt's ending, continuing the cached opening."""
        prompt = self.prompt_ids(generator, question)
        shared = len(_common_prefix(opening.ids, prompt))
        model = generator.model
        model.setup_caches(max_batch_size=1, max_seq_len=len(prompt))
        for layer, (keys, values) in zip(model.layers, opening.keys_values, strict=True):
            layer.attention.kv_cache.k_cache[:1, :, :shared] = keys[:, :, :shared]
            layer.attention.kv_cache.v_cache[:1, :, :shared] = values[:, :, :shared]
        logits = model(_tensor(model, [prompt[shared:]]), _positions(model, shared, len(prompt)))[0, -1]
        return self._logprobs(generator, logits)

    def _logprobs(self, generator: Generator, logits: Tensor) -> list[float]:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return logprobs[first_token_ids(generator, self.labels)].tolist()


def _tensor(model: torch.nn.Module, rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, device=model.output.weight.device)


def _positions(model: torch.nn.Module, start: int, end: int) -> Tensor:
    return torch.arange(start, end, device=model.output.weight.device)


def label_logprob(top: dict[str, float], label: str, first_token: str | None) -> float:
    """A label's log-probability from a step's top tokens: its first token's where that token is known, else
    that of any listed token that starts the label (summed); the least listed where none is."""
    return listed_logprob(
        top, first_token, lambda token: bool(token.strip()) and label.startswith(token.strip())
    )


def listed_logprob(top: dict[str, float], first_token: str | None, matches: Callable[[str], bool]) -> float:
    """The log-probability of a reply's start from a step's top tokens (token text → logprob): `first_token`'s
    where the tokenizer names it, else the summed probability of the listed tokens that `matches`; a start the
    list does not hold is at most as likely as its least likely entry."""
    floor = min(top.values())
    if first_token is not None:
        return top.get(first_token, floor)
    matching = [value for token, value in top.items() if matches(token)]
    return math.log(sum(math.exp(value) for value in matching)) if matching else floor


def first_token_ids(generator: Generator, labels: tuple[str, ...]) -> list[int]:
    ids = [generator.tokenizer.encode(label)[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {labels} share a first token for {generator.name}; reword them")
    return ids


def _common_prefix(first: list[int], second: list[int]) -> list[int]:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return first[:length]
