"""A chat completion's `logit_bias` and `logprobs`: the bias added to the logits before sampling, and each
step's log-probabilities in OpenAI's response form (`logprobs.content`: the chosen token's and the
`top_logprobs` likeliest), taken after the bias. A remote client scoring labels (rag/remote_generator.py)
biases their first tokens equally: they top the list, and their differences are the model's own."""

import torch
from torch import Tensor

from dsarag.indexer_model.tokenizer import ChatTokenizer

MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 to 100


class LogitHook:
    """A `constrain` hook for `generate`: adds the bias to each step's logits and, when recording, keeps the
    step's top tokens and, one step later (once the sampled token is known), the chosen token's log-probability."""

    def __init__(self, top: int, bias: dict[int, float], record: bool) -> None:
        self.top, self.record = top, record
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32)
        self.steps: list[tuple[list[int], list[float]]] = []  # per step: top token ids and their logprobs
        self.chosen: list[float] = []
        self._last: Tensor | None = None

    def __call__(self, ids: list[int], logits: Tensor) -> Tensor:
        if len(self.bias_ids):
            # A float32 copy: bf16 would round a biased logit of ~100 to 0.5, and the caller's logits stay as they were.
            logits = logits.to(torch.float32, copy=True)
            logits[self.bias_ids.to(logits.device)] += self.bias_values.to(logits.device)
        if not self.record:
            return logits
        if ids:
            self._record_chosen(ids[-1])
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, token_ids = logprobs.topk(self.top) if self.top else (logprobs[:0], logprobs[:0].long())
        self.steps.append((token_ids.tolist(), values.tolist()))
        self._last = logprobs
        return logits

    def _record_chosen(self, token_id: int) -> None:
        self.chosen.append(float(self._last[token_id]))

    def content(self, token_ids: list[int], tokenizer: ChatTokenizer) -> list[dict]:
        """One entry per generated token (a stop token is not part of the content)."""
        if len(self.chosen) < len(token_ids) and self._last is not None:
            self._record_chosen(token_ids[-1])
        return [
            {
                **_token(token_id, tokenizer),
                "logprob": chosen,
                "top_logprobs": [
                    {**_token(top_id, tokenizer), "logprob": value}
                    for top_id, value in zip(*self.steps[step], strict=True)
                ],
            }
            for step, (token_id, chosen) in enumerate(zip(token_ids, self.chosen, strict=False))
        ]


def _token(token_id: int, tokenizer: ChatTokenizer) -> dict:
    text = tokenizer.decode([token_id])
    # A token holding part of a multi-byte character decodes to U+FFFD: its bytes are unknown here.
    return {"token": text, "bytes": None if "\ufffd" in text else list(text.encode())}
