"""The oracle selection that bounds what a perfect indexer could keep (indexer_model/oracle.py)."""

from dataclasses import replace

import pytest
import torch

from dsarag.indexer_model.dsa import DSAConfig, dense_attention, dsa_attention
from dsarag.indexer_model.indexer import LightningIndexer
from dsarag.indexer_model.model import Transformer
from dsarag.indexer_model.oracle import oracle_selection, oracle_topk
from dsarag.kernels.backend import TORCH
from dsarag.kernels.torch_dsa import masked_dense_attention_reference


def naive_oracle(q, k, t, topk, n_sink, window):
    """Query t's oracle set by a plain loop: forced keys, then the past keys of most head-summed attention."""
    group = q.shape[1] // k.shape[1]
    keys = k[0].repeat_interleave(group, dim=0)[:, : t + 1]
    scores = q[0, :, t, None] @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5  # (heads, 1, t + 1)
    mass = scores.softmax(dim=-1).sum(dim=0)[0]
    if t + 1 <= topk:
        return set(range(t + 1))
    forced = {s for s in range(t + 1) if s < n_sink or s > t - window}
    rest = sorted((s for s in range(t + 1) if s not in forced), key=lambda s: -float(mass[s]))
    return forced | set(rest[: topk - len(forced)])


def test_oracle_topk_is_the_forced_keys_plus_the_most_attended_past_keys():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    indices = oracle_topk(q, k, torch.arange(40), topk=12, n_sink=2, window=4, block=16)
    for t in range(40):
        chosen = {int(i) for i in indices[0, t] if i >= 0}
        assert chosen == naive_oracle(q, k, t, 12, 2, 4)
        assert len(chosen) == min(t + 1, 12)  # every slot used once a query sees k keys; -1 before


def test_a_custom_selection_replaces_the_indexer_and_falls_back_to_dense_when_short():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    positions, cfg = torch.arange(64), DSAConfig(topk=20, n_sink=2, window=4, dense_threshold=0)
    no_indexer = (None, None, None)
    oracle = replace(TORCH, selection=oracle_topk)
    out = dsa_attention(q, k, v, *no_indexer, positions, 64, cfg, oracle)
    indices = oracle_topk(q, k, positions, 20, 2, 4)
    reference = masked_dense_attention_reference(q, k, v, indices, 16**-0.5)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    dense = dense_attention(q, k, v, positions)
    assert (out - dense).abs().max() > 1e-3  # a real selection: later queries skip keys
    short = dsa_attention(q, k, v, *no_indexer, positions, 64, DSAConfig(topk=64, dense_threshold=0), oracle)
    torch.testing.assert_close(short, dense)


@torch.inference_mode()
def test_oracle_selection_switches_the_model_and_restores_it(small_model_args):
    torch.manual_seed(2)
    model = Transformer(small_model_args).eval()
    model.attach_indexers(
        torch.nn.ModuleList(
            LightningIndexer(small_model_args.dim, small_model_args.rope_base) for _ in range(2)
        )
    )
    prompt = torch.randint(0, small_model_args.vocab_size, (1, 200))
    dsa = DSAConfig(topk=80, dense_threshold=0)

    def logits():
        model.setup_caches(1, 200)
        return model(prompt, torch.arange(200), last_logits_only=False, dsa=dsa)

    trained, dense = logits(), model(prompt, torch.arange(200), last_logits_only=False)
    kernels = model.attention_backend()
    with oracle_selection(model):
        assert model.layers[0].attention.backend.selection is oracle_topk
        oracle = logits()
    assert model.backend is kernels and model.layers[1].attention.backend is kernels
    # The untrained indexer picks near-random keys; the oracle keeps the keys dense attention weighs most.
    assert (oracle - dense).abs().mean() < (trained - dense).abs().mean()
    with pytest.raises(RuntimeError), oracle_selection(model):
        raise RuntimeError("a failing measurement")
    assert model.backend is kernels
