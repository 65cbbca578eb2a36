"""`dsarag serve` as a real process: the OpenAI-compatible API (through the `openai` client), the agent endpoint,
`dsarag ask` finding the server, the refusals (remote host, taken port, oversized requests) and SIGTERM."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, NotFoundError
from serve_process import STOP_TIMEOUT_S, serve_command, start_server

from dsarag.base.errors import EXIT_BAD_INPUT, EXIT_SERVER
from dsarag.rag.server_client import find_server
from dsarag.rag.server_state import ServerState, live_states, write_state


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("serve-home"))
    yield running
    running.stop()


@pytest.fixture
def server_home(server, monkeypatch) -> Path:
    """This test's data home is the server's, so `dsarag ask` and find_server see its state file."""
    monkeypatch.setenv("DSARAG_HOME", str(server.home))
    return server.home


MESSAGES = [{"role": "user", "content": "Name one colour."}]
# Greedy, the tiny model writes this story past 300 tokens (about 40 s on one core): still running at SIGTERM.
LONG_ANSWER = [
    {"role": "user", "content": "Write a very long story about a lighthouse keeper, in 50 paragraphs."}
]


# --- the OpenAI-compatible API ------------------------------------------------------------------------------


def test_health_and_models_name_the_loaded_model(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["pid"] == server.process.pid
    assert health["model"] == "smollm2-135m-instruct"
    models = server.openai().models.list()
    assert [model.id for model in models.data] == ["smollm2-135m-instruct"]


def test_state_file_names_pid_url_and_model(server):
    state = json.loads(server.state_file.read_text())
    assert state["pid"] == server.process.pid
    assert state["url"] == server.url
    assert state["model"] == "smollm2-135m-instruct"


def test_chat_completion_streamed_and_not_give_the_same_greedy_text(server):
    client = server.openai()
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (choice.finish_reason == "length") == (usage.completion_tokens == 6)

    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content
    reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert reasons[-1] == choice.finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_max_tokens_is_capped_by_the_model_context(server):
    with pytest.raises(BadRequestError, match="context of 8192"):
        server.openai().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9000)


def test_another_model_name_is_not_found(server):
    with pytest.raises(NotFoundError, match="this server runs smollm2-135m-instruct"):
        server.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)


def test_unsupported_options_are_refused_by_name(server):
    with pytest.raises(BadRequestError, match="stop: not supported"):
        server.openai().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, stop=["."])


def test_oversized_body_gets_413_before_parsing(server):
    padding = "x" * (1 << 20)
    body = {"model": "tiny", "messages": [{"role": "user", "content": padding}]}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 413
    assert "request body over 1,048,576 bytes" in reply.json()["error"]["message"]


def test_a_request_to_another_host_name_is_refused(server):
    # A DNS name rebound to 127.0.0.1 arrives with its own Host header.
    reply = httpx.get(f"{server.url}/v1/models", headers={"Host": "attacker.example:80"})
    assert reply.status_code == 421


def test_ask_refuses_a_relative_path(server):
    reply = httpx.post(f"{server.url}/v1/ask", json={"question": "When is lunch?", "docs": "docs"})
    assert reply.status_code == 400
    assert "pass an absolute path" in reply.json()["error"]["message"]


# --- discovery ---------------------------------------------------------------------------------------------


def test_find_server_matches_the_model_and_skips_other_models(server, server_home):
    found = find_server("tiny")
    assert found is not None and found.url == server.url and found.pid == server.process.pid
    assert find_server("smollm2-135m-instruct").url == server.url
    assert find_server(None) is None  # the default model: this server runs tiny


def test_a_state_file_of_a_dead_process_is_ignored_and_removed(server_home, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    path = write_state(ServerState(pid, "http://127.0.0.1:9", "tiny", "/nowhere"))
    assert pid not in [state.pid for state in live_states()]
    assert not path.exists()


# --- the agent ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ask_endpoint_answers_like_ask_json_with_warm_models(server, small_docs, tmp_path):
    body = {
        "question": "When does the kitchen serve lunch?",
        "docs": str(small_docs),
        "store": str(tmp_path / "store"),
        "max_new_tokens": 8,
    }
    result = httpx.post(f"{server.url}/v1/ask", json=body, timeout=300).json()
    assert result["answer"] and result["server"] == server.url
    assert result["sources"][0]["citation"].startswith("kitchen.md:")
    assert result["timings"]["load_model_s"] < 0.1 and result["timings"]["load_embedder_s"] < 0.1
    assert {"trace", "cost", "citations", "tokens"} <= set(result)
    assert str((tmp_path / "store").resolve()) in httpx.get(f"{server.url}/health").json()["open_stores"]

    events = []
    with httpx.stream("POST", f"{server.url}/v1/ask", json=body | {"stream": True}, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    streamed = "".join(event.get("text", "") for event in events)
    final = events[-1]["result"]
    assert streamed.strip() == final["answer"] == result["answer"]
    assert final["ingest"]["unchanged"] == 2  # the second question found the store up to date


@pytest.mark.slow
def test_ask_json_uses_the_running_server_and_says_so(server, server_home, small_docs, tmp_path, run_cli):
    args = ("ask", "When is lunch?", "--docs", str(small_docs), "--store", str(tmp_path / "store"))
    code, out, _ = run_cli(*args, "--model", "tiny", "--max-new-tokens", "8", "--json")
    assert code == 0
    served = json.loads(out)
    assert served["server"] == server.url and served["answer"]
    code, out, _ = run_cli(*args, "--model", "tiny", "--max-new-tokens", "8", "--json", "--no-server")
    assert code == 0
    local = json.loads(out)
    assert local["server"] is None and local["answer"] == served["answer"]


@pytest.mark.slow
def test_ask_errors_through_the_server_keep_their_exit_code(server, server_home, tmp_path, run_cli):
    code, _, err = run_cli("ask", "When is lunch?", "--docs", str(tmp_path / "missing"), "--model", "tiny")
    assert code == 3
    assert "missing" in err and "Traceback" not in err


# --- refusals and shutdown ----------------------------------------------------------------------------------


def test_non_loopback_host_is_refused_without_allow_remote(tmp_path):
    done = subprocess.run(
        serve_command("--host", "0.0.0.0", "--port", "0"),
        env=os.environ | {"DSARAG_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.count("\n") == 1 and "--allow-remote" in done.stderr
    assert not (tmp_path / "servers").exists() or not list((tmp_path / "servers").iterdir())


def test_a_taken_port_exits_10_naming_the_server_there(server):
    done = subprocess.run(
        serve_command("--port", str(server.port)),
        env=os.environ | {"DSARAG_HOME": str(server.home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_SERVER
    assert "already in use by dsarag serve" in done.stderr and str(server.process.pid) in done.stderr
    assert done.stderr.count("\n") == 1


def _children(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


@pytest.mark.slow
def test_sigterm_mid_stream_stops_within_seconds_and_removes_the_state_file(tmp_path):
    running = start_server(tmp_path)
    assert running.state_file.is_file()
    children = _children(running.process.pid)
    first_chunk, stream_end = threading.Event(), []

    def stream_a_long_answer() -> None:
        client = running.openai()
        try:
            chunks = client.chat.completions.create(
                model="tiny", messages=LONG_ANSWER, max_tokens=4000, temperature=0, stream=True
            )
            for _ in chunks:
                first_chunk.set()
            stream_end.append("ended")
        except Exception as error:  # noqa: BLE001 - the server's shutdown notice arrives as an APIError
            stream_end.append(str(error))
        first_chunk.set()

    reader = threading.Thread(target=stream_a_long_answer)
    reader.start()
    assert first_chunk.wait(60)
    started = time.monotonic()
    assert running.stop() == 0
    assert time.monotonic() - started < STOP_TIMEOUT_S
    reader.join(10)
    assert stream_end and "shutting down" in stream_end[0]
    assert not running.state_file.exists()
    assert not any(Path(f"/proc/{child}").exists() for child in children)
    assert "stopped (SIGTERM)" in running.log.read_text()


@pytest.mark.slow
def test_an_api_key_server_refuses_requests_without_the_key(tmp_path):
    running = start_server(tmp_path, env={"DSARAG_API_KEY": "s3cret"})
    try:
        assert httpx.get(f"{running.url}/health").status_code == 200  # discovery needs no key
        assert httpx.get(f"{running.url}/v1/models").status_code == 401
        assert running.openai(api_key="s3cret").models.list().data[0].id == "smollm2-135m-instruct"
        assert json.loads(running.state_file.read_text())["needs_api_key"] is True
    finally:
        assert running.stop() == 0
