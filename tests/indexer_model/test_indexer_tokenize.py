"""`dsarag indexer tokenize`: a text folder's ids, as `train --data` reads the folder, for a GGUF-only machine."""

import hashlib
import json

import numpy as np

from dsarag.indexer_model.token_ids import load_token_stream, tokenizer_encode


def write_docs(folder):
    (folder / "part-b").mkdir(parents=True)
    (folder / "part-a.rst").write_text("Lightning indexers pick the keys each query reads.\n")
    (folder / "part-b" / "notes.md").write_text("# Notes\nSparse attention keeps the top-k tokens.\n")
    (folder / "part-b" / "image.png").write_bytes(b"\x89PNG not text")
    return folder


def test_tokenize_saves_the_ids_train_reads_from_the_folder(tmp_path, run_cli):
    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "ids" / "train.npy"
    code, stdout, err = run_cli(
        "indexer", "tokenize", str(docs), "--out", str(out), "--model", "tiny", "--json"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    from_folder = load_token_stream(docs, tokenizer_encode("tiny"))
    saved = np.load(out)
    assert saved.dtype == np.int32 and np.array_equal(saved, from_folder)
    assert np.array_equal(load_token_stream(out), from_folder)  # what `train --data ids.npy` reads
    expected_text = "\n\n".join(
        [(docs / "part-a.rst").read_text(), (docs / "part-b" / "notes.md").read_text()]
    )  # path order, blank-line joined; the .png is skipped
    assert from_folder.tolist() == tokenizer_encode("tiny")(expected_text)
    assert summary == {
        "folder": str(docs),
        "files": 2,
        "tokens": len(from_folder),
        "out": str(out),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    assert [p.name for p in out.parent.iterdir()] == ["train.npy"]  # no temp file left beside it


def test_tokenize_refuses_bad_input_with_its_exit_code_and_writes_nothing(tmp_path, run_cli):
    docs = write_docs(tmp_path / "docs")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "ids.npy"
    tiny = ["--model", "tiny"]
    cases = [
        ([str(tmp_path / "missing"), "--out", str(out), *tiny], 3, "not a folder"),
        ([str(empty), "--out", str(out), *tiny], 3, "no .txt, .rst or .md files"),
        ([str(docs), "--out", str(tmp_path / "ids.bin"), *tiny], 2, "saved as .npy"),
        (
            [str(docs), "--out", str(out), "--model", str(tmp_path / "model.gguf")],
            2,
            "needs the model's tokenizer",
        ),
    ]
    for args, exit_code, message in cases:
        code, _, err = run_cli("indexer", "tokenize", *args)
        assert code == exit_code and message in " ".join(err.split()), (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "empty"]


def test_training_on_a_missing_data_path_exits_with_the_missing_input_code(tmp_path, run_cli):
    args = ["--model", "tiny", "--data", str(tmp_path / "nowhere.npy"), "--out", str(tmp_path / "out")]
    code, _, err = run_cli("indexer", "train", *args, "--steps", "1", "--device", "cpu")
    assert code == 3 and "nowhere.npy: not found" in " ".join(err.split())
    assert not (tmp_path / "out").exists()
