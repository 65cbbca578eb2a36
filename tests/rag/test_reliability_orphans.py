"""No orphans: a killed `dsarag ingest` leaves none of its processes behind — neither its read/chunk workers nor
the multiprocessing resource tracker — and the next run resumes (rag/parent_death.py; the trial helpers are
rag/orphan_harness.py, benchmarks/orphan_trials.py runs the recorded 20 trials)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsarag.rag.orphan_harness import (
    GONE_WITHIN_S,
    ingest_command,
    ingest_env,
    kill_while_working,
    start_time,
    wait_until_gone,
    write_documents,
)
from dsarag.rag.parent_death import PARENT_POLL_S
from dsarag.rag.store import ChunkStore
from dsarag.rag.store_check import check_store

N_DOCUMENTS = 800  # one chunk each: ≈ 10 s of embedding on 2 cores, so the run is killed mid-way
BATCH_CHUNKS = 100
WORKERS = 2

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


@pytest.mark.slow  # 9-15 s on 2 cores: 800 notes embedded, killed after the first commit, resumed
def test_a_sigkilled_ingest_leaves_no_process_and_resumes(tmp_path):
    docs, store = write_documents(tmp_path / "docs", N_DOCUMENTS), tmp_path / "store"
    command = ingest_command(docs, store, WORKERS, BATCH_CHUNKS)
    processes = kill_while_working(command, store, WORKERS, signal.SIGKILL, after_commit=True)
    assert len(processes) >= WORKERS + 1  # the workers and the resource tracker
    assert wait_until_gone(processes, GONE_WITHIN_S) == []

    rerun = subprocess.run(command, env=ingest_env(), capture_output=True, text=True, check=True)
    report = json.loads(rerun.stdout)
    assert report["unchanged"] >= BATCH_CHUNKS and report["added"] == N_DOCUMENTS - report["unchanged"]
    health = check_store(ChunkStore(store))
    assert health.ok and len(health.live_ids) == N_DOCUMENTS


def test_a_sigterminated_ingest_leaves_no_process(tmp_path):
    """Killed as soon as its processes exist: workers still starting up end too."""
    docs, store = write_documents(tmp_path / "docs", N_DOCUMENTS), tmp_path / "store"
    command = ingest_command(docs, store, WORKERS, BATCH_CHUNKS)
    processes = kill_while_working(command, store, WORKERS, signal.SIGTERM, after_commit=False)
    assert len(processes) >= WORKERS + 1
    assert wait_until_gone(processes, GONE_WITHIN_S) == []
    assert not (store / "manifest.json").exists() or check_store(ChunkStore(store)).ok


def test_without_pdeathsig_the_watcher_thread_ends_an_orphaned_worker():
    """The portable path (no prctl): the watcher thread alone ends a worker whose parent was SIGKILLed."""
    worker = (
        "import os, time; from rag import parent_death; parent_death._kill_on_parent_death = lambda: None; "
        "parent_death.exit_with_parent(os.getppid()); print(os.getpid(), flush=True); time.sleep(60)"
    )
    parent = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", parent], env=ingest_env(), stdout=subprocess.PIPE, text=True
    ) as process:
        worker_pid = int(process.stdout.readline())
        worker_process = {worker_pid: start_time(worker_pid)}
        process.kill()
    assert wait_until_gone(worker_process, 3 * PARENT_POLL_S) == []
