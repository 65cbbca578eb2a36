"""Mass and attention-output error of indexer selections, per layer and head (indexer_model/quality.py)."""

import numpy as np
import pytest
import torch

from dsarag.indexer_model.indexer import LightningIndexer
from dsarag.indexer_model.model import Transformer
from dsarag.indexer_model.quality import hidden_state_drift, mass_and_output_error


def test_a_set_holding_every_key_keeps_all_mass_and_a_smaller_one_loses_some(small_model_args):
    torch.manual_seed(0)
    model = Transformer(small_model_args).eval()
    indexers = torch.nn.ModuleList(LightningIndexer(64, 1e4, 2, 16) for _ in range(small_model_args.n_layer))
    tokens = np.random.default_rng(0).integers(0, 256, size=200)
    every = mass_and_output_error(model, {"a": indexers}, tokens, topk=256, rows=32)["a"]
    np.testing.assert_allclose(every["mass"], 1.0, atol=1e-5)
    np.testing.assert_allclose(every["error"], 0.0, atol=1e-4)
    few = mass_and_output_error(model, {"a": indexers}, tokens, topk=80, rows=32)["a"]
    assert np.array(few["mass"]).shape == (small_model_args.n_layer, small_model_args.n_head)
    assert np.all(np.array(few["mass"]) < 1.0) and np.all(np.array(few["error"]) > 0.0)


def test_hidden_states_drift_from_dense_only_when_the_set_leaves_keys_out(small_model_args):
    torch.manual_seed(0)
    model = Transformer(small_model_args).eval()
    indexers = torch.nn.ModuleList(LightningIndexer(64, 1e4, 2, 16) for _ in range(small_model_args.n_layer))
    tokens = np.random.default_rng(0).integers(0, 256, size=201)
    every = hidden_state_drift(model, {"a": indexers}, tokens, topk=256, rows=32)
    np.testing.assert_allclose(every["a"]["drift"], 0.0, atol=1e-4)
    assert every["a"]["nll"] == pytest.approx(every["dense"]["nll"], abs=1e-3)
    few = hidden_state_drift(model, {"a": indexers}, tokens, topk=80, rows=32)
    assert len(few["a"]["drift"]) == small_model_args.n_layer and min(few["a"]["drift"]) > 1e-3
