"""`dsarag ask` through a running `dsarag serve`: find one with the asked model, send it the question, and read
back what `ask` would have returned; without one (or when it cannot be reached) the question runs here."""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import httpx
from rich.console import Console

from dsarag.base.errors import EXIT_SERVER, DsaragError, ServerError
from dsarag.rag.ask_options import AskOptions, AskResult
from dsarag.rag.remote_endpoint import is_remote_spec
from dsarag.rag.server_state import live_states

API_KEY_ENV = "DSARAG_API_KEY"
HEALTH_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 2.0


@dataclass
class FoundServer:
    url: str
    model: str
    pid: int


class ServerUnreachable(Exception):
    """The server could not be reached before anything was answered: the question can still run here."""


class RemoteError(DsaragError):
    """An error the server answered with; it exits with the code the same error has in-process."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code or EXIT_SERVER


def find_server(model: str | None) -> FoundServer | None:
    """A live server (its pid runs and /health answers as that pid) that runs the generator `model` names."""
    states = live_states()
    if not states or is_remote_spec(model):  # a served model is asked directly
        return None
    from dsarag.indexer_model.resolve import resolve_model

    try:
        folder = str(resolve_model(model).resolve())
    except DsaragError:
        return None  # answering in-process reports the bad --model as it always has
    for state in states:
        if state.model_folder != folder or (state.needs_api_key and not os.environ.get(API_KEY_ENV)):
            continue
        try:
            health = httpx.get(f"{state.url}/health", timeout=HEALTH_TIMEOUT_S, trust_env=False)
            if health.status_code == 200 and health.json().get("pid") == state.pid:
                return FoundServer(state.url, state.model, state.pid)
        except (httpx.HTTPError, ValueError):
            continue
    return None


def ask_request(options: AskOptions) -> dict:
    """`/v1/ask`'s body for `options`: the command line's names, absolute paths."""
    return {
        "question": options.question,
        "docs": None if options.docs is None else str(Path(options.docs).expanduser().resolve()),
        "store": None if options.store is None else str(Path(options.store).expanduser().resolve()),
        "model": options.model,
        "chunks": options.chunks,
        "context_tokens": options.context_tokens,
        "max_new_tokens": options.max_new_tokens,
        "reader": options.reader,
        "temperature": options.temperature,
        "attention": options.attention,
        "topk": options.attention_topk,
        "strategy": options.strategy,
        "critical": options.critical,
        "compare_dense": options.compare_dense,
        "price_per_hour": options.price_per_hour,
        "record_cost": options.record_cost,
    }


def ask_on_server(
    server: FoundServer,
    options: AskOptions,
    on_text: Callable[[str], None] | None = None,
    stream: bool = False,
    on_retry: Callable[[str], None] | None = None,
) -> AskResult:
    """What rag.ask.ask returns, answered by `server`; `on_text`, `stream` and `on_retry` as there.
    ServerUnreachable when nothing was answered; ServerError when the server failed mid-answer."""
    streaming = stream and on_text is not None
    body = ask_request(options) | {"stream": streaming}
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"} if os.environ.get(API_KEY_ENV) else {}
    timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
    answered = False
    try:
        # trust_env=False: an HTTP(S)_PROXY of the environment must not carry a loopback request elsewhere.
        with httpx.stream(
            "POST", f"{server.url}/v1/ask", json=body, headers=headers, timeout=timeout, trust_env=False
        ) as reply:
            if reply.status_code != 200:
                reply.read()
                raise _remote_error(reply.json())
            if not streaming:
                reply.read()
                result = _result_of(reply.json())
                if on_text is not None:
                    on_text(result.answer)
                return result
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                answered = True
                if "text" in event:
                    on_text(event["text"])
                elif "retry" in event and on_retry is not None:
                    on_retry(event["retry"])
                elif "error" in event:
                    raise _remote_error(event)
                elif "result" in event:
                    return _result_of(event["result"])
    except (httpx.TransportError, ValueError) as error:
        if not answered:
            raise ServerUnreachable(f"the server at {server.url} did not answer ({error})") from error
        raise ServerError(
            f"the server at {server.url} failed mid-answer ({error}) — rerun, or pass --no-server"
        ) from error
    raise ServerError(
        f"the server at {server.url} ended its answer without a result — rerun with --no-server"
    )


def ask_anywhere(
    options: AskOptions,
    use_server: bool,
    console: Console,
    on_text: Callable[[str], None] | None = None,
    stream: bool = False,
    on_retry: Callable[[str], None] | None = None,
) -> tuple[AskResult, str | None]:
    """The answer and the URL of the server that gave it: a running server with the asked model when
    `use_server` finds one, else this process (as `dsarag ask` always did)."""
    server = find_server(options.model) if use_server else None
    if server is not None:
        try:
            return ask_on_server(server, options, on_text, stream, on_retry), server.url
        except ServerUnreachable as error:
            console.print(f"[yellow]note:[/] {error} — answering in this process", highlight=False)
    from dsarag.rag.ask import ask  # torch and the agent: imported only when this process answers

    return ask(options, console=console, on_text=on_text, stream=stream, on_retry=on_retry), None


def _remote_error(data: dict) -> RemoteError:
    error = data.get("error") or {}
    return RemoteError(error.get("message", f"the server answered {data}"), error.get("exit_code"))


def _result_of(data: dict) -> AskResult:
    names = {field.name for field in fields(AskResult)}
    return AskResult(**{name: value for name, value in data.items() if name in names})
