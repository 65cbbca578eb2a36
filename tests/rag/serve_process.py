"""A real `dsarag serve --model tiny` process for the tests that talk to one (test_serve.py,
test_remote_generator.py)."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import OpenAI

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 15  # SIGTERM to exit, generous for a shared 2-core machine (about 1-3 s unloaded)


@dataclass
class RunningServer:
    process: subprocess.Popen
    url: str
    port: int
    home: Path
    log: Path

    @property
    def state_file(self) -> Path:
        return self.home / "servers" / f"{self.process.pid}.json"

    def openai(self, **options) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", "unused"), max_retries=0)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsarag.cli.app", "serve", "--model", "tiny", *args]


def start_server(home: Path, *args: str, env: dict | None = None) -> RunningServer:
    """`dsarag serve --model tiny --port FREE` in its own data home, once /health answers."""
    port = free_port()
    log = home / "serve.log"
    process = subprocess.Popen(
        serve_command("--port", str(port), *args),
        env=os.environ | {"DSARAG_HOME": str(home), "OMP_NUM_THREADS": "1"} | (env or {}),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return RunningServer(process, url, port, home, log)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"serve did not answer /health within {START_TIMEOUT_S} s: {log.read_text()}")
