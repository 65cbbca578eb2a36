"""Crash trials: SIGKILL `dsarag ingest` at random moments, check the store after every kill, resume, and
compare with a clean run.

A trial copies a small corpus (Markdown documents + a JSONL corpus file), optionally ingests an older version
of it first (so the killed run also replaces, deletes and tombstones chunks), then starts `dsarag ingest` in a
fresh process 1–`max_kills` times and kills each at a random moment of its work: after a random number of its
commits (0 = as soon as it holds the store lock), plus a random part of a typical gap between commits (as timed
by the reference run) — so kills land while embedding, while a shard or index is written, between commits. After every kill the store must pass
`check_store` (the last commit intact: manifest, Parquet and index agree, no duplicate id; files of the killed
writer are allowed). Then an ingest runs to the end, and the store must hold exactly the reference run's
chunk ids, fully indexed, with nothing left over. Used by tests/rag/test_reliability_crash.py (a few trials) and
benchmarks/crash_trials.py (the recorded run).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dsarag.rag.embed import Embedder
from dsarag.rag.ingest import IngestOptions, ingest
from dsarag.rag.lock import LOCK_NAME
from dsarag.rag.store import ChunkStore
from dsarag.rag.store_check import check_store

REPO = Path(__file__).resolve().parents[1]
BATCH_CHUNKS = 8  # many small commits: many moments to be killed between and inside them
TOPICS = [
    "bike repairs",
    "solar panels",
    "the kitchen rota",
    "membership fees",
    "the tool library",
    "rainwater",
]


@dataclass
class CrashTrial:
    seed: int
    mode: str  # "fresh" (empty store) or "update" (an older version ingested first)
    kill_points: list[tuple[int, float]] = field(default_factory=list)  # (after n commits, + seconds)
    killed_at_generation: list[int] = field(default_factory=list)
    finished_before_kill: int = 0
    commits_before_kill: list[int] = field(default_factory=list)  # of each killed run, when it was killed
    leftovers_seen: int = 0
    problems: list[str] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def write_corpus(folder: Path, version: int = 2) -> list[Path]:
    """The trial's inputs: a docs folder and a JSONL corpus. Version 1 is the older state an update starts from
    (one document differs, one is gone in version 2, the JSONL file has fewer and partly other records)."""
    docs = folder / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        paragraphs = [
            f"Section {j} of note {i}: the volunteers met about {TOPICS[(i + j) % len(TOPICS)]} and agreed on "
            f"step {j}, to be reviewed by the working group before the next monthly meeting."
            for j in range(3 + 4 * (i % 3))
        ]
        (docs / f"note-{i}.md").write_text(f"# Note {i}\n\n" + "\n\n".join(paragraphs) + "\n")
    if version == 1:
        (docs / "note-2.md").write_text("# Note 2\n\nAn older version of this note about the bike shed.\n")
        (docs / "old-note.md").write_text("# Old note\n\nThis note is deleted in the newer version.\n")
    else:
        (docs / "old-note.md").unlink(missing_ok=True)
    n_records = 40 if version == 1 else 60
    rows = [
        {
            "id": f"r{i}",
            "text": f"Record {i} (v{version if i % 7 == 0 else 2}): {TOPICS[i % len(TOPICS)]} on day {i}.",
        }
        for i in range(n_records)
    ]
    corpus = folder / "records.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [docs, corpus]


def ingest_command(inputs: list[Path], store: Path) -> list[str]:
    return [
        sys.executable, "-m", "dsarag.cli.app", "ingest", *map(str, inputs), "--store", str(store),
        "--id-column", "id", "--batch-chunks", str(BATCH_CHUNKS), "--workers", "0",
    ]  # fmt: skip


def start_ingest(inputs: list[Path], store: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        ingest_command(inputs, store), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_until_working(process: subprocess.Popen, store: Path, timeout_s: float = 120) -> float:
    """Wait until the ingest holds the store lock (imports done, its work begins) or has ended; when."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline and not (store / LOCK_NAME).exists():
        time.sleep(0.001)
    return time.monotonic()


def options() -> IngestOptions:
    from dsarag.corpora.corpus_files import CorpusColumns

    return IngestOptions(columns=CorpusColumns(id="id"), batch_chunks=BATCH_CHUNKS, workers=0)


