"""A generator behind an OpenAI-compatible server (`--model openai:http://HOST:PORT/v1#MODEL`): vLLM, SGLang,
another `dsarag serve`. The agent drives it as it drives the local model: answers stream, and the label
decisions and the yes/no reader read the first step's `top_logprobs` where the server offers them. Failures
become one-line errors (rag/remote_endpoint.py).
"""

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dsarag.base.errors import DsaragError, ModelError, ServerError
from dsarag.indexer_model.generate import GenerationResult
from dsarag.rag.remote_endpoint import (
    CONNECT_TIMEOUT_S,
    MAX_RETRIES,
    Endpoint,
    read_timeout,
    translate_error,
)

if TYPE_CHECKING:
    from openai import OpenAI

    from dsarag.indexer_model.tokenizer import ChatTokenizer

TOP_LOGPROBS = 20  # the most OpenAI and vLLM (by default) return
# Added to each scored option's first token: the options top the list whatever the model's preference, and
# biased alike, their differences stay the model's (where the server reports logprobs after the bias, as
# dsarag serve does; a server reporting raw ones scores unlisted options as the least listed).
OPTION_BIAS = 100.0
CHARS_PER_TOKEN = 4.0  # the estimate where the served model's tokenizer is not on this machine
UNKNOWN_CONTEXT = 8192  # the context assumed where the server does not say


class RemoteGenerator:
    """The `Generator` interface the agent uses (name, max_context, count_tokens, prompt_tokens, answer), over
    a served model; `scored_reply` adds the first step's top log-probabilities."""

    def __init__(
        self,
        endpoint: Endpoint,
        client: "OpenAI",
        model: str,
        card: dict,
        tokenizer: "ChatTokenizer | None",
    ) -> None:
        self.endpoint, self.client, self.served_model, self.tokenizer = endpoint, client, model, tokenizer
        self.name = f"{model}@{endpoint.base_url}"
        self.max_context = int(card.get("max_context") or card.get("max_model_len") or UNKNOWN_CONTEXT)
        self.dsarag_server = card.get("owned_by") == "dsarag"  # takes dsarag's own `attention` field
        self.offers_logprobs = True  # until the server refuses them
        self.continues_replies = True  # vLLM/SGLang's continue_final_message, until refused
        self.takes_logit_bias = True  # until refused
        self.load_s = 0.0

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def prompt_tokens(self, messages: list[dict]) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.chat_ids(messages, add_generation_prompt=True))
        return sum(self.count_tokens(message["content"]) + 4 for message in messages)

    def first_token_text(self, text: str) -> str | None:
        """The token the served model's reply would start `text` with, where its tokenizer is known here."""
        return None if self.tokenizer is None else self.tokenizer.decode(self.tokenizer.encode(text)[:1])

    def answer(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
        top_p: float = 0.9,
        seed: int | None = 0,
        attention: str = "auto",
        topk: int | None = None,
        reply_start: str = "",
        constrain: Callable | None = None,
    ) -> GenerationResult:
        """The reply, streamed: time to the first text is the prefill's, the rest the decode's."""
        if constrain is not None:
            raise ModelError(f"{self.name}: constrained decoding runs on local models only")
        started = time.perf_counter()
        stream = self._create(
            lambda: self._request(messages, max_new_tokens, temperature, top_p, seed, attention, reply_start),
            stream=True,
            stream_options={"include_usage": True},
        )
        text, first_s, usage, finish, timings = "", None, None, None, {}
        with self._errors(mid_answer=True):
            for chunk in stream:
                for choice in chunk.choices:
                    delta = choice.delta.content or ""
                    if delta:
                        first_s = first_s if first_s is not None else time.perf_counter() - started
                        text += delta
                        if on_text is not None:
                            on_text(delta)
                    finish = choice.finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage
                    timings = (chunk.model_extra or {}).get("timings") or {}
        if finish is None:
            raise ServerError(
                f"{self.endpoint.base_url}: the stream ended before the answer did — the server stopped"
            )
        total_s = time.perf_counter() - started
        return self._result(text, messages, usage, finish, first_s or total_s, total_s, timings, topk)

    def scored_reply(
        self,
        messages: list[dict],
        max_new_tokens: int,
        reply_start: str = "",
        attention: str = "auto",
        topk: int | None = None,
        options: tuple[str, ...] = (),
    ) -> tuple[GenerationResult, dict[str, float] | None]:
        """A greedy reply (not streamed) and its first step's top log-probabilities by token text (None when
        the server offers none). `options`: texts the reply may start with, whose first tokens are biased
        alike where the tokenizer is known here (the reply is then one of them)."""

        def request() -> dict:
            built = self._request(messages, max_new_tokens, 0.0, 1.0, 0, attention, reply_start)
            if not self.offers_logprobs:
                return built
            built |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
            if options and self.tokenizer is not None and self.takes_logit_bias:
                first_ids = {self.tokenizer.encode(option)[0] for option in options}
                built["logit_bias"] = {str(token_id): OPTION_BIAS for token_id in first_ids}
            return built

        started = time.perf_counter()
        response = self._create(request)
        total_s = time.perf_counter() - started
        choice = response.choices[0]
        top = None
        content = choice.logprobs.content if choice.logprobs is not None else None
        if content and content[0].top_logprobs:
            top = {}
            for entry in content[0].top_logprobs:
                top[entry.token] = max(entry.logprob, top.get(entry.token, -math.inf))
        elif self.offers_logprobs:
            self.offers_logprobs = False  # accepted, but none came back
        timings = (response.model_extra or {}).get("timings") or {}
        text = choice.message.content or ""
        result = self._result(
            text, messages, response.usage, choice.finish_reason, total_s, total_s, timings, topk
        )
        return result, top

    def _request(
        self,
        messages: list[dict],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        attention: str,
        reply_start: str,
    ) -> dict:
        extra: dict = {}
        if reply_start and self.continues_replies:
            messages = [*messages, {"role": "assistant", "content": reply_start}]
            extra |= {"continue_final_message": True, "add_generation_prompt": False}
        if self.dsarag_server:
            extra["attention"] = attention if attention in ("dense", "sparse") else "auto"
        request = {
            "model": self.served_model,
            "messages": messages,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p if temperature > 0 else 1.0,
        }
        if seed is not None:
            request["seed"] = seed
        return request | ({"extra_body": extra} if extra else {})

    def _result(
        self,
        text: str,
        messages: list[dict],
        usage: object,
        finish: str | None,
        first_s: float,
        total_s: float,
        timings: dict,
        topk: int | None,
    ) -> GenerationResult:
        prompt = getattr(usage, "prompt_tokens", None) or self.prompt_tokens(messages)
        new = getattr(usage, "completion_tokens", None)
        new = new if new is not None else self.count_tokens(text)
        attention = timings.get("attention") or "unknown"  # dsarag serve says; other servers do not
        return GenerationResult(
            text=text,
            token_ids=[],
            prompt_tokens=prompt,
            new_tokens=new,
            prefill_s=first_s,
            decode_s=max(total_s - first_s, 0.0),
            decode_steps=max(new - 1, 0),
            stop_reason="eos" if finish == "stop" else "max_new_tokens",
            attention=attention,
            decode_attention=attention,
            topk=timings.get("topk", topk if attention == "sparse" else None),
            backend="remote",
        )

    def _create(self, request: Callable[[], dict], **fields: object) -> object:
        """One chat completion; a server that refuses an optional field by name is asked again without it."""
        while True:
            try:
                with self._errors():
                    return self.client.chat.completions.create(**request(), **fields)
            except ModelError as error:
                if not self._give_up_refused(str(error)):
                    raise

    def _give_up_refused(self, message: str) -> bool:
        """Stop sending the optional field a refusal names; False when it names none still sent."""
        if "logit_bias" in message and self.takes_logit_bias:
            self.takes_logit_bias = False
            return True
        if "logprobs" in message and self.offers_logprobs:
            self.offers_logprobs = False
            return True
        if (
            "continue_final_message" in message or "add_generation_prompt" in message
        ) and self.continues_replies:
            self.continues_replies = False
            return True
        return False

    def _errors(self, mid_answer: bool = False) -> "_RemoteErrors":
        return _RemoteErrors(self, mid_answer)


