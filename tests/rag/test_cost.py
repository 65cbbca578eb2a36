"""The analytic cost model against hand-computed values and its invariants."""

from pathlib import Path

import pytest

from dsarag.rag.cost import (
    GpuSpec,
    ModelShape,
    decode_cost,
    dollars_per_million_tokens,
    keys_scored,
    keys_seen,
    meter_answer,
    phase_cost,
    prefill_cost,
)

QWEN_05B = ModelShape(
    n_layer=24, n_head=14, n_kv_head=2, head_dim=64, dim=896, intermediate_size=4864, vocab_size=151936
)


def test_keys_seen_counts_causal_and_clamped_keys_by_hand():
    assert keys_seen(0, 4, None) == 1 + 2 + 3 + 4
    assert keys_seen(0, 4, 2) == 1 + 2 + 2 + 2
    assert keys_seen(3, 2, None) == 4 + 5
    assert keys_seen(3, 2, 4) == 4 + 4
    assert keys_seen(10, 1, 4) == 4


def test_design_worked_example_32k_prefill_per_layer():
    """docs/design.md: 0.5B model, 32K prefill, k = 2048 -> about 2.9 vs 1.5 TFLOP per layer (linear layers included)."""
    dense = prefill_cost(QWEN_05B, 32768, None)
    sparse = prefill_cost(QWEN_05B, 32768, 2048)
    logits = 2 * QWEN_05B.dim * QWEN_05B.vocab_size
    assert (dense.flops - logits) / QWEN_05B.n_layer / 1e12 == pytest.approx(2.90, abs=0.01)
    assert (sparse.flops - logits) / QWEN_05B.n_layer / 1e12 == pytest.approx(1.50, abs=0.01)


def test_attention_flops_by_hand_for_a_tiny_model():
    shape = ModelShape(n_layer=1, n_head=2, n_kv_head=1, head_dim=4, dim=8, intermediate_size=16, vocab_size=10,
                       index_heads=1, index_dim=2)  # fmt: skip
    cost = phase_cost(shape, 0, 3, topk=2, logits_tokens=0)
    assert cost.attention_flops == 4 * 2 * 4 * (1 + 2 + 2)
    assert cost.indexer_flops == 2 * 1 * 2 * 3  # only position 2 sees more than k keys and scores them
    assert keys_scored(0, 3, 2) == 3 and keys_scored(0, 3, 8) == 0 and keys_scored(4, 2, 2) == 5 + 6
    linear = 2 * (8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16 + 8 * (1 * 2 + 2 + 1)) * 3
    assert cost.flops == cost.attention_flops + cost.indexer_flops + linear


def test_a_dense_tail_costs_its_queries_every_key_and_no_index_scores():
    shape = ModelShape(n_layer=1, n_head=2, n_kv_head=1, head_dim=4, dim=8, intermediate_size=16, vocab_size=10,
                       index_heads=1, index_dim=2)  # fmt: skip
    tailed = prefill_cost(shape, 5, topk=2, dense_tail=2)  # position 2 selects, 0-1 and 3-4 read every key
    assert tailed.attention_flops == 4 * 2 * 4 * ((1 + 2 + 2) + (4 + 5))
    assert tailed.indexer_flops == 2 * 1 * 2 * 3
    dense = prefill_cost(shape, 5, None)
    projections = 2 * shape.indexer_weights * 5  # every position, the tail's too, writes its index key
    extra = tailed.attention_flops - dense.attention_flops + tailed.indexer_flops + projections
    assert tailed.flops == dense.flops + extra
    whole = prefill_cost(QWEN_05B, 8000, 2048, dense_tail=8000)  # a tail as long as the prompt is dense
    assert (
        whole.attention_flops == prefill_cost(QWEN_05B, 8000, None).attention_flops
        and not whole.indexer_flops
    )
    assert prefill_cost(QWEN_05B, 8000, None, dense_tail=32) == prefill_cost(QWEN_05B, 8000, None)


@pytest.mark.parametrize("topk", [None, 512])
def test_costs_grow_with_context(topk):
    prefills = [prefill_cost(QWEN_05B, n, topk).flops for n in (1024, 4096, 16384)]
    decodes = [decode_cost(QWEN_05B, n, 8, topk).bytes_moved for n in (1024, 4096, 16384)]
    assert prefills == sorted(prefills) and decodes == sorted(decodes)


def test_sparse_attention_equals_dense_when_k_covers_the_context():
    dense = prefill_cost(QWEN_05B, 1500, None)
    sparse = prefill_cost(QWEN_05B, 1500, 2048)
    assert sparse.attention_flops == dense.attention_flops and not sparse.indexer_flops  # no query selects
    projections = 2 * QWEN_05B.n_layer * QWEN_05B.indexer_weights * 1500  # the index keys are still written
    assert sparse.flops == dense.flops + projections


def test_per_million_token_curves_favour_sparse_only_at_long_context():
    gpu = GpuSpec()
    for phase in ("prefill", "decode"):
        short = [dollars_per_million_tokens(QWEN_05B, 1000, phase, k, gpu) for k in (None, 2048)]
        long = [dollars_per_million_tokens(QWEN_05B, 128_000, phase, k, gpu) for k in (None, 2048)]
        assert long[1] < long[0]  # sparse is cheaper at 128K
        assert short[1] >= short[0]  # below k the indexer is pure overhead
    with pytest.raises(ValueError, match="prefill or decode"):
        dollars_per_million_tokens(QWEN_05B, 10, "train", None, gpu)


