"""The command line: JSON output, and bad input → one line naming the file and the fix, a documented exit code,
the store unchanged, no traceback."""

import json
from pathlib import Path

import pytest

from dsarag.base.errors import EXIT_BAD_INPUT, EXIT_MISSING_INPUT, EXIT_PARTIAL_INGEST, EXIT_STORE
from dsarag.rag.store import ChunkStore


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0]


def test_ingest_json_and_index_info_report_chunks_and_vectors(small_docs, tmp_path, run_cli):
    store = tmp_path / "store"
    code, out, _ = run_cli("ingest", str(small_docs), "--store", str(store), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["added"] == 2 and report["chunks_total"] >= 2
    code, out, _ = run_cli("index", "info", "--store", str(store), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["chunks"] == info["vectors"] == report["chunks_total"]
    assert info["embedding_model"] == "all-minilm-l6-v2" and info["index_factory"] == "IDMap2,Flat"


def test_default_store_of_a_folder_is_shared_by_ingest_and_index_info(small_docs, run_cli):
    assert run_cli("ingest", str(small_docs))[0] == 0
    code, out, _ = run_cli("index", "info", "--docs", str(small_docs), "--json")
    assert code == 0 and json.loads(out)["files"] == 2


def test_missing_folder_exits_3_with_one_line(tmp_path, run_cli):
    code, _, err = run_cli("ingest", str(tmp_path / "nowhere"), "--store", str(tmp_path / "store"))
    assert code == EXIT_MISSING_INPUT
    assert_one_line_error(err, "nowhere")
    assert not (tmp_path / "store").exists()


def test_empty_folder_and_binary_only_folder_exit_3(tmp_path, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli("ingest", str(empty), "--store", str(tmp_path / "s1"))
    assert code == EXIT_MISSING_INPUT
    assert_one_line_error(err, "empty")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.dat").write_bytes(bytes(range(256)) * 10)
    code, _, err = run_cli("ingest", str(binary), "--store", str(tmp_path / "s2"))
    assert code == EXIT_MISSING_INPUT
    assert_one_line_error(err, "blob.dat")


def test_version_prints_the_installed_version(run_cli):
    from importlib.metadata import version

    code, out, _ = run_cli("--version")
    assert (code, out) == (0, f"dsarag {version('dsarag')}\n")


def test_models_list_shows_whole_names_in_80_columns(run_cli):
    code, out, _ = run_cli("models", "list")  # the test console is 80 columns wide
    assert code == 0
    assert "qwen2.5-coder-0.5b-instruct" in out and "smollm2-135m-instruct" in out and "…" not in out


def test_empty_question_exits_2(small_docs, tmp_path, run_cli):
    code, _, err = run_cli("ask", "   ", "--docs", str(small_docs), "--store", str(tmp_path / "store"))
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(err, "empty question")
    assert not (tmp_path / "store").exists()


def test_unreadable_file_is_listed_exit_6_and_the_rest_is_committed(small_docs, tmp_path, run_cli):
    (small_docs / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    store = tmp_path / "store"
    code, out, err = run_cli("ingest", str(small_docs), "--store", str(store), "--json")
    assert code == EXIT_PARTIAL_INGEST
    report = json.loads(out)
    assert [item["path"] for item in report["failed"]] == ["broken.pdf"]
    assert report["failed"][0]["reason"].startswith("broken PDF (")  # the path is said once, in "path"
    assert report["added"] == 2 and report["committed"]


def test_corrupt_store_exits_4_and_is_left_as_it_was(small_docs, tmp_path, run_cli):
    store = tmp_path / "store"
    assert run_cli("ingest", str(small_docs), "--store", str(store))[0] == 0
    parquet = next(store.glob("chunks-*.parquet"))
    parquet.write_bytes(parquet.read_bytes()[:-200])
    before = snapshot(store)
    code, _, err = run_cli("ask", "When is lunch?", "--store", str(store), "--model", "tiny")
    assert code == EXIT_STORE
    assert_one_line_error(err, parquet.name)
    (small_docs / "new.md").write_text("A new note.\n")
    code, _, err = run_cli("ingest", str(small_docs), "--store", str(store))
    assert code == EXIT_STORE
    assert snapshot(store) == before


def test_store_of_another_embedder_exits_4(small_docs, tmp_path, run_cli):
    store = tmp_path / "store"
    assert run_cli("ingest", str(small_docs), "--store", str(store))[0] == 0
    chunk_store = ChunkStore(store)  # a store written by another embedder (a valid manifest)
    manifest = chunk_store.read_manifest()
    manifest.embedding_model = "e5-large"
    chunk_store.write_manifest(manifest)
    before = snapshot(store)
    (small_docs / "new.md").write_text("A new note.\n")
    code, _, err = run_cli("ingest", str(small_docs), "--store", str(store))
    assert code == EXIT_STORE
    assert_one_line_error(err, "e5-large", str(store))
    assert snapshot(store) == before


@pytest.mark.slow
def test_ask_json_with_the_tiny_model_cites_sources_and_reports_timings(small_docs, tmp_path, run_cli):
    code, out, _ = run_cli(
        "ask", "When does the kitchen serve lunch?", "--docs", str(small_docs), "--store", str(tmp_path / "store"),
        "--model", "tiny", "--max-new-tokens", "16", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["answer"]
    assert result["sources"][0]["citation"].startswith("kitchen.md:")
    assert result["attention"] == "dense" and result["attention_dense_tail"] == 0
    assert result["cost"]["dense_tail"] == 32  # after a dense run the meter's sparse side is what auto runs
    assert {"retrieve_s", "prefill_s", "decode_s", "load_model_s"} <= set(result["timings"])
    assert result["tokens"]["generated"] <= 16
