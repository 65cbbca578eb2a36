"""Incremental ingest into the Parquet + FAISS store, with the real embedder."""

import os
from pathlib import Path

import pytest

from dsarag.base.errors import MissingInputError, StoreError
from dsarag.rag.ingest import ingest_folder
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore

PARAGRAPH = "The cooperative meets on the first Monday of each month in the library annex. " * 12


def write_docs(folder: Path, docs: dict[str, str]) -> None:
    for name, text in docs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def docs_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    write_docs(
        folder,
        {
            "bikes.md": "---\ndate: 2024-03-15\n---\n# Bike workshop\n\nThe bike workshop opens at 9am on Saturdays.\n",
            "solar.txt": "Solar panels on the depot roof produce 42 kWh on a sunny day.\n\n" + PARAGRAPH,
            "notes/2023-11-02-minutes.md": "Minutes. The treasurer is Anna Lindqvist.\n",
        },
    )
    return folder


def chunk_ids_by_path(store: ChunkStore) -> dict[str, list[int]]:
    manifest = store.read_manifest()
    table = store.read_chunks(manifest, columns=["path", "chunk_id"])
    ids: dict[str, list[int]] = {}
    for path, chunk_id in zip(
        table.column("path").to_pylist(), table.column("chunk_id").to_pylist(), strict=True
    ):
        ids.setdefault(path, []).append(chunk_id)
    return ids


def test_ingest_writes_parquet_index_and_manifest_that_agree(docs_folder, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    report = ingest_folder(docs_folder, store, embedder)
    assert report.added == 3 and report.committed
    manifest = store.read_manifest()
    table = store.read_chunks(manifest)
    assert table.num_rows == manifest.n_chunks == report.chunks_total >= 3
    assert store.read_index(manifest).ntotal == table.num_rows
    assert set(table.column("path").to_pylist()) == {"bikes.md", "solar.txt", "notes/2023-11-02-minutes.md"}
    assert {"chunk_id", "text", "char_start", "line_start", "date", "content_hash", "embedding_model"} <= set(
        table.column_names
    )
    dates = dict(zip(table.column("path").to_pylist(), table.column("date").to_pylist(), strict=True))
    assert str(dates["bikes.md"]) == "2024-03-15"
    assert str(dates["notes/2023-11-02-minutes.md"]) == "2023-11-02"


def test_chunk_text_and_lines_point_into_the_source_file(docs_folder, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(docs_folder, store, embedder)
    for row in store.read_chunks(store.read_manifest()).to_pylist():
        source = (docs_folder / row["path"]).read_text()
        assert source[row["char_start"] : row["char_end"]] == row["text"]
        first_line = source[: row["char_start"]].count("\n") + 1
        assert row["line_start"] == first_line


def test_reingest_of_unchanged_folder_commits_nothing_and_keeps_ids(docs_folder, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(docs_folder, store, embedder)
    before = chunk_ids_by_path(store)
    generation = store.read_manifest().generation
    os.utime(docs_folder / "bikes.md")  # touched but not changed: still unchanged
    report = ingest_folder(docs_folder, store, embedder)
    assert (report.unchanged, report.added, report.changed, report.deleted) == (3, 0, 0, 0)
    assert not report.committed and report.chunks_embedded == 0
    assert store.read_manifest().generation == generation
    assert chunk_ids_by_path(store) == before


def test_incremental_ingest_adds_changes_and_deletes_files(docs_folder, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(docs_folder, store, embedder)
    before = chunk_ids_by_path(store)
    (docs_folder / "new.md").write_text("The kitchen serves soup on Fridays.\n")
    (docs_folder / "bikes.md").write_text(
        "# Bike workshop\n\nThe bike workshop now opens at 10am on Sundays.\n"
    )
    (docs_folder / "notes/2023-11-02-minutes.md").unlink()
    report = ingest_folder(docs_folder, store, embedder)
    assert (report.added, report.changed, report.deleted, report.unchanged) == (1, 1, 1, 1)
    after = chunk_ids_by_path(store)
    assert set(after) == {"bikes.md", "solar.txt", "new.md"}
    assert after["solar.txt"] == before["solar.txt"]
    assert after["bikes.md"] != before["bikes.md"]
    manifest = store.read_manifest()
    assert store.read_index(manifest).ntotal == manifest.n_chunks
    hits = Retriever(store, embedder).semantic("When does the bike workshop open?", 1)
    assert "10am on Sundays" in hits[0].text


def test_store_built_with_another_embedder_is_refused_and_left_unchanged(docs_folder, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(docs_folder, store, embedder)
    manifest = store.read_manifest()  # as a store written by another embedder: a valid manifest
    manifest.embedding_model = "some-other-embedder"
    store.write_manifest(manifest)
    snapshot = {path.name: path.read_bytes() for path in store.folder.iterdir()}
    (docs_folder / "new.md").write_text("A new document.\n")
    with pytest.raises(StoreError, match="some-other-embedder"):
        ingest_folder(docs_folder, store, embedder)
    assert {path.name: path.read_bytes() for path in store.folder.iterdir()} == snapshot


def test_corrupt_parquet_is_reported_with_the_file_name(docs_folder, tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(docs_folder, store, embedder)
    chunks_path = store.folder / store.read_manifest().shards[0].name
    data = bytearray(chunks_path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # garbled, same size
    chunks_path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=chunks_path.name):
        Retriever(store, embedder)


def test_truncated_index_is_reported_and_index_rebuild_repairs_it(docs_folder, tmp_path, embedder, run_cli):
    store = ChunkStore(tmp_path / "store")
    ingest_folder(docs_folder, store, embedder)
    index_path = store.folder / store.read_manifest().index_file
    index_path.write_bytes(index_path.read_bytes()[:100])
    with pytest.raises(StoreError, match="index rebuild"):
        Retriever(store, embedder)
    code, _, _ = run_cli("index", "rebuild", "--store", str(store.folder))
    assert code == 0
    assert Retriever(store, embedder).semantic("treasurer", 1)[0].path == "notes/2023-11-02-minutes.md"


def test_missing_and_empty_folders_are_clear_errors(tmp_path, embedder):
    store = ChunkStore(tmp_path / "store")
    with pytest.raises(MissingInputError, match="not found"):
        ingest_folder(tmp_path / "nope", store, embedder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="no documents"):
        ingest_folder(tmp_path / "empty", store, embedder)
    assert not store.folder.exists()
