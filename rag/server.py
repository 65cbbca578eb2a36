"""`dsarag serve`'s HTTP API over warm models: OpenAI-compatible chat completions (`/v1/models`,
`/v1/chat/completions`, streamed as server-sent events), the whole agent (`/v1/ask`, the JSON of
`dsarag ask --json`) and `/health`. One model job runs at a time, on one worker thread."""

import asyncio
import json
import os
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsarag.base.errors import (
    EXIT_BAD_INPUT,
    EXIT_LOCKED,
    EXIT_MISSING_INPUT,
    EXIT_MODEL,
    EXIT_STORE,
    DsaragError,
)
from dsarag.rag.ask import ask as run_ask
from dsarag.rag.ask_options import AskOptions, AskResult
from dsarag.rag.server_logprobs import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, LogitHook
from dsarag.rag.warm_models import WarmModels

DEFAULT_MAX_TOKENS = 512  # a chat completion without max_tokens, capped by the room left in the context
HTTP_STATUS_OF_EXIT = {
    EXIT_BAD_INPUT: 400,
    EXIT_MISSING_INPUT: 404,
    EXIT_STORE: 409,
    EXIT_MODEL: 400,  # a model error of a request: its prompt and max tokens exceed the context
    EXIT_LOCKED: 423,
}
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServerLimits:
    max_body_bytes: int
    max_waiting: int  # requests queued behind the running one before new ones get 503


class ApiError(Exception):
    """An error answered as OpenAI's error JSON; `exit_code` tells `dsarag ask` which code to exit with."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", exit_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.exit_code = status, message, kind, exit_code

    @classmethod
    def of(cls, error: DsaragError) -> "ApiError":
        status = HTTP_STATUS_OF_EXIT.get(error.exit_code, 500)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return cls(status, str(error), kind, error.exit_code)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "code": self.status,
                "exit_code": self.exit_code,
            }
        }


def stopping_error() -> ApiError:
    return ApiError(503, "the server is shutting down — retry once it is back", "server_error")


class GenerationStopped(Exception):
    """Raised inside a generation's text callback: its client left, or the server is stopping."""


class ModelWorker:
    """One model job at a time on one thread (the generator's KV cache is shared); a bounded wait queue."""

    def __init__(self, max_waiting: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsarag-model")
        self.max_waiting = max_waiting
        self.pending = 0  # running + waiting; touched only on the event loop
        self.stopping = threading.Event()

    def submit(self, job: Callable[[], Any]) -> asyncio.Future:
        if self.stopping.is_set():
            raise stopping_error()
        if self.pending > self.max_waiting:
            raise ApiError(
                503, f"{self.pending} requests are ahead of this one — retry later", "server_error"
            )
        self.pending += 1
        future = asyncio.wrap_future(self.executor.submit(job))
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: asyncio.Future) -> None:
        self.pending -= 1
        if not future.cancelled():
            future.exception()  # a streamed job's error reaches its client as an event, not through here

    def check(self, cancelled: threading.Event) -> None:
        if cancelled.is_set() or self.stopping.is_set():
            raise GenerationStopped

    def stop(self) -> None:
        """Running generations stop at their next token; queued jobs are dropped."""
        self.stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict:
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise ApiError(400, "messages: only text content parts are supported by this local model")
            text = "".join(part.text or "" for part in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields it has and this server cannot honour are refused by name."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(
        1.0, ge=0, le=2
    )  # OpenAI's defaults, so clients that omit them get its meaning
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    tools: list[dict] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[int, float] | None = None  # token id → added to its logit, -100 … 100
    response_format: dict | None = None
    attention: Literal["auto", "dense", "sparse"] = "auto"  # dsarag's own: DSA or dense prefill
    # vLLM's and SGLang's extension: the last (assistant) message is continued rather than answered.
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    def refuse_unsupported(self) -> None:
        unsupported = {
            "n": self.n != 1,
            "stop": bool(self.stop),
            "tools": bool(self.tools),
            "logprobs": bool(self.logprobs) and self.stream,
            "response_format": (self.response_format or {}).get("type", "text") != "text",
            "add_generation_prompt": not self.add_generation_prompt and not self.continue_final_message,
        }
        for name, given in unsupported.items():
            if given:
                what = " with stream" if name == "logprobs" else ""
                raise ApiError(400, f"{name}{what}: not supported by dsarag serve — leave it out")
        if any(abs(bias) > MAX_LOGIT_BIAS for bias in (self.logit_bias or {}).values()):
            raise ApiError(400, f"logit_bias: biases go from -{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ApiError(
                400, "continue_final_message: the last message must be the assistant's to continue"
            )

    def template_messages(self) -> tuple[list[dict], str]:
        """The messages the chat template renders, and the reply's start when the last one is continued."""
        messages = [message.as_template_message() for message in self.messages]
        if self.continue_final_message:
            return messages[:-1], messages[-1]["content"]
        return messages, ""


