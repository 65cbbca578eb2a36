"""`dsarag serve`: keep the models warm behind a local HTTP API (the work is in rag/serve.py and rag/server.py)."""

from typing import Annotated

import typer
from rich.console import Console

stderr = Console(stderr=True)


def serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="default | tiny | registry name | HF model dir | HF id in the local cache | .gguf"
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on; other than loopback only with --allow-remote."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8765,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a --host other machines reach: they can then ask over any folder this user can read.",
        ),
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="DSARAG_API_KEY",
            show_envvar=True,
            help="Require `Authorization: Bearer KEY` on /v1 (`dsarag ask` sends $DSARAG_API_KEY).",
        ),
    ] = None,
    max_body_kb: Annotated[
        int, typer.Option("--max-body-kb", min=1, help="Largest request body; larger ones get 413.")
    ] = 1024,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests waiting behind the running one; more get 503.")
    ] = 8,
) -> None:
    """Keep the model, the embedder and open stores loaded and answer over HTTP on 127.0.0.1: an
    OpenAI-compatible API (/v1/models, /v1/chat/completions, streaming too), the agent (/v1/ask: what
    `dsarag ask --json` prints) and /health. `dsarag ask` uses it when it runs the same model."""
    from dsarag.rag.serve import ServeOptions
    from dsarag.rag.serve import serve as run_server

    options = ServeOptions(
        model=model,
        host=host,
        port=port,
        allow_remote=allow_remote,
        api_key=api_key or None,
        max_body_bytes=max_body_kb * 1024,
        max_waiting=max_queue,
    )
    run_server(options, console=stderr)
