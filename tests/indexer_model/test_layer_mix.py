"""Layer-by-layer mixes of two indexer checkpoints, scored by the model's loss (indexer_model/layer_mix.py)."""

import numpy as np
import torch

from dsarag.indexer_model.indexer import LightningIndexer
from dsarag.indexer_model.layer_mix import coordinate_descent, mean_nll, mixed
from dsarag.indexer_model.model import Transformer


def test_a_mix_scores_as_the_checkpoint_each_of_its_layers_comes_from(small_model_args):
    torch.manual_seed(0)
    model = Transformer(small_model_args).eval()
    base, other = (
        torch.nn.ModuleList(LightningIndexer(64, 1e4, 2, 16) for _ in range(small_model_args.n_layer))
        for _ in range(2)
    )
    windows = [np.random.default_rng(0).integers(0, 256, size=301)]

    def nll(indexers):
        return mean_nll(model, indexers, windows, scored=64, topk=80)

    assert mixed(base, other, {1})[1] is other[1] and mixed(base, other, {1})[0] is base[0]
    assert nll(mixed(base, other, set())) == nll(base)
    assert nll(mixed(base, other, {0, 1})) == nll(other)
    one = nll(mixed(base, other, {1}))
    assert one not in (nll(base), nll(other))  # a selection of 80 of up to 300 keys: layer 1's indexer counts
    assert mean_nll(model, None, windows, scored=64, topk=None) != nll(base)  # no indexers: dense attention


def test_descent_takes_each_layers_best_source_and_skips_layers_it_has_already_scored():
    layers = [[LightningIndexer(64, 1e4, 2, 16) for _ in range(3)] for _ in range(3)]  # [source][layer]
    layers[2][1] = layers[0][
        1
    ]  # source 2 shares layer 1 with source 0, as a mix shares layers with its parents
    sources = [torch.nn.ModuleList(row) for row in layers]
    cost = [[3.0, 1.0, 2.0], [1.0, 2.0, 0.5], [2.0, 2.0, 0.0]]  # cost[layer][source], separable
    scored = []

    def score(choice):
        scored.append(choice)
        return sum(cost[layer][source] for layer, source in enumerate(choice))

    choice, history = coordinate_descent(sources, score, sweeps=3, out_of_time=lambda: False)
    assert choice == [1, 0, 2]
    assert history[-1]["sweep"] == 2 and not any(step["kept"] for step in history if step["sweep"] == 2)
    assert all(trial[1] != 2 for trial in scored)  # layer 1 of source 2 is source 0's: never scored
    assert len(scored) == 1 + 2 * (2 + 1 + 2)  # the start, then two sweeps of the distinct alternatives


def test_descent_stops_once_out_of_time():
    sources = [torch.nn.ModuleList(LightningIndexer(64, 1e4, 2, 16) for _ in range(2)) for _ in range(2)]
    choice, history = coordinate_descent(
        sources, lambda choice: -sum(choice), sweeps=5, out_of_time=lambda: True
    )
    assert choice == [0, 0] and len(history) == 1
