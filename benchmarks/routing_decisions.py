"""Time and accuracy of the agent's decisions: its decide and plan nodes on each question of the routing set.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/routing_decisions.py --out routing-decisions.json \
        [--against /tmp/base-shim]

Runs the agent's own `decide` and `plan` nodes (rag/agent.py) on the demo corpus, as `dsarag ask` does with no
forced strategy, in a worker process that has loaded the models and the store. Per question it records the
seconds of decide + plan (the store's best-cosine search included) and each decision; the routing set's first
question runs once cold (its time is reported apart), then every question warm. `--against PATH` runs a second
worker with PYTHONPATH=PATH (a `dsarag` package of another checkout) on the same questions, the two workers
alternating question by question, so a shared machine's load falls on both alike.

Prints medians and accuracy per decision (retrieve?, strategy, strategy given retrieval, and complexity's
agreement with the other worker) on the whole set and on its two interleaved halves: odd lines (1st, 3rd, …:
the half any rule or prompt is tuned on) and even lines (held out).
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


def serve(model: str) -> None:
    """Worker: route each question read from stdin (one JSON string a line), one JSON result a line."""
    from langgraph.runtime import Runtime

    from dsarag.corpora.demo_corpus import DEMO_DOCS
    from dsarag.indexer_model.generate import load_generator
    from dsarag.rag.agent import AgentContext, decide, plan
    from dsarag.rag.ask import AskOptions
    from dsarag.rag.embed import load_embedder
    from dsarag.rag.ingest import ingest_folder
    from dsarag.rag.retrieve import Retriever
    from dsarag.rag.store import ChunkStore

    embedder, generator = load_embedder(), load_generator(model)
    with tempfile.TemporaryDirectory() as folder:
        store = ChunkStore(Path(folder) / "store")
        ingest_folder(DEMO_DOCS, store, embedder)
        context = AgentContext(
            AskOptions(question="", store=store.folder), Retriever(store, embedder), generator
        )
        print(json.dumps({"ready": generator.name}), flush=True)
        for line in sys.stdin:
            state: dict = {"question": json.loads(line), "attempt": 1, "timings": {}, "trace": []}
            runtime = Runtime(context=context)
            started = time.perf_counter()
            state |= decide(state, runtime)
            if state["retrieval"] == "retrieve":
                state |= plan(state, runtime)
            seconds = time.perf_counter() - started
            result = {
                "seconds": seconds,
                "strategy": state["strategy"],
                "complexity": state.get("complexity"),
            }
            reasons = [entry["reason"] for entry in state["trace"] if "reason" in entry]
            print(
                json.dumps(result | {"queries": state.get("queries", [])[1:], "reasons": reasons}), flush=True
            )


class Worker:
    def __init__(self, model: str, pythonpath: str | None) -> None:
        env = os.environ | ({"PYTHONPATH": pythonpath} if pythonpath else {})
        command = [sys.executable, __file__, "--worker", "--model", model]
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.name = json.loads(self.process.stdout.readline())["ready"]

    def route(self, question: str) -> dict:
        self.process.stdin.write(json.dumps(question) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def summary(rows: list[dict], side: str, other: str | None) -> dict:
    retrieved = [row for row in rows if row["expected"] != "none" and row[side]["strategy"] != "none"]
    result = {
        "questions": len(rows),
        "median_s": round(statistics.median(row[side]["seconds"] for row in rows), 3),
        "retrieve": sum((row[side]["strategy"] == "none") == (row["expected"] == "none") for row in rows)
        / len(rows),
        "strategy": sum(row[side]["strategy"] == row["expected"] for row in rows) / len(rows),
        "strategy_given_retrieval": sum(row[side]["strategy"] == row["expected"] for row in retrieved)
        / len(retrieved),
    }
    if other is not None:
        both = [row for row in rows if row[side]["complexity"] and row[other]["complexity"]]
        result["complexity_agrees"] = sum(
            row[side]["complexity"] == row[other]["complexity"] for row in both
        ) / len(both)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, help="per-question results (JSON)")
    parser.add_argument("--against", help="PYTHONPATH of a second checkout's dsarag, timed alternately")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        serve(options.model)
        return

    from dsarag.evals.routing import load_routing_set

    questions = load_routing_set()[: options.limit]
    workers = {"current": Worker(options.model, None)}
    if options.against:
        workers["against"] = Worker(options.model, options.against)
    cold = {side: worker.route(questions[0]["question"])["seconds"] for side, worker in workers.items()}
    rows = []
    for number, question in enumerate(questions, start=1):
        row = {"id": question["id"], "line": number, "expected": question["strategy"]}
        order = list(workers) if number % 2 else list(reversed(workers))
        row |= {side: workers[side].route(question["question"]) for side in order}
        rows.append(row)
        times = " ".join(
            f"{side} {row[side]['seconds']:5.2f}s → {row[side]['strategy']:<11}" for side in workers
        )
        print(f"{number:3d} {question['strategy']:>11} | {times}", file=sys.stderr)
    for worker in workers.values():
        worker.close()
    halves = {
        "whole set": rows,
        "odd lines (tuning half)": [row for row in rows if row["line"] % 2 == 1],
        "even lines (held out)": [row for row in rows if row["line"] % 2 == 0],
    }
    report = {
        side: {"first question, cold (s)": round(cold[side], 3)}
        | {
            name: summary(half, side, next((s for s in workers if s != side), None))
            for name, half in halves.items()
        }
        for side in workers
    }
    if options.out:
        options.out.write_text(json.dumps({"model": options.model, "report": report, "rows": rows}, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
