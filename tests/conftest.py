"""Shared fixtures: the embedded models come from the user cache (`make test` runs `dsarag models pull`)."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in its interpreter on machines without a GPU; the flag must be set before the first
# kernel is defined, so here, before any test module imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.needs_compiler`: the compiled CPU kernels must build here (a C++ compiler);
    `@pytest.mark.needs_amx`: and this CPU runs their AMX kernels (AMX and AVX512-BF16);
    `@pytest.mark.needs_avx512_bf16`: and their bf16 kernels without AMX (AVX512-BF16)."""
    markers = ("needs_compiler", "needs_amx", "needs_avx512_bf16")
    if any(item.get_closest_marker(marker) for marker in markers):
        from dsarag.kernels.cpu_dsa import amx_ready, avx512_bf16_ready, native_library

        if native_library() is None:
            pytest.skip(
                "the compiled CPU kernels cannot be built here (no C++ compiler, or its build failed)"
            )
        if item.get_closest_marker("needs_amx") and not amx_ready():
            pytest.skip("this CPU has no AMX: the AMX kernels are not built here")
        if item.get_closest_marker("needs_avx512_bf16") and not avx512_bf16_ready():
            pytest.skip("this CPU has no AVX512-BF16: the bf16 CPU kernels are not built here")


@pytest.fixture
def small_model_args():
    """A 2-layer Qwen2-shaped model (GQA, qkv bias) for tests that need the model's maths, not trained weights."""
    from dsarag.indexer_model.model import ModelArgs

    return ModelArgs(
        model_type="qwen2", vocab_size=256, dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16,
        intermediate_size=128, rope_base=1e4, norm_eps=1e-6, max_seq_len=512, qkv_bias=True, tie_embeddings=False,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def isolated_data_home(tmp_path_factory, monkeypatch):
    """Default stores go to a temporary folder, never into the user's data dir."""
    monkeypatch.setenv("DSARAG_HOME", str(tmp_path_factory.mktemp("dsarag-home")))


@pytest.fixture(scope="session")
def embedder():
    from dsarag.rag.embed import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def embedder_tokenizer_json(embedder) -> Path:
    """tokenizer.json of the embedded embedder (all-MiniLM-L6-v2)."""
    return embedder.tokenizer_json


@pytest.fixture
def small_docs(tmp_path: Path) -> Path:
    """Two short documents (a kitchen note and a bike-workshop note) in a fresh folder."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "kitchen.md").write_text(
        "# Kitchen\n\nThe community kitchen serves lunch at noon on weekdays.\n"
    )
    (folder / "bikes.txt").write_text("The bike workshop lends tools for a deposit of 20 euros.\n")
    return folder


@pytest.fixture
def run_cli(capsys):
    """Run `dsarag ARGS…` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        from dsarag.cli.app import main

        saved_argv = sys.argv
        sys.argv = ["dsarag", *args]
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = saved_argv
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
