"""Per-layer top-k: the allocation, the model applying a checkpoint's scales, and `dsarag indexer budget`."""

import json
import shutil

import numpy as np
import pytest
import torch

from dsarag.indexer_model import model as model_module
from dsarag.indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.generate import generate, load_generator
from dsarag.indexer_model.layer_budget import allocate_topk_scales, budget_recall


def test_keys_move_to_the_layers_that_gain_most_and_the_total_stays():
    recall = {  # layer 0 gains much from more keys, layers 2 and 3 lose little with fewer
        256: [0.50, 0.80, 0.94, 0.95],
        512: [0.60, 0.85, 0.95, 0.96],
        1024: [0.80, 0.88, 0.96, 0.97],
    }
    scales = allocate_topk_scales(recall, 512)
    assert scales == (2.0, 1.0, 0.5, 0.5)
    assert sum(scales) == len(scales)
    assert budget_recall(recall, 512, scales) > budget_recall(recall, 512, [1.0] * 4)
    flat = {k: [0.9] * 4 for k in (256, 512, 1024)}  # nothing to gain: stay uniform
    assert allocate_topk_scales(flat, 512) == (1.0,) * 4
    with pytest.raises(ValueError, match="k = 1024"):
        allocate_topk_scales({256: [0.5], 512: [0.6]}, 512)


@pytest.mark.slow
def test_the_model_gives_each_layer_its_share_of_k_unless_told_not_to(monkeypatch):
    tiny = load_generator("tiny")
    model = tiny.model
    seen = []
    real = model_module.dsa_attention

    def recording(*args):  # args: the layer's q, caches, index inputs, positions, n_keys, cfg, backend
        seen.append(args[8].topk)
        return real(*args)

    monkeypatch.setattr(model_module, "dsa_attention", recording)
    scales = [2.0, 0.5] + [1.0] * (model.args.n_layer - 2)
    for layer, scale in zip(model.layers, scales, strict=True):
        layer.attention.indexer.topk_scale = scale
    try:
        prompt = torch.arange(100, 400)[None]
        with torch.inference_mode():
            model.setup_caches(1, 300)
            model(prompt, torch.arange(300), dsa=DSAConfig(topk=128, dense_threshold=0))
            assert seen[:3] == [256, 68, 128]  # 0.5 x 128 = 64 is raised to the sinks + window (68)
            seen.clear()
            model(prompt, torch.arange(300), dsa=DSAConfig(topk=128, dense_threshold=0, per_layer_topk=False))
            assert set(seen) == {128}
        result = generate(
            model,
            list(range(100, 400)),
            2,
            tiny.tokenizer.decode,
            set(),
            dsa=DSAConfig(topk=128, dense_threshold=0),
        )
        assert result.topk == 128 and result.layer_topk[:3] == [256, 68, 128]
    finally:
        for layer in model.layers:
            layer.attention.indexer.topk_scale = 1.0
        model.clear_caches()


@pytest.mark.slow
def test_indexer_budget_records_scales_that_a_loaded_checkpoint_applies(tmp_path, run_cli):
    tiny = load_generator("tiny")
    shipped = find_checkpoint(weights_fingerprint(tiny.model))
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(shipped, checkpoint)
    np.save(tmp_path / "text.npy", np.random.default_rng(2).integers(100, 20000, size=1200))
    code, out, err = run_cli(
        "indexer", "budget", "--model", "tiny", "--checkpoint", str(checkpoint),
        "--eval-data", str(tmp_path / "text.npy"), "--topk", "256", "--length", "1024", "--windows", "1",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    scales = result["layer_topk_scales"]
    assert len(scales) == tiny.model.args.n_layer and sum(scales) == len(scales)
    assert result["mean_recall_scaled"] >= result["mean_recall_uniform"]
    assert json.loads((checkpoint / "config.json").read_text())["layer_topk_scales"] == scales
    assert json.loads((checkpoint / "metrics.json").read_text())["topk_budget"]["topk"] == 256
    loaded = load_checkpoint(checkpoint, tiny.model.args.dim, tiny.model.args.n_layer)
    assert [indexer.topk_scale for indexer in loaded] == scales
    assert "layer_topk_scales" not in json.loads((shipped / "config.json").read_text())