class AskRequest(BaseModel):
    """`dsarag ask`'s options by their command-line names; paths are absolute (the server's cwd is not yours)."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    docs: str | None = None
    store: str | None = None
    model: str | None = None
    chunks: int = Field(AskOptions.chunks, ge=1)
    context_tokens: int = Field(AskOptions.context_tokens, ge=64)
    max_new_tokens: int = Field(AskOptions.max_new_tokens, ge=1)
    reader: str = AskOptions.reader
    temperature: float = Field(AskOptions.temperature, ge=0)
    attention: str = AskOptions.attention
    topk: int | None = None
    strategy: str | None = None
    critical: bool = False
    compare_dense: bool = False
    price_per_hour: float = Field(AskOptions.price_per_hour, ge=0)
    record_cost: bool = True
    stream: bool = False

    def options(self) -> AskOptions:
        from dsarag.rag.config import resolve_store

        docs, store = (_absolute(name, value) for name, value in (("docs", self.docs), ("store", self.store)))
        return AskOptions(
            question=self.question,
            store=None if store is None and docs is None else resolve_store(store, docs),
            docs=docs,
            model=self.model,
            chunks=self.chunks,
            context_tokens=self.context_tokens,
            max_new_tokens=self.max_new_tokens,
            reader=self.reader,
            temperature=self.temperature,
            attention=self.attention,
            attention_topk=self.topk,
            strategy=self.strategy,
            critical=self.critical,
            compare_dense=self.compare_dense,
            price_per_hour=self.price_per_hour,
            record_cost=self.record_cost,
        )


def _absolute(name: str, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ApiError(
            400, f"{name}: {value!r} is relative — pass an absolute path (the server has its own cwd)"
        )
    return path


def sse(data: object) -> str:
    return f"data: {json.dumps(data, default=str)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def create_app(
    warm: WarmModels,
    url: str,
    console: Console,
    limits: ServerLimits,
    api_key: str | None,
    loopback_only: bool,
) -> tuple[FastAPI, ModelWorker]:
    """The API over `warm`; the worker is returned so the process can stop it on SIGTERM."""
    generator = warm.generator
    worker = ModelWorker(limits.max_waiting)
    started_at = int(time.time())
    app = FastAPI(title="dsarag", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if loopback_only:
        app.add_middleware(LoopbackHostOnly)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key — send `Authorization: Bearer $DSARAG_API_KEY`")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        if error.status >= 500:  # the server's side: an operator sees busy or stopping answers in the log
            console.print(f"{request.url.path}: {error.status} {error.message}", highlight=False)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(DsaragError)
    async def _dsarag_error(_: Request, error: DsaragError) -> JSONResponse:
        return await _api_error(_, ApiError.of(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        return await _api_error(_, ApiError(400, f"{where}: {first['msg']}", exit_code=EXIT_BAD_INPUT))

    @app.exception_handler(Exception)
    async def _internal(_: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises it after this reply, and uvicorn logs the traceback on the server's stderr.
        message = f"internal error: {type(error).__name__}: {error} — the server log has the traceback"
        return await _api_error(_, ApiError(500, message, "server_error", 1))

    def error_event(error: Exception) -> dict:
        """A failure after a stream began: its headers (200) are sent, so the error is the last event."""
        if isinstance(error, GenerationStopped):
            return stopping_error().body()
        if isinstance(error, DsaragError):
            return ApiError.of(error).body()
        console.print("".join(traceback.format_exception(error)), highlight=False, markup=False)
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", "server_error", 1).body()

    def check_model(spec: str | None) -> None:
        """A request's model must be this server's: its name, or any spec that resolves to the loaded folder."""
        if spec is None or spec == generator.name:
            return
        from dsarag.indexer_model.resolve import resolve_model

        try:
            same = resolve_model(spec).resolve() == Path(generator.folder).resolve()
        except DsaragError:
            same = False
        if not same:
            raise ApiError(
                404, f"model {spec!r}: this server runs {generator.name} — pass model={generator.name!r}, or "
                f"start `dsarag serve --model {spec}`", exit_code=EXIT_MODEL,
            )  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "stopping" if worker.stopping.is_set() else "ok",
            "model": generator.name,
            "pid": os.getpid(),
            "busy": worker.pending > 0,
            "waiting": max(worker.pending - 1, 0),
            "open_stores": warm.open_stores,
            "uptime_s": round(time.time() - started_at, 1),
        }

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict:
        card = {
            "id": generator.name,
            "object": "model",
            "created": started_at,
            "owned_by": "dsarag",
            "max_context": generator.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: ChatRequest) -> Response:
        request.refuse_unsupported()
        check_model(request.model)
        messages, reply_start = request.template_messages()
        prompt_tokens = len(await asyncio.to_thread(generator.chat_prompt_ids, messages))
        prompt_tokens += len(generator.tokenizer.encode(reply_start)) if reply_start else 0
        room = generator.max_context - prompt_tokens
        asked = request.max_completion_tokens or request.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400, f"max_tokens: the messages take {prompt_tokens} tokens of the model's context of "
                f"{generator.max_context}, leaving {max(room, 0)} — shorten the messages or lower max_tokens",
            )  # fmt: skip
        max_tokens = asked or min(DEFAULT_MAX_TOKENS, room)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        cancelled = threading.Event()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        received = time.perf_counter()
        first_text_s: list[float] = []
        vocabulary = generator.model.args.vocab_size
        if any(not 0 <= token_id < vocabulary for token_id in request.logit_bias or {}):
            raise ApiError(400, f"logit_bias: token ids of this model go from 0 to {vocabulary - 1}")
        hook = None
        if request.logprobs or request.logit_bias:
            hook = LogitHook(request.top_logprobs or 0, request.logit_bias or {}, bool(request.logprobs))

        def on_text(text: str) -> None:
            worker.check(cancelled)
            if not first_text_s:
                first_text_s.append(time.perf_counter() - received)
            if request.stream:
                loop.call_soon_threadsafe(events.put_nowait, text)

        def generate():  # noqa: ANN202 - GenerationResult
            worker.check(cancelled)
            return generator.answer(
                messages,
                max_new_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                attention=request.attention,
                on_text=on_text,
                reply_start=reply_start,
                constrain=hook,
            )

        def log(result) -> None:  # noqa: ANN001 - GenerationResult
            first = f"{first_text_s[0]:.2f}" if first_text_s else "-"
            console.print(
                f"chat {'stream ' if request.stream else ''}{result.prompt_tokens}+{result.new_tokens} tokens "
                f"({result.attention}): prefill {result.prefill_s:.2f} s, first text {first} s, "
                f"total {time.perf_counter() - received:.2f} s",
                highlight=False,
            )

        def usage(result) -> dict:  # noqa: ANN001 - GenerationResult
            return {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.new_tokens,
                "total_tokens": result.prompt_tokens + result.new_tokens,
            }

        def timings(result) -> dict:  # noqa: ANN001 - GenerationResult
            return {
                "prefill_s": round(result.prefill_s, 4),
                "decode_s": round(result.decode_s, 4),
                "attention": result.attention,
                "topk": result.topk,
            }

        def finish_reason(result) -> str:  # noqa: ANN001 - GenerationResult
            return "stop" if result.stop_reason == "eos" else "length"

        job = worker.submit(generate)
        if not request.stream:
            result = await job_result(job, cancelled)
            log(result)
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": finish_reason(result),
                "logprobs": {"content": hook.content(result.token_ids, generator.tokenizer)}
                if request.logprobs
                else None,
            }
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": generator.name,
                    "choices": [choice],
                    "usage": usage(result),
                    "timings": timings(result),
                }
            )

        def chunk(delta: dict, reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": generator.name,
                    "choices": [choice],
                }
            )

        async def stream() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for text in _texts_until(job, events):
                    yield chunk({"content": text})
                try:
                    result = job.result()
                except Exception as error:  # noqa: BLE001 - every failure becomes the stream's last event
                    yield sse(error_event(error))
                    yield SSE_DONE
                    return
                log(result)
                yield chunk({}, finish_reason(result))
                if request.stream_options is not None and request.stream_options.include_usage:
                    final = json.loads(chunk({})[len("data: ") :])
                    yield sse(final | {"choices": [], "usage": usage(result), "timings": timings(result)})
                yield SSE_DONE
            finally:
                cancelled.set()  # the client left mid-stream: the generation stops at its next token

        return StreamingResponse(stream(), media_type="text/event-stream", headers=NO_BUFFERING)

    @app.post("/v1/ask", dependencies=[Depends(require_key)])
    async def ask(request: AskRequest) -> Response:
        check_model(request.model)
        options = request.options()
        cancelled = threading.Event()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        received = time.perf_counter()

        def post(event: dict) -> None:
            worker.check(cancelled)
            if request.stream:
                loop.call_soon_threadsafe(events.put_nowait, event)

        def answer() -> AskResult:
            worker.check(cancelled)
            # Streamed internally either way, so that a stopping server or a departed client ends it early.
            return run_ask(
                options,
                console=console,
                on_text=lambda text: post({"text": text}),
                stream=True,
                on_retry=lambda reason: post({"retry": reason}),
                warm=warm,
            )

        def reply(result: AskResult) -> dict:
            console.print(
                f"ask {result.tokens['prompt']}+{result.tokens['generated']} tokens, {result.strategy}: "
                f"total {time.perf_counter() - received:.2f} s",
                highlight=False,
            )
            return result.to_json() | {"server": url}

        job = worker.submit(answer)
        if not request.stream:
            result = await job_result(job, cancelled)
            return Response(json.dumps(reply(result), default=str), media_type="application/json")

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in _texts_until(job, events):
                    yield sse(event)
                try:
                    result = job.result()
                except Exception as error:  # noqa: BLE001 - every failure becomes the stream's last event
                    yield sse(error_event(error))
                else:
                    yield sse({"result": reply(result)})
                yield SSE_DONE
            finally:
                cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=NO_BUFFERING)

    return app, worker


NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def job_result(job: asyncio.Future, cancelled: threading.Event) -> Any:
    """The model job's result: a stop signal becomes the 503 of a stopping server, and a client that leaves
    cancels the generation at its next token."""
    try:
        return await job
    except GenerationStopped:
        raise stopping_error() from None
    except asyncio.CancelledError:
        cancelled.set()
        raise


async def _texts_until(job: asyncio.Future, events: asyncio.Queue) -> AsyncIterator[Any]:
    """The events a job posts while it runs, then those still queued when it ends."""
    while not job.done():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()


class BodyLimit:
    """Reads the request body first and refuses one over `max_bytes` with 413, before any endpoint parses it
    (the bodies this API takes are small JSON, so buffering them costs nothing)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(
            413, f"request body over {self.max_bytes:,} bytes — send less, or start the server with a larger "
            "--max-body-kb", exit_code=EXIT_BAD_INPUT,
        )  # fmt: skip
        declared = dict(scope["headers"]).get(b"content-length", b"")
        body, more = b"", not (declared.isdigit() and int(declared) > self.max_bytes)
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= self.max_bytes
        if len(body) > self.max_bytes or (declared.isdigit() and int(declared) > self.max_bytes):
            await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, which ends a stream early
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class LoopbackHostOnly:
    """Answers only requests addressed to a loopback name, so a web page cannot reach the server through a DNS
    name rebound to 127.0.0.1 (a server started with --allow-remote skips this)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _loopback_host(dict(scope["headers"]).get(b"host", b"").decode()):
            refused = ApiError(421, "this server answers only requests to 127.0.0.1, ::1 or localhost")
            await JSONResponse(refused.body(), status_code=421)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _loopback_host(host_header: str) -> bool:
    name = host_header if host_header.endswith("]") else host_header.rsplit(":", 1)[0]
    name = name.strip("[]")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ip_address(name).is_loopback
    except ValueError:
        return False
