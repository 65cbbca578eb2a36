"""`dsarag indexer train` options for long windows (a random subset of query rows, mixed lengths, a subset of
layers, grown heads and dims) and `dsarag indexer eval`."""

import copy
import json

import numpy as np
import pytest
import torch

from dsarag.base.errors import BadInputError
from dsarag.indexer_model.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.train import (
    TrainConfig,
    _query_rows,
    attention_mass_recall,
    checkpoint_config,
    grow_dims,
    grow_heads,
    load_frozen_model,
    make_indexers,
    train_indexers,
)
from dsarag.kernels.torch_dsa import index_scores


def test_query_rows_are_a_sorted_random_subset_and_zero_means_all():
    rng = np.random.default_rng(0)
    rows = _query_rows(rng, 1000, 64, torch.device("cpu"))
    assert len(rows) == 64 and len(set(rows.tolist())) == 64
    assert torch.equal(rows, rows.sort().values) and rows.max() < 1000
    assert rows.max() > 500  # drawn over the whole window, so long distances take part
    every = _query_rows(rng, 100, 0, torch.device("cpu"))
    assert torch.equal(every, torch.arange(100))


def test_training_some_layers_on_some_rows_leaves_the_other_layers_untouched():
    model = load_frozen_model("tiny", "cpu")
    tokens = np.random.default_rng(0).integers(100, 20000, size=2000)
    config = TrainConfig(seq_lens=(256,), steps=2, query_rows=48, layers=(1,), warmup_steps=1)
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


def runs_with_weight_zero_and_one(weight_option: str, **config) -> dict[float, tuple]:
    """Layer 1 of the tiny model trained once with `weight_option` at 0 and once at 1, from the same indexers and
    windows: (indexers, loss curve) per weight."""
    model = load_frozen_model("tiny", "cpu")
    tokens = np.random.default_rng(0).integers(100, 20000, size=2000)
    torch.manual_seed(0)
    start = make_indexers(model, TrainConfig())
    return {
        weight: train_indexers(
            model,
            tokens,
            TrainConfig(seq_lens=(256,), layers=(1,), **config, **{weight_option: weight}),
            log=lambda _: None,
            init=copy.deepcopy(start),
        )
        for weight in (0.0, 1.0)
    }


def test_the_sparse_stage_follows_the_dense_steps_and_its_dense_weight_adds_to_the_loss():
    runs = runs_with_weight_zero_and_one("sparse_dense_weight", steps=1, sparse_steps=1, topk=128)
    curves = {weight: curve for weight, (_, curve) in runs.items()}
    assert [step["sparse"] for step in curves[0.0]] == [False, True]
    # Same windows and weights up to the sparse step: its loss gains the dense KL, a positive amount.
    assert curves[1.0][0]["loss"] == curves[0.0][0]["loss"]
    assert curves[1.0][1]["loss"] > curves[0.0][1]["loss"] + 1e-4


def test_the_boundary_weight_adds_its_term_to_the_training_loss_and_its_gradient():
    runs = runs_with_weight_zero_and_one("boundary_weight", steps=1, boundary_topks=(96, 128))
    # Same window and starting weights: only the boundary term tells the two runs apart.
    assert runs[1.0][1][0]["loss"] != runs[0.0][1][0]["loss"]
    moved = [
        not torch.equal(a, b)
        for a, b in zip(runs[0.0][0][1].parameters(), runs[1.0][0][1].parameters(), strict=True)
    ]
    assert any(moved)


