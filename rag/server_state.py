"""The state file a running `dsarag serve` leaves in the data home, so `dsarag ask` can find it.

One file per server, `servers/<pid>.json`: several servers (other models, other ports) may run at once.
Written atomically once the server listens, removed when it stops; a file whose pid is gone is stale."""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dsarag.base.atomic import atomic_write_json
from dsarag.base.paths import data_home


@dataclass
class ServerState:
    pid: int
    url: str  # where a client on this machine connects (a wildcard bind is reached on loopback)
    model: str  # the generator's name
    model_folder: str  # the folder it was loaded from: what `--model` specs are compared by
    needs_api_key: bool = False


def servers_dir() -> Path:
    return data_home() / "servers"


def state_path(pid: int) -> Path:
    return servers_dir() / f"{pid}.json"


def write_state(state: ServerState) -> Path:
    path = state_path(state.pid)
    atomic_write_json(path, asdict(state))
    return path


def remove_state(pid: int) -> None:
    state_path(pid).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds that pid
        return True
    return True


def live_states() -> list[ServerState]:
    """States of servers whose process still runs, newest file first; stale files are removed on the way."""
    folder = servers_dir()
    if not folder.is_dir():
        return []
    states = []
    for path in sorted(folder.glob("*.json"), key=_modified_ns, reverse=True):
        try:
            state = ServerState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # half-written by another tool, or of another version: not ours to judge
        if pid_alive(state.pid):
            states.append(state)
        else:
            path.unlink(missing_ok=True)
    return states


def _modified_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # removed by its server meanwhile
        return 0


def connect_url(host: str, port: int) -> str:
    """The URL a local client uses for a server bound to `host`: wildcards are reached on loopback."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