@dataclass
class Reference:
    ids: set[int]
    commits: int  # commits of a fresh ingest (batches + index)
    gaps_s: list[float]  # seconds from its lock to the 1st commit, 1st to 2nd, …, last commit to its end

    @property
    def gap_s(self) -> float:
        return max(self.gaps_s)


def generation(store: Path) -> int:
    try:
        return int(json.loads((store / "manifest.json").read_text())["generation"])
    except (OSError, ValueError, KeyError):
        return 0


def reference_run(workdir: Path) -> Reference:
    """A clean, uninterrupted `dsarag ingest` in its own process: the expected chunk ids and its timing."""
    inputs = write_corpus(workdir / "reference-corpus")
    store = workdir / "reference-store"
    process = start_ingest(inputs, store)
    events = [wait_until_working(process, store)]
    seen = 0
    while process.poll() is None:
        if generation(store) != seen:
            seen = generation(store)
            events.append(time.monotonic())
        time.sleep(0.002)
    events.append(time.monotonic())
    if process.returncode != 0:
        raise RuntimeError(f"reference ingest failed with exit code {process.returncode}")
    health = check_store(ChunkStore(store))
    if not health.ok:
        raise RuntimeError(f"reference store is inconsistent: {health.problems}")
    gaps = [float(gap) for gap in np.diff(events)]
    return Reference(health.live_ids, health.manifest.generation, gaps)


def kill_at_random_moment(
    process: subprocess.Popen, store: Path, after_commits: int, delay_s: float
) -> int | None:
    """SIGKILL once the run has made `after_commits` commits and `delay_s` more seconds passed. Returns the
    number of commits the run had made when killed, or None if it ended by itself first."""
    wait_until_working(process, store)
    start = generation(store)
    while process.poll() is None and generation(store) < start + after_commits:
        time.sleep(0.001)
    deadline = time.monotonic() + delay_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    if process.poll() is not None:
        return None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return generation(store) - start


def run_trial(
    workdir: Path, reference: Reference, embedder: Embedder, seed: int, max_kills: int = 3
) -> CrashTrial:
    rng = np.random.default_rng(seed)
    trial = CrashTrial(seed, "update" if rng.random() < 0.5 else "fresh")
    started = time.monotonic()
    folder = workdir / f"trial-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    store_path = folder / "store"
    store = ChunkStore(store_path)
    if trial.mode == "update":
        ingest(write_corpus(folder, version=1), store, embedder, options())
    inputs = write_corpus(folder, version=2)
    first_generation = generation(store_path)
    for _ in range(int(rng.integers(1, max_kills + 1))):
        # a later run of the trial has only the rest of the work left: aim within what remains
        remaining = max(1, len(reference.gaps_s) - (generation(store_path) - first_generation))
        after_commits = int(rng.integers(0, remaining))
        delay = float(rng.uniform(0, reference.gaps_s[min(after_commits, len(reference.gaps_s) - 1)]))
        process = start_ingest(inputs, store_path)
        commits = kill_at_random_moment(process, store_path, after_commits, delay)
        if commits is None:
            trial.finished_before_kill += 1
        else:
            trial.commits_before_kill.append(commits)
        trial.kill_points.append((after_commits, round(delay, 3)))
        if store.exists():
            health = check_store(store)
            trial.killed_at_generation.append(health.manifest.generation if health.manifest else -1)
            trial.leftovers_seen += len(health.leftovers)
            trial.problems += [f"after kill: {p.part} {p.file}: {p.message}" for p in health.problems]
        else:
            trial.killed_at_generation.append(0)
    ingest(inputs, store, embedder, options())  # the rerun, to the end
    health = check_store(store)
    trial.problems += [f"after rerun: {p.part} {p.file}: {p.message}" for p in health.problems]
    if health.leftovers or (health.manifest and health.manifest.pending_shards):
        trial.problems.append(f"after rerun: leftovers {health.leftovers} or shards not indexed")
    if health.manifest and any(not record.complete for record in health.manifest.files.values()):
        trial.problems.append("after rerun: a source is still marked partly ingested")
    if health.live_ids != reference.ids:
        lost, extra = len(reference.ids - health.live_ids), len(health.live_ids - reference.ids)
        trial.problems.append(f"after rerun: {lost} chunk(s) lost, {extra} unexpected")
    trial.chunks = len(health.live_ids)
    trial.seconds = round(time.monotonic() - started, 2)
    shutil.rmtree(folder, ignore_errors=True)
    return trial