class _RemoteErrors:
    """Turns the client's and the connection's exceptions into one-line dsarag errors."""

    def __init__(self, generator: RemoteGenerator, mid_answer: bool) -> None:
        self.generator, self.mid_answer = generator, mid_answer

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _traceback: object) -> bool:
        if error is None or isinstance(error, DsaragError):
            return False
        endpoint, model = self.generator.endpoint, self.generator.served_model
        raise translate_error(error, endpoint, model, self.mid_answer) from error


def connect(spec: str) -> RemoteGenerator:
    """Check the server answers and serves the model (the only one it serves when the spec names none)."""
    from openai import OpenAI, Timeout

    endpoint = Endpoint.parse(spec)
    client = OpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key or "EMPTY",  # local servers need none; the client insists on one
        max_retries=MAX_RETRIES,
        timeout=Timeout(read_timeout(), connect=CONNECT_TIMEOUT_S),
    )
    started = time.perf_counter()
    try:  # one retry: a wrong port should fail in a second, not after the answers' back-off
        cards = {card.id: card.model_dump() for card in client.with_options(max_retries=1).models.list()}
    except Exception as error:
        raise translate_error(error, endpoint, endpoint.model) from error
    served = ", ".join(sorted(cards)) or "nothing"
    model = endpoint.model
    if model is None:
        if len(cards) != 1:
            raise ModelError(
                f"{endpoint.base_url} serves {served} — name one: openai:{endpoint.base_url}#MODEL"
            )
        model = next(iter(cards))
    if model not in cards:
        raise ModelError(
            f"{endpoint.base_url}: model {model!r} is not served there (it serves {served}) — "
            f"pass openai:{endpoint.base_url}#{next(iter(sorted(cards)), 'MODEL')}"
        )
    generator = RemoteGenerator(endpoint, client, model, cards[model], local_tokenizer(model))
    generator.load_s = time.perf_counter() - started
    return generator


def local_tokenizer(model: str) -> "ChatTokenizer | None":
    """The served model's tokenizer when the same model is on this machine (exact token counts, exact label
    tokens); else None, and counts are estimated."""
    from dsarag.indexer_model.resolve import resolve_model
    from dsarag.indexer_model.tokenizer import ChatTokenizer

    if model.lower().endswith(".gguf"):
        return None  # resolving a GGUF path would convert it: too much for a tokenizer
    try:
        return ChatTokenizer(resolve_model(model))
    except (DsaragError, OSError, ValueError):
        return None
