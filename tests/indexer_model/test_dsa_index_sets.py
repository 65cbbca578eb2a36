"""One index set per group of kv heads (the DSA option beside one set shared by every head)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsarag.base.errors import BadInputError
from dsarag.indexer_model.checkpoint import load_checkpoint
from dsarag.indexer_model.distill import blockwise_indexer_kl_loss, dense_attention_target
from dsarag.indexer_model.dsa import DSAConfig, dsa_attention
from dsarag.indexer_model.indexer import LightningIndexer, select_topk_sets
from dsarag.indexer_model.train import attention_mass_recall, load_frozen_model, widen_to_sets
from dsarag.kernels.sparse_attention import sparse_attention_decode, sparse_attention_prefill
from dsarag.kernels.torch_dsa import masked_dense_attention_reference, sparse_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, KV_HEADS, DIM = 6, 2, 16


def qkv(n_queries: int, n_keys: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, HEADS, n_queries, DIM, generator=gen),
        torch.randn(2, KV_HEADS, n_keys, DIM, generator=gen),
        torch.randn(2, KV_HEADS, n_keys, DIM, generator=gen),
    )


def random_sets(n_queries: int, n_keys: int, topk: int, seed: int = 1) -> torch.Tensor:
    """(2, KV_HEADS, T, k): distinct keys per query and set, with a few -1 slots."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(2, KV_HEADS, n_queries, n_keys, generator=gen).argsort(dim=-1)[..., :topk]
    keys[..., 0, topk // 2 :] = -1
    return keys


def test_indexer_with_sets_projects_one_weight_set_per_group_and_records_it():
    indexer = LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8, index_sets=2)
    x = torch.randn(1, 10, 16)
    q, w, k = indexer.project(x, torch.arange(10))
    assert q.shape == (1, 10, 2, 8) and w.shape == (1, 10, 2, 2) and k.shape == (1, 10, 8)
    assert indexer(x, torch.arange(10)).shape == (1, 2, 10, 10)
    assert indexer.config()["index_sets"] == 2
    before_sets = {key: value for key, value in indexer.config().items() if key != "index_sets"}
    LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8).check_config(before_sets)  # one set
    with pytest.raises(ValueError, match="index_sets"):
        indexer.check_config(before_sets)


def test_each_kv_group_attends_to_its_own_set():
    q, k, v = qkv(n_queries=7, n_keys=30)
    sets = random_sets(7, 30, topk=9)
    out = sparse_attention(q, k, v, sets, scale=0.25, block=4)
    torch.testing.assert_close(
        out, masked_dense_attention_reference(q, k, v, sets, 0.25), rtol=1e-5, atol=1e-5
    )
    group = HEADS // KV_HEADS
    for kv_head in range(KV_HEADS):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        alone = sparse_attention(
            q[:, heads], k[:, kv_head, None], v[:, kv_head, None], sets[:, kv_head], 0.25
        )
        torch.testing.assert_close(out[:, heads], alone)


def test_identical_sets_give_the_shared_selection():
    q, k, v = qkv(n_queries=5, n_keys=20)
    shared = random_sets(5, 20, topk=6)[:, 0]
    both = torch.stack((shared, shared), dim=1)
    torch.testing.assert_close(sparse_attention(q, k, v, both, 0.25), sparse_attention(q, k, v, shared, 0.25))


