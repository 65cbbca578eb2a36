"""`dsarag ask` on the demo corpus in a fresh process against the same command answered by a warm `dsarag serve`,
and a streamed chat completion's time to first token against its prefill. The recorded run in
docs/benchmarks-pipeline.md ("Warm server"):

    .venv/bin/python benchmarks/serve_latency.py --runs 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).parent.parent
DEMO_DOCS = ROOT / "corpora" / "demo" / "docs"
QUESTION = "Who is the privacy officer of Lumen Harbor Cooperative?"


def dsarag(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsarag.cli.app", *args]


def timed_ask(store: Path, model: str | None, env: dict, *flags: str) -> tuple[float, dict]:
    model_args = ("--model", model) if model else ()
    command = dsarag(
        "ask", QUESTION, "--docs", str(DEMO_DOCS), "--store", str(store), *model_args, "--json", *flags
    )
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(done.stdout)


def start_server(model: str | None, port: int, env: dict, log: Path) -> subprocess.Popen:
    model_args = ("--model", model) if model else ()
    server = subprocess.Popen(
        dsarag("serve", *model_args, "--port", str(port)), env=env, stderr=log.open("w")
    )
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.25)
    raise SystemExit(f"the server did not start: {log.read_text()}")


def first_token(client: OpenAI, model: str, prompt: str) -> dict:
    """Seconds to the first content chunk, and the server's own prefill time and prompt tokens."""
    started = time.perf_counter()
    first = None
    usage = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            usage = chunk
    extra = usage.model_extra or {}
    return {"first_s": first, "prefill_s": extra["timings"]["prefill_s"], "prompt": usage.usage.prompt_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=None, help="default: the default generator")
    parser.add_argument("--port", type=int, default=8799)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"DSARAG_HOME": tmp}
        store = Path(tmp) / "demo-store"
        subprocess.run(dsarag("ingest", str(DEMO_DOCS), "--store", str(store)), env=env, check=True)
        cold = [timed_ask(store, options.model, env, "--no-server")[0] for _ in range(options.runs)]
        server = start_server(options.model, options.port, env, Path(tmp) / "serve.log")
        try:
            timed_ask(store, options.model, env)  # the first question opens the store on the server
            warm_runs = [timed_ask(store, options.model, env) for _ in range(options.runs)]
            assert all(result["server"] for _, result in warm_runs), "dsarag ask did not use the server"
            warm = [seconds for seconds, _ in warm_runs]
            client = OpenAI(base_url=f"http://127.0.0.1:{options.port}/v1", api_key="unused", max_retries=0)
            model = client.models.list().data[0].id
            prompt = "\n\n".join(path.read_text() for path in sorted(DEMO_DOCS.glob("*.md"))[:6])
            prompt += "\n\nSummarise the documents above in one sentence."
            firsts = [first_token(client, model, prompt) for _ in range(options.runs)]
        finally:
            server.terminate()
            server.wait(timeout=60)
    report = {
        "model": model,
        "ask_fresh_process_s": round(statistics.median(cold), 2),
        "ask_warm_server_s": round(statistics.median(warm), 2),
        "ask_runs": {"fresh": [round(s, 2) for s in cold], "warm": [round(s, 2) for s in warm]},
        "stream_prompt_tokens": firsts[0]["prompt"],
        "stream_first_token_s": round(statistics.median(f["first_s"] for f in firsts), 3),
        "stream_prefill_s": round(statistics.median(f["prefill_s"] for f in firsts), 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