def test_meter_answer_reports_savings_and_measured_dollars():
    gpu = GpuSpec(price_per_hour=3.6)  # one cent per 10 s
    meter = meter_answer(QWEN_05B, 8000, 32, 2048, {"prefill_s": 8.0, "decode_s": 2.0}, "sparse", gpu)
    assert 0 < meter["flops_saving"] < 1 and 0 < meter["decode_bytes_saving"] < 1
    assert meter["sparse"]["roofline_ms"] < meter["dense"]["roofline_ms"]
    assert meter["measured"]["dollars_at_price"] == pytest.approx(0.01)
    assert meter["measured"]["tokens_per_s"] == pytest.approx(16.0)
    # A sparse prefill with dense decode steps (--attention auto) saves in the prefill only.
    prefill_only = meter_answer(
        QWEN_05B, 8000, 32, 2048, {"prefill_s": 8.0, "decode_s": 2.0}, "sparse", gpu, sparse_decode=False
    )
    assert prefill_only["decode_bytes_saving"] == 0.0
    assert prefill_only["sparse"]["decode_flops"] == prefill_only["dense"]["decode_flops"]
    assert prefill_only["sparse"]["prefill_flops"] == meter["sparse"]["prefill_flops"]
    assert 0 < prefill_only["flops_saving"] < meter["flops_saving"]
    # ... and with the question's positions dense (what auto runs), a little less.
    tailed = meter_answer(
        QWEN_05B, 8000, 32, 2048, {"prefill_s": 8.0}, "sparse", gpu, sparse_decode=False, dense_tail=32
    )
    assert tailed["dense_tail"] == 32
    assert (
        prefill_only["sparse"]["prefill_flops"]
        < tailed["sparse"]["prefill_flops"]
        < meter["dense"]["prefill_flops"]
    )


def test_ledger_appends_rows_and_reports_per_day_and_mode(tmp_path):
    from dsarag.rag.cost_ledger import append_row, cost_report, ledger_row, read_ledger

    gpu = GpuSpec()
    for mode in ("sparse", "dense", "sparse"):
        meter = meter_answer(QWEN_05B, 9000, 16, 2048, {"prefill_s": 1.0, "decode_s": 0.5}, mode, gpu)
        append_row(ledger_row("q?", "default", meter), tmp_path)
    table = read_ledger(tmp_path)
    assert table.num_rows == 3
    report = cost_report(table)
    assert report["total"]["answers"] == 3 and report["total"]["new_tokens"] == 48
    assert {mode: group["answers"] for mode, group in report["by_mode"].items()} == {"dense": 1, "sparse": 2}
    assert sum(group["answers"] for group in report["by_day"].values()) == 3
    assert 0 < report["total"]["flops_saving"] < 1


def test_ledger_compaction_keeps_every_row_once_even_if_interrupted(tmp_path, monkeypatch):
    import dsarag.rag.cost_ledger as ledger

    monkeypatch.setattr(ledger, "COMPACT_AFTER_PARTS", 4)
    meter = meter_answer(QWEN_05B, 100, 2, 2048, {"prefill_s": 0.1, "decode_s": 0.1}, "dense", GpuSpec())
    for _ in range(7):
        ledger.append_row(ledger.ledger_row("q", "m", meter), tmp_path)
    assert ledger.read_ledger(tmp_path).num_rows == 7
    assert len(list(tmp_path.glob("*merged.parquet"))) == 1
    # A crash after a merge but before its inputs were removed: the inputs are still on disk
    parts = ledger.live_parts(tmp_path)
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    ledger.compact(tmp_path, parts)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert ledger.read_ledger(tmp_path).num_rows == 7


def test_empty_ledger_reports_zero(tmp_path):
    from dsarag.rag.cost_ledger import cost_report, read_ledger

    assert cost_report(read_ledger(tmp_path / "none"))["total"]["answers"] == 0


def test_shape_of_a_model_counts_its_indexers_mean_heads_and_dims():
    from dsarag.indexer_model.train import (
        TrainConfig,
        grow_dims,
        grow_heads,
        load_frozen_model,
        make_indexers,
    )

    model = load_frozen_model("tiny", "cpu")
    assert ModelShape.of(model).index_heads == 4  # no indexers attached: the design default
    indexers = grow_heads(make_indexers(model, TrainConfig()), [0], 4 + 4 * model.args.n_layer)
    model.attach_indexers(indexers)
    assert ModelShape.of(model).index_heads == 8  # (4 + 4n) + 4 (n - 1) heads over n layers
    sparse, four_heads = (
        prefill_cost(ModelShape.of(model), 4096, 512),
        prefill_cost(ModelShape.from_args(model.args), 4096, 512),
    )
    assert sparse.indexer_flops == 2 * four_heads.indexer_flops
    model.attach_indexers(grow_dims(indexers, [1], 128))  # one layer with twice the dims of each index head
    shape = ModelShape.of(model)
    per_layer = [
        (layer.attention.indexer.n_heads, layer.attention.indexer.head_dim) for layer in model.layers
    ]
    assert shape.index_dim == pytest.approx(sum(dims for _, dims in per_layer) / len(per_layer))
    heads_x_dims = sum(heads * dims for heads, dims in per_layer) / len(per_layer)
    assert shape.index_heads * shape.index_dim == pytest.approx(heads_x_dims)  # what each key's score costs
