"""`dsarag serve`'s process: check the host, take the port, load the models, serve until SIGTERM or SIGINT,
and leave nothing behind (the state file removed, queued jobs dropped, the running one stopped)."""

import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address

import uvicorn
from rich.console import Console
from rich.logging import RichHandler

from dsarag.base.errors import BadInputError, ServerError
from dsarag.rag.server_state import ServerState, connect_url, live_states, remove_state, write_state

GRACEFUL_SHUTDOWN_S = 3  # open connections get this long to finish once a stop signal came


@dataclass
class ServeOptions:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (the state file and the log say which)
    allow_remote: bool = False
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_waiting: int = 8  # requests queued behind the running one before new ones get 503


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (a wildcard such as 0.0.0.0 is not)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise BadInputError(f"--host {host}: cannot resolve it ({error.strerror}) — pass 127.0.0.1") from None
    return all(ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, taken before the models load so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # lets a restart reuse a port in TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            holder = next((state for state in live_states() if state.url.endswith(f":{port}")), None)
            who = f" by dsarag serve (pid {holder.pid}, {holder.model})" if holder else ""
            raise ServerError(
                f"port {port} on {host} is already in use{who} — pass another --port, or stop what holds it"
            ) from None
        raise ServerError(
            f"cannot listen on {host}:{port}: {error.strerror} — pass another --host or --port"
        ) from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling the model worker to stop the moment a stop signal arrives (uvicorn would
    otherwise wait for the running generation through its whole graceful period)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[int], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    def handle_exit(self, sig: int, frame: object) -> None:
        self.on_stop(sig)
        super().handle_exit(sig, frame)


def serve(options: ServeOptions, console: Console) -> None:
    """Serve until stopped; raises BadInputError for a non-loopback host without allow_remote and ServerError
    when the port cannot be taken, both before any model loads (or torch is imported)."""
    loopback = is_loopback(options.host)
    if not loopback and not options.allow_remote:
        raise BadInputError(
            f"--host {options.host} is reachable from other machines — bind 127.0.0.1, or pass --allow-remote "
            "(with --api-key: anyone who reaches the port can ask over any folder this user can read)"
        )
    sock = bind_socket(options.host, options.port)
    port = sock.getsockname()[1]
    url = connect_url(options.host, port)
    try:
        from dsarag.indexer_model.generate import load_generator
        from dsarag.rag.embed import load_embedder
        from dsarag.rag.server import ServerLimits, create_app
        from dsarag.rag.warm_models import WarmModels

        with console.status(f"loading {options.model or 'the default model'} and the embedder"):
            started = time.perf_counter()
            generator = load_generator(options.model)
            embedder = load_embedder()
            _ = embedder.model  # loaded now, not on the first question
        console.print(f"loaded {generator.name} and the embedder in {time.perf_counter() - started:.1f} s")
        app, worker = create_app(
            WarmModels(generator, embedder),
            url,
            console,
            ServerLimits(options.max_body_bytes, options.max_waiting),
            options.api_key,
            loopback_only=loopback,
        )
        stop_signals: list[int] = []

        def on_stop(sig: int, _frame: object = None) -> None:
            stop_signals.append(sig)
            worker.stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            # Before uvicorn takes the signals this records a stop; after, uvicorn re-raises the stop signal
            # once it has shut down, and this makes that harmless: the process ends through the cleanup below.
            signal.signal(sig, on_stop)
        logging.getLogger("uvicorn").addHandler(RichHandler(console=console, show_path=False))
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = _Server(config, on_stop)
        write_state(
            ServerState(
                pid=os.getpid(),
                url=url,
                model=generator.name,
                model_folder=str(generator.folder.resolve()),
                needs_api_key=options.api_key is not None,
            )
        )
        console.print(
            f"[green]serving[/] {generator.name} at {url} — OpenAI API {url}/v1, agent {url}/v1/ask; "
            "Ctrl-C stops",
            highlight=False,
        )
        try:
            if not stop_signals:
                server.run(sockets=[sock])
        finally:
            remove_state(os.getpid())
            worker.stop()
        reason = signal.Signals(stop_signals[0]).name if stop_signals else "the server loop ended"
        console.print(f"stopped ({reason})", highlight=False)
    finally:
        sock.close()
