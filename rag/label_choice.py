"""Constrained decisions by the local LLM: score a fixed set of labels by the model's log-likelihood.

One forward pass per decision: the prompt ends where the assistant's reply begins, and each label is scored
by the log-probability of its first token there (labels are chosen so their first tokens differ). The scores
are calibrated by subtracting the same labels' log-probabilities for a content-free question ("N/A"), which
removes the model's prior preference for some labels (Zhao et al., 2021, "Calibrate before use").
"""

import math
from dataclasses import dataclass, field

import torch

from dsarag.indexer_model.generate import Generator

CONTENT_FREE_QUESTION = "N/A"


@dataclass
class LabelChoice:
    instruction: str  # the system prompt: what is decided and what each label means
    labels: tuple[str, ...]
    _baseline: dict[int, list[float]] = field(default_factory=dict, repr=False)  # id(generator) → log-probs

    def scores(self, generator: Generator, question: str) -> dict[str, float]:
        """Calibrated log-probabilities of the labels for `question` (higher = more likely); they are
        log-softmax-normalized over the labels, so they read as log-probabilities of a choice."""
        raw = self._label_logprobs(generator, question)
        baseline = self._baseline.get(id(generator))
        if baseline is None:
            baseline = self._baseline[id(generator)] = self._label_logprobs(generator, CONTENT_FREE_QUESTION)
        calibrated = [value - prior for value, prior in zip(raw, baseline, strict=True)]
        normalizer = math.log(sum(math.exp(value) for value in calibrated))
        return {label: value - normalizer for label, value in zip(self.labels, calibrated, strict=True)}

    def _first_token_ids(self, generator: Generator) -> list[int]:
        ids = [generator.tokenizer.encode(label)[0] for label in self.labels]
        if len(set(ids)) != len(ids):
            raise ValueError(f"labels {self.labels} share a first token for {generator.name}; reword them")
        return ids

    @torch.inference_mode()
    def _label_logprobs(self, generator: Generator, question: str) -> list[float]:
        messages = [
            {"role": "system", "content": self.instruction},
            {
                "role": "user",
                "content": f"Question: {question}\nAnswer with one word: {' or '.join(self.labels)}.",
            },
        ]
        prompt_ids = generator.chat_prompt_ids(messages)
        model = generator.model
        device = model.output.weight.device
        model.setup_caches(max_batch_size=1, max_seq_len=len(prompt_ids))
        logits = model(
            torch.tensor([prompt_ids], device=device), torch.arange(len(prompt_ids), device=device)
        )[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return [float(logprobs[token_id]) for token_id in self._first_token_ids(generator)]
