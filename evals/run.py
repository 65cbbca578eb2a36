"""Running one suite: its options, a resumable log of finished items, thresholds and the summary.

A run writes under `<out>/<suite>/`: config.json (the options that shape results), items.jsonl (one line
per finished item, appended and fsynced, so a killed run continues where it stopped), summary.json,
report.md and the suite's PNG plots.
"""

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from dsarag.base.atomic import atomic_write_json
from dsarag.base.errors import BadInputError

if TYPE_CHECKING:
    from dsarag.indexer_model.generate import Generator
    from dsarag.rag.embed import Embedder
    from dsarag.rag.remote_generator import RemoteGenerator

SERVED_IN_FLIGHT = 4  # questions asked at once of a served model (--concurrency), so its batching has work

EXIT_THRESHOLD = 7  # documented in the README: an eval finished but missed one of its thresholds


@dataclass
class EvalOptions:
    suite: str
    out: Path = Path("dsarag-evals")
    data: Path | None = None  # the suite's external data (see each suite's help)
    corpus: Path | None = None  # documents the questions are about, when the data holds no contexts
    model: str | None = None  # generator, as `dsarag ask --model`
    limit: int | None = None  # at most this many items (questions, cases, index settings)
    seed: int = 0
    lengths: list[int] | None = None  # niah / topk-sweep context lengths
    depths: list[float] | None = None  # niah needle depths
    topks: list[int] | None = None  # DSA top-k values (sparse modes)
    indexes: list[str] | None = None  # retrieval: index settings such as "HNSW32:efSearch=64"
    attention: str = "auto"  # docqa: dense | sparse | auto
    reader: str = "auto"  # docqa: auto | span | free, as `ask --reader`
    abstain: bool = True  # docqa: decline where the answerability probe says so, as `ask --abstain`
    context_tokens: int = 3072  # agent suites: token budget of the packed sources, as `ask --context-tokens`
    repeats: int = 1  # latency: asks per question and mode
    device: str = "cpu"
    thresholds: list[str] = field(default_factory=list)  # "metric>=value" / "metric<=value", glob names
    fresh: bool = False  # forget finished items of an earlier run in the same folder
    # Items computed at once; None: SERVED_IN_FLIGHT for a served model, else 1.
    concurrency: int | None = None

    def in_flight(self) -> int:
        from dsarag.rag.remote_endpoint import is_remote_spec

        if self.concurrency is not None:
            return self.concurrency
        return SERVED_IN_FLIGHT if is_remote_spec(self.model) else 1

    def fingerprint(self) -> dict:
        """The options that change an item's result: a resumed run must share them. (Grid options — lengths,
        depths, top-k, index settings, repeats, limit — only add or drop items, whose keys name them.)"""
        shared = (
            "suite",
            "model",
            "data",
            "corpus",
            "seed",
            "attention",
            "reader",
            "abstain",
            "context_tokens",
            "device",
        )
        return {key: str(getattr(self, key)) for key in shared}

    def described(self) -> dict:
        """Every option of the run, for the reports."""
        skip = {"out", "thresholds", "fresh"}
        return {key: value for key, value in asdict(self).items() if key not in skip}


@dataclass(frozen=True)
class Threshold:
    metric: str  # a metric name, or a glob matching several ("lost_vs_dense.*")
    op: str  # ">=" or "<="
    value: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"

    def holds(self, actual: float) -> bool:
        return actual >= self.value if self.op == ">=" else actual <= self.value


def parse_threshold(text: str) -> Threshold:
    match = re.fullmatch(r"\s*([\w.*?@\[\]-]+)\s*(>=|<=)\s*(-?[\d.]+(?:e-?\d+)?)\s*", text)
    if not match:
        raise BadInputError(
            f"--threshold {text!r}: write METRIC>=VALUE or METRIC<=VALUE, e.g. accuracy.dense>=0.9"
        )
    return Threshold(match[1], match[2], float(match[3]))


def check_thresholds(metrics: dict[str, float], thresholds: list[Threshold]) -> list[dict]:
    """One row per threshold and matching metric; a threshold that names no metric fails (a typo must show)."""
    rows = []
    for threshold in thresholds:
        names = [name for name in metrics if fnmatch(name, threshold.metric)]
        if not names:
            rows.append({"metric": threshold.metric, "rule": str(threshold), "actual": None, "passed": False})
        for name in names:
            actual = metrics[name]
            rows.append(
                {"metric": name, "rule": str(threshold), "actual": actual, "passed": threshold.holds(actual)}
            )
    return rows