def test_grown_heads_keep_the_scores_then_learn_and_a_checkpoint_keeps_per_layer_heads(tmp_path):
    model = load_frozen_model("tiny", "cpu")
    torch.manual_seed(0)
    start = make_indexers(model, TrainConfig())
    grown = grow_heads(start, [0], 8)
    assert [indexer.n_heads for indexer in grown] == [8] + [4] * (len(start) - 1)
    assert grown[1] is start[1]
    hidden, positions = torch.randn(1, 64, model.args.dim), torch.arange(64)
    before, after = start[0].project(hidden, positions), grown[0].project(hidden, positions)
    torch.testing.assert_close(
        index_scores(*after, positions, positions),
        index_scores(*before, positions, positions),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(BadInputError, match="--index-heads 2"):
        grow_heads(start, [0], 2)

    tokens = np.random.default_rng(0).integers(100, 20000, size=2000)
    config = TrainConfig(seq_lens=(256,), steps=2, layers=(0,), index_heads=8, warmup_steps=1)
    trained, _ = train_indexers(model, tokens, config, log=lambda _: None, init=grown)
    new_weights = trained[0].weights_proj.weight.view(8, -1)[4:]
    assert new_weights.abs().sum() > 0  # the zero-started heads take part in training

    save_checkpoint(tmp_path, trained, checkpoint_config(model, trained, config, {}), {})
    recorded = json.loads((tmp_path / "config.json").read_text())["indexer"]
    assert recorded["n_heads"] == 4 and recorded["layer_heads"] == {"0": 8}
    loaded = load_checkpoint(tmp_path, model.args.dim, model.args.n_layer)
    assert [indexer.n_heads for indexer in loaded] == [8] + [4] * (len(start) - 1)
    torch.testing.assert_close(
        loaded[0].weights_proj.weight, trained[0].weights_proj.weight.to(torch.bfloat16).float()
    )


@pytest.mark.slow
def test_widened_index_dims_keep_scores_and_logits_then_learn_and_a_checkpoint_keeps_per_layer_dims(tmp_path):
    model = load_frozen_model("tiny", "cpu")
    trained = load_checkpoint(find_checkpoint(weights_fingerprint(model)), model.args.dim, model.args.n_layer)
    wide = grow_dims(copy.deepcopy(trained), [0], 128)
    assert (wide[0].head_dim, wide[0].rope_dims) == (128, 64)
    assert [indexer.head_dim for indexer in wide[1:]] == [64] * (model.args.n_layer - 1)
    # 64 rotated dims: the 16 frequencies the 32 rotated dims had, and one more between each two of them.
    hidden, positions = torch.randn(1, 96, model.args.dim), torch.arange(96) + 5000
    before, after = trained[0].project(hidden, positions), wide[0].project(hidden, positions)
    scores_before = index_scores(*before, positions, positions)
    scores_after = index_scores(*after, positions, positions)
    causal = torch.isfinite(scores_before)
    torch.testing.assert_close(scores_after[causal], scores_before[causal], atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.isfinite(scores_after), causal)
    with pytest.raises(BadInputError, match="--index-dim 96"):
        grow_dims(trained, [0], 96)

    # The whole model selects the same keys through the wider layer, so its sparse logits are unchanged. In
    # fp32: bf16 rounding differs between CPU kernels (AMX or not) and flips near ties in the ranking.
    prompt = torch.from_numpy(np.random.default_rng(0).integers(100, 20000, size=300))[None]
    full_precision, dsa, logits = copy.deepcopy(model).float(), DSAConfig(topk=96, dense_threshold=0), []
    for indexers in (trained, wide):
        full_precision.attach_indexers(copy.deepcopy(indexers))
        full_precision.setup_caches(1, 300)
        with torch.inference_mode():
            logits.append(full_precision(prompt, torch.arange(300), dsa=dsa))
        full_precision.clear_caches()
    torch.testing.assert_close(logits[1], logits[0], atol=0.05, rtol=0.0)

    tokens = np.random.default_rng(0).integers(100, 20000, size=2000)
    config = TrainConfig(seq_lens=(256,), steps=2, layers=(0,), index_dim=128, warmup_steps=1)
    learned, _ = train_indexers(model, tokens, config, log=lambda _: None, init=wide)
    new_dims = learned[0].wq.weight.view(learned[0].n_heads, 128, -1)[:, 1::2]
    assert new_dims.abs().sum() > 0  # the frequencies the narrow indexer lacked take part in training
    save_checkpoint(tmp_path, learned, checkpoint_config(model, learned, config, {}), {})
    recorded = json.loads((tmp_path / "config.json").read_text())["indexer"]
    assert recorded["head_dim"] == 64 and recorded["layer_dims"] == {"0": 128}
    loaded = load_checkpoint(tmp_path, model.args.dim, model.args.n_layer)
    assert [indexer.head_dim for indexer in loaded] == [128] + [64] * (model.args.n_layer - 1)


def test_mixed_window_lengths_are_each_drawn_and_recorded_in_the_loss_curve():
    model = load_frozen_model("tiny", "cpu")
    tokens = np.random.default_rng(0).integers(100, 20000, size=2000)
    config = TrainConfig(seq_lens=(128, 256), steps=8, query_rows=32, layers=(1,), warmup_steps=1)
    _, curve = train_indexers(model, tokens, config, log=lambda _: None, init=make_indexers(model, config))
    assert {step["seq_len"] for step in curve} == {128, 256}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seq-len", "256", "--layers", "0"], "--init-from"),
        (["--seq-len", "256,2000"], "--seq-len 256,2000"),
        (
            ["--seq-len", "256", "--boundary-weight", "1", "--boundary-topks", "64,512"],
            "--boundary-topks 64,512",
        ),
    ],
)
def test_bad_training_options_are_refused_before_anything_is_written(tmp_path, run_cli, extra, message):
    np.save(tmp_path / "train.npy", np.arange(100, 1100))
    args = ["--model", "tiny", "--data", str(tmp_path / "train.npy"), "--out", str(tmp_path / "out")]
    code, _, err = run_cli("indexer", "train", *args, *extra, "--device", "cpu")
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
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
