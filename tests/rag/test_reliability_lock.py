"""Concurrency: writers of one store serialize on its lock (timeout → exit 8 naming the holder); readers never
take it and see the last committed state, even while a writer commits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsarag.base.errors import EXIT_LOCKED, StoreError
from dsarag.rag.ask import refresh_store
from dsarag.rag.ingest import ingest_folder
from dsarag.rag.lock import LOCK_NAME, lock_holder, store_write_lock
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore

REPO = Path(__file__).resolve().parents[2]


def hold_lock(store: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds the store's write lock for `seconds` (started once it holds it)."""
    code = (
        "import sys, time\nfrom rag.lock import store_write_lock\n"
        f"with store_write_lock({str(store)!r}, command='dsarag ingest (test holder)'):\n"
        f"    print('locked', flush=True)\n    time.sleep({seconds})\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_second_ingest_times_out_with_one_line_naming_store_and_holder_pid(
    small_docs, tmp_path, run_cli, embedder
):
    store = tmp_path / "store"
    ingest_folder(small_docs, ChunkStore(store), embedder)
    (small_docs / "new.md").write_text("A new note about the tool library.\n")
    holder = hold_lock(store, 30)
    try:
        before = {name: data for name, data in snapshot(store).items() if name != LOCK_NAME}
        started = time.monotonic()
        code, _, err = run_cli("ingest", str(small_docs), "--store", str(store), "--lock-timeout", "0.5")
        waited = time.monotonic() - started
        assert code == EXIT_LOCKED and 0.5 <= waited < 10
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert str(store) in lines[0] and f"pid {holder.pid}" in lines[0] and "--lock-timeout" in lines[0]
        assert lock_holder(store)["pid"] == holder.pid
        assert {name: data for name, data in snapshot(store).items() if name != LOCK_NAME} == before
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_ingest_runs_once_the_holder_finishes(small_docs, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    holder = hold_lock(store.folder, 1.5)
    started = time.monotonic()
    report = ingest_folder(small_docs, store, embedder, lock_timeout_s=30)
    assert time.monotonic() - started >= 1.0  # it waited for the holder, then ingested
    assert holder.wait() == 0 and report.added == 2 and store.read_manifest().n_chunks == 2
    assert lock_holder(store.folder) is None and not (store.folder / LOCK_NAME).exists()


def test_a_writer_killed_by_sigkill_never_leaves_the_store_locked(tmp_path):
    holder = hold_lock(tmp_path / "store", 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_holder(tmp_path / "store") is None
    with store_write_lock(tmp_path / "store", timeout_s=0):  # at once: the kernel released the dead lock
        assert json.loads((tmp_path / "store" / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_ask_during_an_ingest_reads_the_last_committed_state_without_waiting(small_docs, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(small_docs, store, embedder)
    (small_docs / "kitchen.md").write_text("# Kitchen\n\nThe kitchen is closed for renovation until May.\n")
    holder = hold_lock(store.folder, 30)
    try:
        started = time.monotonic()
        assert (
            refresh_store(small_docs, store, embedder, console=None) is None
        )  # `ask --docs`: no wait, no ingest
        hits = Retriever(store, embedder).semantic("When does the kitchen serve lunch?", 2)
        assert time.monotonic() - started < 10
        assert "lunch at noon" in hits[0].text  # the committed state, not the file being changed
    finally:
        holder.kill()
        holder.wait()
    assert (
        refresh_store(small_docs, store, embedder, console=None).changed == 1
    )  # lock free: ask refreshes again


def test_a_reader_retries_on_the_new_commit_when_a_writer_removed_its_files(small_docs, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(small_docs, store, embedder)
    calls = []

    def read(manifest):
        if not calls:  # a writer commits between this reader's manifest and its file reads
            (small_docs / "kitchen.md").write_text("# Kitchen\n\nLunch moves to one o'clock.\n")
            ingest_folder(small_docs, store, embedder)
        calls.append(manifest.generation)
        return store.read_index(manifest), store.read_chunks(manifest, ["text"])

    index, chunks = store.read_committed(read)
    assert len(calls) == 2 and calls[1] > calls[0]
    assert any("Lunch moves" in text for text in chunks.column("text").to_pylist()) and index.ntotal == 2
    # damage on an unchanged manifest is not retried away: it is reported
    parquet = next(store.folder.glob("chunks-*.parquet"))
    parquet.write_bytes(parquet.read_bytes()[:-100])
    with pytest.raises(StoreError, match=parquet.name):
        store.read_committed(lambda manifest: store.read_chunks(manifest))


def test_two_concurrent_ingests_of_one_store_serialize_without_duplicates(small_docs, tmp_path, embedder):
    """Without the lock both would plan every file as new and commit it twice."""
    import threading

    for i in range(6):
        (small_docs / f"extra-{i}.md").write_text(f"# Extra {i}\n\nNote {i} about the repair café.\n")
    store = ChunkStore(tmp_path / "store")
    reports, errors = [], []

    def run() -> None:
        try:
            reports.append(ingest_folder(small_docs, store, embedder, lock_timeout_s=60))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted((report.added, report.unchanged) for report in reports) == [(0, 8), (8, 0)]
    from dsarag.rag.store_check import check_store

    health = check_store(store)
    assert health.ok and len(health.live_ids) == 8 and not health.leftovers