@pytest.mark.parametrize("n_queries", [6, 1])
def test_triton_kernels_read_each_groups_set(n_queries):
    q, k, v = (t.to(DEVICE) for t in qkv(n_queries=n_queries, n_keys=40, seed=2))
    sets = random_sets(n_queries, 40, topk=12, seed=3).to(DEVICE, torch.int32)
    kernel = sparse_attention_decode if n_queries == 1 else sparse_attention_prefill
    got = kernel(q, k, v, sets, scale=0.25)
    want = masked_dense_attention_reference(q, k, v, sets.long(), 0.25)
    tolerance = 5e-3 if DEVICE == "cuda" else 1e-4  # TF32 dots on the GPU
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_dsa_attention_with_sets_selects_per_group_and_is_exact_when_k_covers_the_context():
    q, k, v = qkv(n_queries=24, n_keys=24, seed=4)
    indexer = LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8, index_sets=KV_HEADS)
    positions = torch.arange(24)
    idx_q, idx_w, idx_k = indexer.project(torch.randn(2, 24, 16), positions)
    exact = DSAConfig(topk=24, n_sink=1, window=2, dense_threshold=0)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(dsa_attention(q, k, v, idx_q, idx_w, idx_k, positions, 24, exact), want)
    small = DSAConfig(topk=8, n_sink=1, window=2, dense_threshold=0)
    got = dsa_attention(q, k, v, idx_q, idx_w, idx_k, positions, 24, small)
    sets = select_topk_sets(idx_q, idx_w, idx_k, positions, 24, 8, n_sink=1, window=2)
    assert sets.shape == (2, KV_HEADS, 24, 8) and not torch.equal(sets[:, 0], sets[:, 1])
    torch.testing.assert_close(got, masked_dense_attention_reference(q, k, v, sets, DIM**-0.5))


def test_each_set_distils_from_the_heads_of_its_group():
    q, k, _ = qkv(n_queries=16, n_keys=16, seed=5)
    q, k = q[:1], k[:1]
    positions = torch.arange(16)
    per_group = dense_attention_target(q, k, positions, sets=KV_HEADS)
    group = HEADS // KV_HEADS
    for g in range(KV_HEADS):
        alone = dense_attention_target(q[:, g * group : (g + 1) * group], k[:, g, None], positions)
        torch.testing.assert_close(per_group[:, g], alone)
    indexer = LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8, index_sets=KV_HEADS)
    idx_q, idx_w, idx_k = indexer.project(torch.randn(1, 16, 16), positions)
    loss = blockwise_indexer_kl_loss(q, k, positions, idx_q, idx_w, idx_k, block=5)
    separate = [
        blockwise_indexer_kl_loss(
            q[:, g * group : (g + 1) * group], k[:, g, None], positions, idx_q, idx_w[:, :, g], idx_k
        )
        for g in range(KV_HEADS)
    ]
    torch.testing.assert_close(loss, torch.stack(separate).mean())
    loss.backward()
    assert indexer.weights_proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_indexer_train_cli_with_one_set_per_kv_group_on_the_tiny_model(tmp_path, run_cli):
    """A CPU smoke run of `dsarag indexer train`; the checkpoint loads with its sets, each set's recall is
    measured against its own group's attention."""
    tokens = np.random.default_rng(0).integers(100, 20000, size=2000)
    np.save(tmp_path / "train.npy", tokens)
    out = tmp_path / "indexer"
    args = ["--model", "tiny", "--data", str(tmp_path / "train.npy"), "--out", str(out), "--seq-len", "256"]
    code, _, err = run_cli("indexer", "train", *args, "--steps", "2", "--index-sets", "3", "--device", "cpu")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["indexer"]["index_sets"] == 3 and config["training"]["index_sets"] == 3
    indexers = load_checkpoint(out, config["dim"], config["n_layer"])
    assert indexers[0].weights_proj.out_features == 3 * config["indexer"]["n_heads"]
    recall = attention_mass_recall(
        load_frozen_model("tiny", "cpu"), indexers, tokens[:256], ks=(128,), query_rows=32
    )
    assert all(
        0 < got <= want + 1e-6
        for got, want in zip(recall["indexer"]["128"], recall["oracle"]["128"], strict=True)
    )
    code, _, err = run_cli("indexer", "train", *args, "--steps", "1", "--index-sets", "2", "--device", "cpu")
    assert code == 2 and "divide" in err  # the tiny model has 3 kv heads


def test_a_shared_indexer_widens_to_sets_that_start_from_its_selection():
    shared = torch.nn.ModuleList([LightningIndexer(dim=16, rope_base=1e4, n_heads=2, head_dim=8)])
    widened = widen_to_sets(shared, 3)
    x, positions = torch.randn(1, 12, 16), torch.arange(12)
    _, w_shared, _ = shared[0].project(x, positions)
    _, w_sets, _ = widened[0].project(x, positions)
    assert widened[0].index_sets == 3
    for s in range(3):
        torch.testing.assert_close(w_sets[:, :, s], w_shared)
    with pytest.raises(BadInputError, match="index sets"):
        widen_to_sets(widened, 2)
