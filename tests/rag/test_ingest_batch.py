"""Batch ingest: corpus files with column options, globs, failures (exit 6), resumability under SIGKILL,
deletions in HNSW (tombstones) and IVF (remove_ids), memory-mapped index loading, the Ray engine."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from dsarag.base.errors import EXIT_BAD_INPUT, EXIT_PARTIAL_INGEST
from dsarag.rag.crash_harness import TOPICS
from dsarag.rag.index import remove_ids, search
from dsarag.rag.ingest import IngestOptions, default_workers, ingest
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore
from dsarag.rag.store_index import index_info, update_index

REPO = Path(__file__).resolve().parents[2]


def records(n: int, prefix: str = "r") -> list[dict]:
    return [
        {
            "doc_id": f"{prefix}{i}",
            "heading": f"Note {i}",
            "published": f"2024-{1 + i % 12:02d}-15",
            "body": f"Note {prefix}{i}: the volunteers discussed {TOPICS[i % len(TOPICS)]} on day {i}.",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


COLUMNS = [
    "--text-column",
    "body",
    "--id-column",
    "doc_id",
    "--title-column",
    "heading",
    "--date-column",
    "published",
]


def options(**kwargs) -> IngestOptions:
    from dsarag.corpora.corpus_files import CorpusColumns

    kwargs.setdefault("workers", 0)
    return IngestOptions(columns=CorpusColumns("body", "doc_id", "heading", "published"), **kwargs)


def check_store_consistent(store: ChunkStore) -> set[int]:
    """Manifest, Parquet shards and index agree on count and ids; no id twice. Returns the ids."""
    manifest = store.read_manifest()
    ids = store.read_chunks(manifest, ["chunk_id"]).column("chunk_id").to_numpy()
    assert len(ids) == len(set(ids.tolist())) == manifest.n_chunks
    assert sum(manifest.files[key].n_chunks for key in manifest.files) == manifest.n_chunks
    index = store.read_index(manifest)
    assert index.ntotal == manifest.n_chunks and not manifest.tombstones and not manifest.pending_shards
    assert set(faiss.vector_to_array(index.id_map).tolist()) == set(ids.tolist())
    assert {path.name for path in store.folder.iterdir()} == {"manifest.json", *manifest.checksums}
    return set(ids.tolist())


def test_jsonl_parquet_and_csv_corpora_with_column_options(tmp_path, embedder):
    rows = records(9)
    write_jsonl(tmp_path / "a.jsonl", rows[:3])
    pq.write_table(pa.Table.from_pylist(rows[3:6]), tmp_path / "b.parquet")
    pa_csv.write_csv(pa.Table.from_pylist(rows[6:]), tmp_path / "c.csv")
    store = ChunkStore(tmp_path / "store")
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.parquet", tmp_path / "c.csv"]
    report = ingest(inputs, store, embedder, options())
    assert (report.added, report.records_read, report.failed) == (3, 9, [])
    chunks = store.read_chunks(store.read_manifest()).to_pylist()
    by_path = {row["path"]: row for row in chunks}
    assert set(by_path) == {"a.jsonl#r0", "a.jsonl#r1", "a.jsonl#r2", "b.parquet#r3", "b.parquet#r4"} | {
        "b.parquet#r5",
        "c.csv#r6",
        "c.csv#r7",
        "c.csv#r8",
    }
    assert by_path["c.csv#r7"]["text"] == rows[7]["body"] and by_path["c.csv#r7"]["title"] == "Note 7"
    assert (
        str(by_path["b.parquet#r4"]["date"]) == "2024-05-15"
        and by_path["b.parquet#r4"]["source"] == "b.parquet"
    )
    retriever = Retriever(store, embedder)
    hits = retriever.semantic("who discussed rainwater?", 1)
    assert "rainwater" in hits[0].text
    assert retriever.documents_titled["Note 7"] == ["c.csv#r7"]  # a record is titled by its column
    again = ingest(inputs, store, embedder, options())
    assert again.unchanged == 3 and not again.committed


def test_unknown_column_is_one_line_error_naming_file_and_columns(tmp_path, run_cli):
    corpus = write_jsonl(tmp_path / "a.jsonl", records(2))
    code, _, err = run_cli(
        "ingest", str(corpus), "--store", str(tmp_path / "store"), "--text-column", "content"
    )
    assert code == EXIT_BAD_INPUT
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "a.jsonl" in lines[0] and "'content'" in lines[0]
    assert "doc_id, heading, published, body" in lines[0] and "--text-column" in lines[0]
    assert not (tmp_path / "store").exists()


def test_glob_pattern_and_failed_records_exit_6_listing_each(tmp_path, run_cli):
    write_jsonl(tmp_path / "a.jsonl", records(3, "a"))
    bad = write_jsonl(tmp_path / "b.jsonl", records(2, "b"))
    bad.write_text(bad.read_text() + "{not json\n" + json.dumps({"doc_id": "x", "body": ""}) + "\n")
    code, out, err = run_cli(
        "ingest", str(tmp_path / "*.jsonl"), "--store", str(tmp_path / "store"), *COLUMNS, "--json"
    )
    assert code == EXIT_PARTIAL_INGEST
    report = json.loads(out)
    assert report["added"] == 2 and report["chunks_total"] == 5
    assert [(item["path"], item["reason"].split(":")[0]) for item in report["failed"]] == [
        ("b.jsonl", "line 3"),
        ("b.jsonl", "line 4"),
    ]
    code, _, err = run_cli("ingest", str(tmp_path / "*.csv"), "--store", str(tmp_path / "store"))
    assert code == 3 and "no file matches" in err


def test_changed_corpus_file_replaces_its_chunks(tmp_path, embedder):
    corpus = write_jsonl(tmp_path / "a.jsonl", records(6))
    store = ChunkStore(tmp_path / "store")
    ingest([corpus], store, embedder, options(batch_chunks=2))
    before = check_store_consistent(store)
    changed = records(6)
    changed[2]["body"] = "Note 2: the volunteers repainted the harbor office."
    write_jsonl(corpus, changed[:5])
    report = ingest([corpus], store, embedder, options(batch_chunks=2))
    assert report.changed == 1
    after = check_store_consistent(store)
    assert len(after) == 5 and len(after - before) == 1  # ids of unchanged records survive
    texts = store.read_chunks(store.read_manifest(), ["text"]).column("text").to_pylist()
    assert changed[2]["body"] in texts and records(6)[2]["body"] not in texts


def _start_ingest(corpus: Path, store: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "dsarag.cli.app", "ingest", str(corpus), "--store", str(store), *COLUMNS]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command += ["--batch-chunks", "8", "--workers", "1"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_ingest_killed_at_any_moment_resumes_without_duplicates_or_losses(tmp_path, embedder):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records(60))
    store_path = tmp_path / "store"
    manifest_path = store_path / "manifest.json"

    def generation() -> int:
        try:
            return json.loads(manifest_path.read_text())["generation"]
        except (OSError, ValueError):
            return 0

    # 1: right after the first batch commit
    _kill_when(_start_ingest(corpus, store_path), lambda: generation() >= 1)
    assert generation() >= 1
    # 2: mid-batch, while a shard is being written (or just after, if that moment is missed)
    first = generation()
    _kill_when(
        _start_ingest(corpus, store_path),
        lambda: any(p.name.endswith(".tmp") for p in store_path.iterdir()) or generation() > first + 1,
    )
    store = ChunkStore(store_path)
    partial = store.read_manifest(check_index=False)
    assert not partial.files["corpus.jsonl"].complete
    report = ingest([corpus], store, embedder, options(batch_chunks=8))
    assert report.resumed == 1
    resumed_ids = check_store_consistent(store)

    clean = ChunkStore(tmp_path / "clean")
    ingest([corpus], clean, embedder, options())
    assert resumed_ids == check_store_consistent(clean)
    assert len(resumed_ids) == 60


def test_hnsw_deletions_are_tombstones_filtered_from_search_until_rebuild(tmp_path, embedder, run_cli):
    corpus = write_jsonl(tmp_path / "a.jsonl", records(3, "a"))
    other = write_jsonl(tmp_path / "b.jsonl", records(40, "b"))
    store = ChunkStore(tmp_path / "store")
    ingest([corpus, other], store, embedder, options(index_factory="HNSW32"))
    old_ids = set(store.read_chunks(store.read_manifest(), ["chunk_id"]).column("chunk_id").to_pylist())
    changed = [
        dict(row, body=f"The choir rehearses on Thursday, version {row['doc_id']}.")
        for row in records(3, "a")
    ]
    write_jsonl(corpus, changed)
    ingest([corpus, other], store, embedder, options(index_factory="HNSW32"))
    manifest = store.read_manifest()
    assert manifest.index_factory == "IDMap2,HNSW32"
    assert len(manifest.tombstones) == 3 and set(manifest.tombstones) <= old_ids
    index = store.read_index(manifest)
    assert index.ntotal == manifest.n_chunks + 3 == 46
    query = embedder.encode([records(3, "a")[0]["body"]])
    _, unfiltered = search(index, query, 1)
    assert unfiltered[0][0] in manifest.tombstones  # the stale vector is still in the graph
    _, found = search(index, query, 10, exclude_ids=manifest.tombstones)
    assert not set(found[0].tolist()) & set(manifest.tombstones) and -1 not in found[0]
    assert all(
        hit.path != "a.jsonl#a0" or "choir" in hit.text
        for hit in Retriever(store, embedder).semantic("note 0", 5)
    )
    code, out, _ = run_cli("index", "rebuild", "--store", str(store.folder))
    assert code == 0
    code, out, _ = run_cli("index", "info", "--store", str(store.folder), "--json")
    info = json.loads(out)
    assert (info["tombstones"], info["vectors"], info["chunks"]) == (0, 43, 43)
    assert info["index_params"]["efSearch"] >= 64 and info["index_factory"] == "IDMap2,HNSW32"


@pytest.mark.parametrize("factory", ["IVF1,Flat", "IVF1,PQ4x4,Refine(SQ8)"])
def test_ivf_deletions_are_removed_from_the_index(tmp_path, embedder, factory):
    corpus = write_jsonl(tmp_path / "a.jsonl", records(40))
    store = ChunkStore(tmp_path / "store")
    ingest([corpus], store, embedder, options(index_factory=factory))
    write_jsonl(corpus, records(40)[:30])
    ingest([corpus], store, embedder, options(index_factory=factory))
    manifest = store.read_manifest()
    assert manifest.index_factory == factory and manifest.tombstones == []
    index = store.read_index(manifest)
    assert index.ntotal == manifest.n_chunks == 30
    assert faiss.extract_index_ivf(index).direct_map.type == faiss.DirectMap.Hashtable
    _, found = search(index, embedder.encode([row["body"] for row in records(40)[30:]]), 30)
    live = set(store.read_chunks(manifest, ["chunk_id"]).column("chunk_id").to_pylist())
    assert set(found.ravel().tolist()) == live  # no deleted chunk comes back, from either stage if refined
    assert ("k_factor" in index_info(store, manifest)["index_params"]) == ("Refine" in factory)


def test_index_is_memory_mapped_and_catches_up_with_unindexed_shards(tmp_path, embedder):
    corpus = write_jsonl(tmp_path / "a.jsonl", records(8))
    store = ChunkStore(tmp_path / "store")
    ingest([corpus], store, embedder, options())
    manifest = store.read_manifest()
    assert not faiss.downcast_index(
        store.read_index(manifest).index
    ).codes.is_owned  # read from the mapped file
    # a batch committed after the index was written (as a killed or running ingest leaves it)
    extra = store.read_chunks(manifest).slice(0, 2)
    extra = extra.set_column(0, "chunk_id", pa.array([11, 12], pa.int64()))
    manifest = store.commit_batch(manifest, extra.set_column(1, "source", pa.array(["x", "x"])), set())
    index = store.read_index(store.read_manifest())
    assert index.ntotal == 10
    _, found = search(index, embedder.encode([extra.column("text")[0].as_py()]), 3)
    assert {11, 12} & set(found[0].tolist())
    assert update_index(store, manifest).action == "updated"
    manifest = store.read_manifest()
    assert not manifest.pending_shards and store.read_index(manifest).ntotal == 10


@pytest.mark.slow
def test_ray_engine_gives_the_same_store_as_the_local_engine(tmp_path, embedder):
    ray = pytest.importorskip("ray", reason="Ray Data is the optional `ray` extra: pip install 'dsarag[ray]'")
    corpus = write_jsonl(tmp_path / "a.jsonl", records(10))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bikes.md").write_text("# Bikes\n\nThe workshop opens at 9am on Saturdays.\n")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        ray_store = ChunkStore(tmp_path / "ray-store")
        report = ingest([corpus, tmp_path / "docs"], ray_store, embedder, options(engine="ray", workers=1))
    finally:
        ray.shutdown()
    assert report.added == 2 and report.chunks_embedded == 11
    local_store = ChunkStore(tmp_path / "local-store")
    ingest([corpus, tmp_path / "docs"], local_store, embedder, options())
    assert check_store_consistent(ray_store) == check_store_consistent(local_store)
    ray_vectors = ray_store.read_chunks(ray_store.read_manifest(), ["chunk_id", "embedding"]).sort_by(
        "chunk_id"
    )
    local_vectors = local_store.read_chunks(local_store.read_manifest(), ["chunk_id", "embedding"]).sort_by(
        "chunk_id"
    )
    assert np.allclose(
        np.stack(ray_vectors.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(local_vectors.column("embedding").to_numpy(zero_copy_only=False)),
        atol=1e-4,
    )


def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_workers() == 3  # taskset -c 0-3 on a 64-core host: 3 chunkers beside the embedder
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers() == 1


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["IVF2,Flat", "IVF2,PQ4x4,Refine(SQ8)"])
def test_ray_engine_adds_ivf_shards_on_the_cluster_and_merges_them(tmp_path, embedder, factory):
    ray = pytest.importorskip("ray", reason="Ray Data is the optional `ray` extra: pip install 'dsarag[ray]'")
    from dsarag.rag.ingest_ray import fill_on_ray
    from dsarag.rag.store_index import add_shards

    corpus = write_jsonl(tmp_path / "a.jsonl", records(64))  # IVF2 trains on >= 60 vectors
    ivf = {"index_factory": factory, "batch_chunks": 16}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        ray_store = ChunkStore(tmp_path / "ray-store")
        ingest([corpus], ray_store, embedder, options(engine="ray", workers=1, **ivf))
        manifest = ray_store.read_manifest()
        assert len(manifest.shards) >= 3
        trained = faiss.deserialize_index(faiss.serialize_index(ray_store.read_index(manifest)))
        trained.reset()  # the same trained quantizer, no vectors
        names = [shard.name for shard in manifest.shards]
        merged = fill_on_ray(ray_store, faiss.clone_index(trained), names)
    finally:
        ray.shutdown()
    here = add_shards(ray_store, faiss.clone_index(trained), names)
    local_store = ChunkStore(tmp_path / "local-store")
    ingest([corpus], local_store, embedder, options(**ivf))
    queries = embedder.encode(["opening hours of the workshop", "rainfall in the valley"])
    for index in (
        merged,
        ray_store.read_index(ray_store.read_manifest()),
        local_store.read_index(local_store.read_manifest()),
    ):
        assert index.ntotal == here.ntotal == 64  # one chunk per record
        scores, ids = search(index, queries, 5, nprobe=2)
        want_scores, want_ids = search(here, queries, 5, nprobe=2)
        assert ids.tolist() == want_ids.tolist()
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    victim = int(ids[0, 0])
    assert remove_ids(merged, [victim]) == 1 and merged.ntotal == 63  # the id map came back after the merge
