"""Where a served model is (`--model openai:http://HOST:PORT/v1#MODEL`, or the environment) and what its
failures mean to a user: one line and an exit code. The server unreachable, its key refused or the model
unknown exit 5 (EXIT_MODEL); a server still failing or busy after the retries, or one that stops mid-answer,
exits 10 (EXIT_SERVER). The API key goes to the server only, never into a message or a log.

Nothing here imports torch: `dsarag ask` checks a spec before deciding where to answer.
"""

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dsarag.base.errors import BadInputError, ModelError, ServerError

SCHEME = "openai:"
BASE_URL_ENV, MODEL_ENV, KEY_ENV, TIMEOUT_ENV = (
    "DSARAG_OPENAI_BASE_URL",
    "DSARAG_OPENAI_MODEL",
    "DSARAG_OPENAI_API_KEY",
    "DSARAG_OPENAI_TIMEOUT",
)
MAX_RETRIES = 4  # the client backs off exponentially between them on 408/409/429/5xx and lost connections
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # a long CPU prefill sends nothing for minutes


def is_remote_spec(spec: str | None) -> bool:
    return spec is not None and spec.strip().lower().startswith(SCHEME)


@dataclass(frozen=True)
class Endpoint:
    """Where the served model is: `openai:URL#MODEL`, the URL and model also from $DSARAG_OPENAI_BASE_URL and
    $DSARAG_OPENAI_MODEL; the key only from $DSARAG_OPENAI_API_KEY (it never appears in a spec or a message)."""

    base_url: str
    model: str | None
    api_key: str = field(default="", repr=False)

    @classmethod
    def parse(cls, spec: str) -> "Endpoint":
        rest = spec.strip()[len(SCHEME) :]
        url, _, model = rest.partition("#")
        url = (url or os.environ.get(BASE_URL_ENV, "")).strip().rstrip("/")
        model = (model or os.environ.get(MODEL_ENV, "")).strip() or None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadInputError(
                f"--model {spec!r}: name the server as openai:http://HOST:PORT/v1[#MODEL] "
                f"(or set {BASE_URL_ENV})"
            )
        return cls(url, model, os.environ.get(KEY_ENV, ""))


def translate_error(
    error: BaseException, endpoint: Endpoint, model: str | None, mid_answer: bool = False
) -> BaseException:
    """The dsarag error of a client exception (`mid_answer`: raised while a reply streamed); others are
    returned unchanged."""
    import openai

    url = endpoint.base_url
    if mid_answer and (isinstance(error, openai.APIError) or _transport_error(error)):
        return ServerError(
            f"{url}: the server stopped mid-answer ({_server_message(error)}) — is it still running?"
        )
    if isinstance(error, openai.APITimeoutError):
        return ServerError(f"{url}: no answer within {read_timeout():.0f} s — raise ${TIMEOUT_ENV} or retry")
    if isinstance(error, openai.APIConnectionError):
        return ModelError(
            f"{url}: no server answers there — start one (`dsarag serve`, `vllm serve …`) or fix the URL"
        )
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return ModelError(f"{url}: the server refused the API key — set ${KEY_ENV} to a key it accepts")
    if isinstance(error, openai.NotFoundError):
        return ModelError(f"{url}: model {model!r} not found there — {url}/models lists what it serves")
    if isinstance(error, openai.APIStatusError):
        message = _server_message(error)
        if error.status_code == 429 or error.status_code >= 500:
            return ServerError(f"{url}: still {error.status_code} after {MAX_RETRIES} retries: {message}")
        return ModelError(f"{url}: the server refused the request ({error.status_code}): {message}")
    if isinstance(error, openai.APIError) or _transport_error(error):
        return ServerError(
            f"{url}: the server failed mid-answer ({_server_message(error)}) — is it still running?"
        )
    return error


def _transport_error(error: BaseException) -> bool:
    """A connection lost mid-stream, raised by the HTTP library under the client (httpx, or httpx2 from
    openai 3)."""
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore")


def _server_message(error: BaseException) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"]).splitlines()[0]
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else READ_TIMEOUT_S
    except ValueError:
        raise BadInputError(f"${TIMEOUT_ENV}={value!r}: give seconds, e.g. 600") from None
