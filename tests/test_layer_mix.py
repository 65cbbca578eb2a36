"""Layer-by-layer mixes of two indexer checkpoints, scored by the model's loss (benchmarks/layer_mix.py)."""

import numpy as np
import torch

from benchmarks.layer_mix import mean_nll, mixed
from indexer_model.indexer import LightningIndexer
from indexer_model.model import Transformer


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