class ItemLog:
    """Finished items of a run, keyed; appended one JSON line at a time so a killed run can resume."""

    def __init__(self, folder: Path, config: dict, fresh: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "items.jsonl"
        config_path = folder / "config.json"
        if fresh:
            self.path.unlink(missing_ok=True)
        elif config_path.exists() and self.path.exists():
            earlier = json.loads(config_path.read_text())
            changed = sorted(
                key for key in config.keys() | earlier.keys() if config.get(key) != earlier.get(key)
            )
            if changed:
                raise BadInputError(
                    f"{folder}: holds a run with other options ({', '.join(changed)}) — "
                    "pass --fresh to start over, or another --out"
                )
        atomic_write_json(config_path, config)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a line cut short by a kill is dropped
        if len(complete) != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        for line in complete.decode("utf-8").splitlines():
            row = json.loads(line)
            self.done[row["key"]] = row

    def get(self, key: str) -> dict | None:
        return self.done.get(key)

    def record(self, key: str, row: dict) -> dict:
        row = {"key": key, **row}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[key] = row
        return row

    def run(self, key: str, compute: Callable[[], dict]) -> dict:
        """The logged row of `key`, computing and logging it first when this is a new item."""
        return self.get(key) or self.record(key, compute())


@dataclass
class SuiteResult:
    metrics: dict[str, float]  # flat names, what thresholds test
    table: list[dict]  # rows of the Markdown report
    plots: list[str] = field(default_factory=list)  # PNG file names in the suite folder
    details: dict = field(default_factory=dict)  # anything else worth keeping in summary.json


class SuiteRun:
    """What a suite gets: options, its folder and item log, a console for progress, lazy model loading."""

    def __init__(self, options: EvalOptions, folder: Path, log: ItemLog, console: Console) -> None:
        self.options, self.folder, self.log, self.console = options, folder, log, console
        self._generator: Generator | RemoteGenerator | None = None
        self._embedder: Embedder | None = None
        self.computed, self.compute_s = 0, 0.0  # items computed by this run (not resumed) and their wall time

    def generator(self) -> "Generator | RemoteGenerator":
        if self._generator is None:
            from dsarag.rag.generators import open_generator

            self.console.log(f"loading generator {self.options.model or 'default'}")
            self._generator = open_generator(self.options.model, device=self.options.device)
        return self._generator

    def logged_rows(
        self,
        items: Sequence,
        key: Callable[[object], str],
        compute: Callable[[object], dict],
        what: Callable[[object], str],
    ) -> list[dict]:
        """Each item's logged row, in item order; new items are computed (up to `in_flight()` at once, for a
        served model) and each row is logged by this thread as it finishes, so a failure loses no finished row
        and writes no partial one."""
        todo = [item for item in items if self.log.get(key(item)) is None]
        workers = min(self.options.in_flight(), max(len(todo), 1))
        started = time.perf_counter()
        if workers == 1:
            for number, item in enumerate(todo, start=1):
                self.progress(number, len(todo), what(item))
                self.log.record(key(item), compute(item))
        else:
            pool = ThreadPoolExecutor(workers)
            try:
                futures = {pool.submit(compute, item): item for item in todo}
                for number, future in enumerate(as_completed(futures), start=1):
                    item = futures[future]
                    self.log.record(key(item), future.result())
                    self.progress(number, len(todo), what(item))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        self.computed += len(todo)
        self.compute_s += time.perf_counter() - started
        return [self.log.get(key(item)) for item in items]

    def embedder(self) -> "Embedder":
        if self._embedder is None:
            from dsarag.rag.embed import load_embedder

            self._embedder = load_embedder()
        return self._embedder

    def limited(self, items: list) -> list:
        return items[: self.options.limit] if self.options.limit is not None else items

    def progress(self, done: int, total: int, what: str) -> None:
        self.console.log(f"[{done}/{total}] {what}")


def summarize(
    options: EvalOptions, suite_name: str, result: SuiteResult, checks: list[dict], seconds: float
) -> dict:
    return {
        "suite": suite_name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "options": options.described(),
        "metrics": {name: round(value, 4) for name, value in result.metrics.items()},
        "thresholds": checks,
        "passed": all(row["passed"] for row in checks),
        "table": result.table,
        "plots": result.plots,
        "details": result.details,
    }


def timed(compute: Callable[[], dict]) -> dict:
    """`compute()`'s row with the seconds it took."""
    started = time.perf_counter()
    row = compute()
    return row | {"seconds": round(time.perf_counter() - started, 3)}
