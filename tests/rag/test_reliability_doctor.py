"""Corruption and `dsarag doctor`: truncated or garbled Parquet, FAISS, manifest and safetensors files are
detected by their checksums with a one-line message and a documented exit code; `--repair` rebuilds the
index from the stored embeddings and re-ingests the sources of damaged shards, ending with the same chunks."""

import json
import os
import shutil
from pathlib import Path

import pytest

from dsarag.base.errors import EXIT_BAD_INPUT, EXIT_MODEL, EXIT_STORE, ModelError
from dsarag.corpora.corpus_files import CorpusColumns
from dsarag.rag.ingest import IngestOptions, ingest
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore
from dsarag.rag.store_check import check_store


@pytest.fixture
def built(tmp_path, embedder) -> tuple[Path, ChunkStore, set[int]]:
    """A docs folder ingested one document per shard (so one shard can be lost without the others)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, topic in enumerate(["lunch at noon", "bike repairs on Saturday", "solar panels on the roof"]):
        (docs / f"note-{i}.md").write_text(f"# Note {i}\n\nThe cooperative organises {topic}.\n")
    store = ChunkStore(tmp_path / "store")
    ingest([docs], store, embedder, IngestOptions(CorpusColumns(), batch_chunks=1, workers=0))
    return docs, store, check_store(store).live_ids


def doctor(run_cli, *args: str) -> tuple[int, dict]:
    code, out, _ = run_cli("doctor", *args, "--json")
    return code, json.loads(out)


def failures(result: dict) -> list[dict]:
    return [check for check in result["checks"] if check["status"] == "fail"]


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_healthy_install_and_store_exit_0_with_every_area_checked(built, run_cli):
    _, store, _ = built
    code, result = doctor(run_cli, "--store", str(store.folder))
    assert code == 0 and result["exit_code"] == 0 and not failures(result)
    assert {check["area"] for check in result["checks"]} == {"models", "caches", "disk", "store"}
    assert any(check["name"] == "all-minilm-l6-v2" and check["status"] == "ok" for check in result["checks"])


def test_truncated_shard_is_detected_and_repair_reingests_its_sources(built, run_cli):
    _, store, ids = built
    shard = store.read_manifest().shards[1].name
    (store.folder / shard).write_bytes((store.folder / shard).read_bytes()[:-300])
    code, err = run_cli("ask", "When is lunch?", "--store", str(store.folder), "--model", "tiny")[::2]
    assert code == EXIT_STORE and shard in err and "doctor" in err and len(err.strip().splitlines()) == 1
    code, result = doctor(run_cli, "--store", str(store.folder))
    assert code == EXIT_STORE and [check["name"] for check in failures(result)] == [f"shard {shard}"]
    assert "--repair" in failures(result)[0]["fix"]
    code, result = doctor(run_cli, "--store", str(store.folder), "--repair")
    assert code == 0, result
    assert any("dropped damaged shard" in line for line in result["repairs"])
    assert any("ingested 1 source(s) again" in line for line in result["repairs"])
    health = check_store(store)
    assert health.ok and health.live_ids == ids and not health.leftovers and health.index_ok


def test_garbled_index_is_rebuilt_from_stored_embeddings(built, run_cli, embedder):
    _, store, ids = built
    index_file = store.folder / store.read_manifest().index_file
    flip_byte(index_file)
    code, result = doctor(run_cli, "--store", str(store.folder))
    assert code == EXIT_STORE and failures(result)[0]["name"] == f"index {index_file.name}"
    code, result = doctor(run_cli, "--store", str(store.folder), "--repair")
    assert code == 0 and any("rebuilt the index" in line for line in result["repairs"])
    assert not any("ingested" in line for line in result["repairs"])  # nothing re-embedded
    assert check_store(store).live_ids == ids
    assert "bike" in Retriever(store, embedder).semantic("When are bikes repaired?", 1)[0].text


def test_garbled_manifest_is_detected_and_rebuilt_from_the_documents(built, run_cli):
    docs, store, ids = built
    text = store.manifest_path.read_text()
    store.manifest_path.write_text(text.replace('"n_chunks": 3', '"n_chunks": 4', 1))  # valid JSON, wrong
    code, result = doctor(run_cli, "--store", str(store.folder))
    assert code == EXIT_STORE and "checksum" in failures(result)[0]["detail"]
    code, _, err = run_cli("doctor", "--store", str(store.folder), "--repair")
    assert code == EXIT_BAD_INPUT and "--docs DIR" in err and len(err.strip().splitlines()) == 1
    code, result = doctor(run_cli, "--store", str(store.folder), "--docs", str(docs), "--repair")
    assert code == 0 and check_store(store).live_ids == ids


def test_leftovers_of_a_killed_writer_are_a_warning_and_repair_removes_them(built, run_cli):
    _, store, _ = built
    (store.folder / ".chunks-000099.parquet.x1y2.tmp").write_bytes(b"half a shard")
    code, result = doctor(run_cli, "--store", str(store.folder))
    assert code == 0 and any(
        check["status"] == "warn" for check in result["checks"] if check["area"] == "store"
    )
    code, result = doctor(run_cli, "--store", str(store.folder), "--repair")
    assert code == 0 and not check_store(store).leftovers


def test_garbled_safetensors_with_its_mtime_restored_is_refused_before_use(tmp_path, monkeypatch, run_cli):
    from dsarag.base.paths import cache_dir
    from dsarag.indexer_model.provision import embedder_path

    source = cache_dir() / "models" / "all-minilm-l6-v2"
    monkeypatch.setenv("DSARAG_CACHE", str(tmp_path / "cache"))
    shutil.copytree(source, tmp_path / "cache" / "models" / "all-minilm-l6-v2")
    assert embedder_path().is_dir()  # the copy is hashed once (new ctimes), then stamped
    weights = embedder_path() / "model.safetensors"
    stat = weights.stat()
    flip_byte(weights, 0.7)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only the ctime moved
    with pytest.raises(ModelError, match="dsarag models pull all-minilm-l6-v2"):
        embedder_path()
    code, result = doctor(run_cli)
    assert code == EXIT_MODEL
    (check,) = [check for check in failures(result) if check["area"] == "models"]
    assert check["name"] == "all-minilm-l6-v2" and "model.safetensors" in check["detail"]
    assert check["fix"] == "dsarag models pull all-minilm-l6-v2"


def damaged_corpus_store(tmp_path, embedder) -> tuple[Path, ChunkStore, set[int]]:
    """A JSONL corpus read with its own column names, then its only shard truncated."""
    corpus = tmp_path / "notes.jsonl"
    rows = [{"doc": f"n{i}", "body": f"Note {i} about the tool library."} for i in range(3)]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = ChunkStore(tmp_path / "store")
    ingest([corpus], store, embedder, IngestOptions(CorpusColumns(text="body", id="doc"), workers=0))
    ids = check_store(store).live_ids
    shard = store.folder / store.read_manifest().shards[0].name
    shard.write_bytes(shard.read_bytes()[:-100])
    return corpus, store, ids


def test_repair_reingests_a_corpus_file_with_the_columns_it_was_read_with(tmp_path, embedder, run_cli):
    corpus, store, ids = damaged_corpus_store(tmp_path, embedder)
    assert store.parse_manifest().files[corpus.name].columns == {"text": "body", "id": "doc"}
    code, result = doctor(run_cli, "--store", str(store.folder), "--repair")
    assert code == 0 and any("ingested 1 source(s) again" in line for line in result["repairs"]), result
    health = check_store(store)
    assert health.ok and health.live_ids == ids
    hits = Retriever(store, embedder).semantic("a note about the tool library", 3)
    assert sorted(hit.path for hit in hits) == [f"notes.jsonl#n{i}" for i in range(3)]  # ids from "doc"
    assert all(hit.text.startswith("Note ") for hit in hits)  # text from "body"


def test_repair_names_the_command_for_a_corpus_file_of_an_older_store(
    tmp_path, embedder, run_cli, monkeypatch
):
    """Stores written before the manifest kept a corpus file's columns: repair cannot guess them."""
    monkeypatch.setattr(CorpusColumns, "as_record", lambda self: None)
    corpus, store, _ = damaged_corpus_store(tmp_path, embedder)
    code, result = doctor(run_cli, "--store", str(store.folder), "--repair")
    assert code == 0 and check_store(store).ok  # consistent again, without the file's chunks
    (line,) = [line for line in result["repairs"] if "corpus file" in line]
    assert f"dsarag ingest {corpus} --store {store.folder}" in line and "--text-column" in line


def test_the_doctor_table_puts_each_fix_under_its_check(tmp_path, run_cli):
    code, _, err = run_cli("doctor", "--store", str(tmp_path / "missing"))
    assert code == EXIT_STORE
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if "no store here" in line)
    assert "fix: dsarag ingest DIR" in lines[at + 1]  # the next table line, in the same cell


def test_the_doctor_names_a_broken_answerability_probe_and_the_fix(tmp_path, monkeypatch, run_cli):
    broken = tmp_path / "indexers" / "some-model"
    broken.mkdir(parents=True)
    (broken / "answerability.json").write_text("{not json")
    monkeypatch.setenv("DSARAG_INDEXERS", str(tmp_path / "indexers"))
    code, result = doctor(run_cli)
    checks = {check["name"]: check for check in result["checks"]}
    assert checks["answerability probe some-model"]["status"] == "fail" and code == result["exit_code"] != 0
    assert "answerability_fit" in checks["answerability probe some-model"]["fix"]
    assert (
        checks["answerability probe qwen2.5-coder-0.5b-instruct"]["status"] == "ok"
    )  # the shipped one loads
