"""No-orphan trials: start `dsarag ingest` with read/chunk workers, kill it while it works, and watch through
/proc whether any process it had (its workers, the multiprocessing resource tracker) outlives it
(rag/parent_death.py makes them end). Linux only. Used by tests/rag/test_reliability_orphans.py (a few trials) and
benchmarks/orphan_trials.py (the recorded run).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from dsarag.rag.crash_harness import generation

REPO = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 10


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, each with its start time (so a reused pid is not mistaken for it)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, start: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"  # a zombie has ended


def wait_until_gone(processes: dict[int, str], timeout_s: float) -> list[int]:
    """Wait until none of `processes` is alive; the pids still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(pid, start) for pid, start in processes.items()):
        time.sleep(0.05)
    return [pid for pid, start in processes.items() if alive(pid, start)]


def write_documents(folder: Path, n_documents: int) -> Path:
    """`n_documents` one-chunk Markdown notes."""
    folder.mkdir(parents=True)
    for i in range(n_documents):
        (folder / f"note-{i}.md").write_text(
            f"# Note {i}\n\nThe volunteers met about shift {i} on day {i % 7}.\n"
        )
    return folder


def ingest_command(docs: Path, store: Path, workers: int, batch_chunks: int) -> list[str]:
    return [
        sys.executable, "-m", "dsarag.cli.app", "ingest", str(docs), "--store", str(store),
        "--batch-chunks", str(batch_chunks), "--workers", str(workers), "--json",
    ]  # fmt: skip


def ingest_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def kill_while_working(
    command: list[str], store: Path, workers: int, kill_signal: int, after_commit: bool, delay_s: float = 0.0
) -> dict[int, str]:
    """Start `command` (an ingest into `store`), wait until its workers and the resource tracker run (and, if
    asked, it has committed once) plus `delay_s`, send `kill_signal`; every descendant process it had."""
    process = subprocess.Popen(
        command, env=ingest_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        seen |= descendants(process.pid)
        if len(seen) >= workers + 1 and (not after_commit or generation(store) > 0):
            break
        time.sleep(0.02)
    deadline = time.monotonic() + delay_s
    while process.poll() is None and time.monotonic() < deadline:
        seen |= descendants(process.pid)
        time.sleep(0.02)
    seen |= descendants(process.pid)
    if process.poll() is not None:
        raise RuntimeError("the ingest ended before it was killed: use more documents")
    process.send_signal(kill_signal)
    process.wait()
    return seen
