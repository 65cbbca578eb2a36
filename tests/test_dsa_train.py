"""`dsarag indexer train` options for long windows (a random subset of query rows, a subset of layers) and
`dsarag indexer eval`."""

import copy
import json

import numpy as np
import pytest
import torch

from indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint
from indexer_model.train import (
    TrainConfig,
    _query_rows,
    attention_mass_recall,
    load_frozen_model,
    make_indexers,
    train_indexers,
)


def test_query_rows_are_a_sorted_random_subset_and_zero_means_all():
    rng = np.random.default_rng(0)
    rows = _query_rows(rng, TrainConfig(seq_len=1000, query_rows=64), torch.device("cpu"))
    assert len(rows) == 64 and len(set(rows.tolist())) == 64
    assert torch.equal(rows, rows.sort().values) and rows.max() < 1000
    assert rows.max() > 500  # drawn over the whole window, so long distances take part
    every = _query_rows(rng, TrainConfig(seq_len=100, query_rows=0), torch.device("cpu"))
    assert torch.equal(every, torch.arange(100))


def test_training_some_layers_on_some_rows_leaves_the_other_layers_untouched():
    model = load_frozen_model("tiny", "cpu")
    tokens = np.random.default_rng(0).integers(100, 20000, size=2000)
    config = TrainConfig(seq_len=256, steps=2, query_rows=48, layers=(1,), warmup_steps=1)
    torch.manual_seed(0)
    start = make_indexers(model, config)
    trained, curve = train_indexers(model, tokens, config, log=lambda _: None, init=copy.deepcopy(start))
    assert len(curve) == 2 and all(np.isfinite(step["loss"]) for step in curve)
    for layer, (before, after) in enumerate(zip(start, trained, strict=True)):
        same = all(
            torch.equal(a, b)
            for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True)
        )
        assert same == (layer != 1), layer


def test_layers_without_a_checkpoint_to_keep_the_others_is_refused(tmp_path, run_cli):
    np.save(tmp_path / "train.npy", np.arange(100, 1100))
    args = ["--model", "tiny", "--data", str(tmp_path / "train.npy"), "--out", str(tmp_path / "out")]
    code, _, err = run_cli("indexer", "train", *args, "--seq-len", "256", "--layers", "0", "--device", "cpu")
    assert code == 2 and "--init-from" in err
    assert not (tmp_path / "out").exists()


def test_indexer_eval_of_some_layers_matches_the_full_recall_and_refuses_bad_lengths(tmp_path, run_cli):
    tokens = np.random.default_rng(1).integers(100, 20000, size=1500)
    np.save(tmp_path / "heldout.npy", tokens)
    args = [
        "indexer",
        "eval",
        "--model",
        "tiny",
        "--eval-data",
        str(tmp_path / "heldout.npy"),
        "--device",
        "cpu",
    ]
    code, out, err = run_cli(
        *args, "--lengths", "512", "--ks", "128", "--windows", "1", "--layers", "1", "--json"
    )
    assert code == 0, err
    result = json.loads(out)["recall"][0]
    assert result["layers"] == [1] and result["windows"] == [0]
    model = load_frozen_model("tiny", "cpu")
    indexers = load_checkpoint(
        find_checkpoint(weights_fingerprint(model)), model.args.dim, model.args.n_layer
    )
    full = attention_mass_recall(model, indexers, tokens[:512], ks=(128,))
    assert result["indexer"]["128"][0] == pytest.approx(full["indexer"]["128"][1], abs=1e-4)
    assert result["indexer"]["128"][0] <= result["oracle"]["128"][0] + 1e-6
    code, _, err = run_cli(*args, "--lengths", "4096")
    assert code == 2 and "--lengths 4096" in err
