"""Triton indexer kernels against their PyTorch references (TRITON_INTERPRET=1 on CPU, tiny shapes)."""

import pytest
import torch

from dsarag.kernels.indexer import (
    index_scores,
    index_scores_reference,
    quantize_fp8,
    select_topk,
    topk_select,
    topk_select_reference,
)
from dsarag.kernels.torch_dsa import select_topk as select_topk_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def indexer_inputs(batch: int, n_queries: int, n_keys: int, heads: int = 2, dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_queries, heads, dim, generator=generator)
    w = torch.randn(batch, n_queries, heads, generator=generator)
    k = torch.randn(batch, n_keys, dim, generator=generator)
    return (t.to(DEVICE, torch.bfloat16) for t in (q, w, k))


@pytest.mark.parametrize(("q_start", "n_queries"), [(0, 70), (37, 70), (300, 1), (290, 11)])
def test_index_scores_match_reference_with_sinks_window_and_causal_mask(q_start, n_queries):
    """Prefill-shaped (64-row tiles) and decode-shaped (≤ 16 queries: 16-row tiles) calls."""
    q, w, k = indexer_inputs(batch=2, n_queries=n_queries, n_keys=q_start + n_queries)
    got = index_scores(q, w, k, q_start, n_sink=2, window=4).float()
    want = index_scores_reference(q, w, k, q_start, n_sink=2, window=4)
    for row in range(q.shape[1]):  # tiles wholly in the future are never written: compare the causal prefix
        past = slice(0, q_start + row + 1)
        assert torch.equal(got[:, row, past].isinf(), want[:, row, past].isinf())
        finite = want[:, row, past].isfinite()
        torch.testing.assert_close(
            got[:, row, past][finite], want[:, row, past][finite], rtol=2e-2, atol=5e-2
        )
    assert (got[:, 0, q_start + 1 : q_start + 2] == float("-inf")).all()  # the future within a written tile


@pytest.mark.slow
def test_topk_select_keeps_the_largest_scores_and_pads_short_rows():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 40, 300, generator=generator).to(DEVICE, torch.bfloat16)
    scores[:, :, 7] = float("inf")  # forced keys (sinks, window) are selected whatever else scores
    got = topk_select(scores, q_start=10, n_keys=300, topk=24)
    want = topk_select_reference(scores, q_start=10, n_keys=300, topk=24)
    for row in range(40):
        row_len = min(10 + row + 1, 300)
        picked = got[:, row]
        assert ((picked >= 0).sum(-1) == min(24, row_len)).all()
        assert (picked < row_len).all()
        for b in range(2):
            valid = picked[b][picked[b] >= 0].long()
            assert len(set(valid.tolist())) == len(valid)  # no key twice
            mine = scores[b, row, valid].float().sort().values
            best = scores[b, row, want[b, row][want[b, row] >= 0].long()].float().sort().values
            assert torch.equal(mine, best)  # the same scores (ties may pick other positions)


@pytest.mark.parametrize("split", [2, 4])
def test_topk_select_split_across_programs_matches_the_reference(split):
    """Decode-shaped rows: several programs per row collect candidates by segment, a second pass merges."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 2, 300, generator=generator).to(DEVICE, torch.bfloat16)
    scores[:, :, 5] = float("inf")
    got = topk_select(scores, q_start=250, n_keys=300, topk=24, block=64, split=split)
    want = topk_select_reference(scores, q_start=250, n_keys=300, topk=24)
    for b in range(3):
        for row in range(2):
            mine = scores[b, row, got[b, row].long()].float().sort().values
            assert torch.equal(mine, scores[b, row, want[b, row].long()].float().sort().values)
            assert len(set(got[b, row].tolist())) == 24
    short = topk_select(scores, q_start=0, n_keys=300, topk=24, block=64, split=split)  # rows of 1–2 keys
    assert short[0, 1, :3].tolist() == [0, 1, -1]
    ties = topk_select(
        torch.zeros(1, 1, 30, dtype=torch.bfloat16, device=DEVICE), 29, 30, 10, block=16, split=split
    )
    assert sorted(ties[0, 0].tolist()) == list(range(10))  # segments are joined in key order


def test_topk_select_falls_back_to_the_whole_row_when_the_sample_misses():
    """Large scores exactly at the sampled positions push the threshold too high: the exact pass must run."""
    generator = torch.Generator().manual_seed(2)
    n_keys, sample = 512, 16
    scores = torch.randn(1, 4, n_keys, generator=generator)
    scores[..., torch.arange(sample) * n_keys // sample] = 50.0
    scores = scores.to(DEVICE, torch.bfloat16)
    got, fell_back = topk_select(
        scores,
        q_start=n_keys - 4,
        n_keys=n_keys,
        topk=40,
        sample=sample,
        return_fallback=True,
        engine="triton",
    )
    assert fell_back.all()
    assert_selects_the_reference(got, scores, q_start=n_keys - 4, n_keys=n_keys, topk=40)


def test_topk_select_rejects_an_engine_it_cannot_run():
    scores = torch.zeros(1, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="engine 'fast': use auto, cuda or triton"):
        topk_select(scores, 62, 64, 8, engine="fast")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA top-k needs"):
            topk_select(scores, 62, 64, 8, engine="cuda")


def test_topk_select_breaks_ties_by_position():
    scores = torch.zeros(1, 1, 50, dtype=torch.bfloat16, device=DEVICE)
    got = topk_select(scores, q_start=49, n_keys=50, topk=10)
    assert sorted(got[0, 0].tolist()) == list(range(10))


def assert_selects_the_reference(got, scores, q_start, n_keys, topk):
    """The same key sets as the stable-sort oracle: a valid top-k whose ties go to the lowest positions."""
    want = topk_select_reference(scores, q_start, n_keys, topk)
    for b in range(scores.shape[0]):
        for row in range(scores.shape[1]):
            assert sorted(got[b, row].tolist()) == sorted(want[b, row].tolist()), (b, row)


@pytest.mark.parametrize("split", [1, 2, 4])
def test_topk_select_on_all_negative_index_weights_never_needs_the_whole_row(split):
    """w < 0 makes every score ≤ 0 and each key whose logits are all ≤ 0 score exactly 0, the maximum: far more
    than 4 x topk keys tie at the threshold, and the tie list settles the row."""
    q, w, k = indexer_inputs(batch=1, n_queries=4, n_keys=512, heads=1, seed=5)
    scores = index_scores(q, -w.abs(), k, 508, n_sink=2, window=4)
    assert ((scores == 0).sum(-1) > 4 * 32).all()  # more ties than the list of keys above could hold
    got, fell_back = topk_select(scores, 508, 512, topk=32, block=64, split=split, return_fallback=True)
    assert not fell_back.any()
    assert_selects_the_reference(got, scores, q_start=508, n_keys=512, topk=32)
    start = torch.tensor([508], device=DEVICE)  # a captured decode step reads the position on the device
    on_device = topk_select(
        scores, start, 512, topk=32, block=64, split=split
    )  # GPU, split 1: Triton vs CUDA
    assert torch.equal(on_device.sort(-1).values, got.sort(-1).values)


def rows_with_ties(n_keys: int, topk: int, seed: int) -> torch.Tensor:
    """Row 0: a few distinct large scores, then half the keys tied below them: the k-th largest score is the
    tie, and so is the sample's threshold. Row 1: 2 x topk keys tied above everything else: the k-th largest
    is among them, above the threshold."""
    generator = torch.Generator().manual_seed(seed)
    scores = -torch.rand(2, n_keys, generator=generator) - 1.0  # distinct-ish scores in [-2, -1)
    positions = torch.randperm(n_keys, generator=generator)
    scores[0, positions[: topk // 3]] = torch.arange(topk // 3) + 10.0
    scores[0, positions[topk // 3 : n_keys // 2]] = 1.0
    scores[1, positions[: 2 * topk]] = 1.0
    return scores[None].to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("split", [1, 2, 4])
def test_topk_select_takes_the_lowest_tied_positions_at_and_above_the_threshold(split):
    scores = rows_with_ties(n_keys=400, topk=32, seed=6)
    got, fell_back = topk_select(scores, 399, 400, topk=32, block=64, split=split, return_fallback=True)
    assert not fell_back.any()
    assert_selects_the_reference(got, scores, q_start=399, n_keys=400, topk=32)


@pytest.mark.parametrize("split", [1, 4])
def test_topk_select_on_distinct_scores_is_torch_topk(split):
    """Distinct bf16 values (distinct bit patterns of positive finite numbers): the top-k is unique."""
    generator = torch.Generator().manual_seed(7)
    bits = (torch.randperm(0x3E00, generator=generator)[: 3 * 300] + 0x3000).to(torch.int16)
    scores = bits.view(torch.bfloat16).reshape(1, 3, 300).to(DEVICE)
    got = topk_select(scores, 297, 300, topk=24, block=64, split=split)
    for row in range(3):
        row_len = 297 + row + 1
        want = scores[:, row, :row_len].float().topk(24, dim=-1).indices
        assert torch.equal(got[:, row].sort(-1).values.long(), want.sort(-1).values)


@pytest.mark.parametrize("split", [1, 2])
def test_topk_select_returns_every_key_of_a_row_no_longer_than_topk(split):
    generator = torch.Generator().manual_seed(8)
    scores = torch.randn(1, 30, 300, generator=generator).to(DEVICE, torch.bfloat16)
    got, fell_back = topk_select(scores, 0, 300, topk=24, block=64, split=split, return_fallback=True)
    for row in range(24):  # rows 0 ... 23 hold row + 1 <= topk keys
        assert got[0, row].tolist() == list(range(row + 1)) + [-1] * (23 - row)
    assert not fell_back.any()
    assert_selects_the_reference(got, scores, q_start=0, n_keys=300, topk=24)


CUDA_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="the CUDA top-k runs on a GPU only")


@CUDA_ONLY
@pytest.mark.parametrize("kind", ["random", "negative", "ties"])
def test_cuda_topk_matches_the_reference(kind):
    """Rows over several 4,096-key steps of a thread block, ending mid-vector; k = 256."""
    n_keys, topk = 12_000, 256
    if kind == "ties":
        scores = rows_with_ties(n_keys, topk, seed=9)
    else:
        q, w, k = indexer_inputs(batch=2, n_queries=6, n_keys=n_keys, heads=4, seed=9)
        scores = index_scores(q, -w.abs() if kind == "negative" else w, k, n_keys - 6, n_sink=4, window=16)
    q_start = n_keys - scores.shape[1]
    got, fell_back = topk_select(scores, q_start, n_keys, topk, engine="cuda", return_fallback=True)
    assert not fell_back.any()
    assert_selects_the_reference(got, scores, q_start, n_keys, topk)
    assert (got.diff(dim=-1) > 0).all()  # each row in column order


@CUDA_ONLY
def test_cuda_topk_hands_a_missed_sample_to_the_whole_row_select():
    """Every sampled key (each 4th) scores lowest: all the others lie above the threshold and overflow the list."""
    generator = torch.Generator().manual_seed(10)
    scores = torch.randn(2, 1, 4096, generator=generator)
    scores[..., ::4] = -50.0
    scores = scores.to(DEVICE, torch.bfloat16)
    got, fell_back = topk_select(scores, 4095, 4096, topk=64, engine="cuda", return_fallback=True)
    assert fell_back.all()
    assert_selects_the_reference(got, scores, 4095, 4096, 64)


@CUDA_ONLY
def test_cuda_topk_decode_step_reads_its_position_on_the_device_and_replays_in_a_graph():
    """One row per sequence (batch 3) over a cache of 20,000 keys, the position in a device tensor; the
    captured step selects again at each new position without a host sync."""
    n_keys, topk = 20_000, 512
    q, w, k = indexer_inputs(batch=3, n_queries=1, n_keys=n_keys, heads=4, seed=11)
    position = torch.tensor([9_000], device=DEVICE)
    scores = torch.empty(3, 1, n_keys, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty(3, 1, topk, dtype=torch.int32, device=DEVICE)

    def step():
        index_scores(q, w, k, position, n_sink=4, window=16, out=scores)
        topk_select(scores, position, n_keys, topk, engine="cuda", out=out)

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for at in (9_000, 300, 19_999):
        position.fill_(at)
        graph.replay()
        assert_selects_the_reference(out.clone(), scores[..., : at + 1], at, at + 1, topk)


@CUDA_ONLY
def test_cuda_topk_selects_over_the_whole_row_when_the_sampled_threshold_is_too_high():
    """Every sampled key (each 4th) scores highest: fewer than k keys lie at or above the threshold."""
    generator = torch.Generator().manual_seed(12)
    scores = torch.randn(2, 1, 4096, generator=generator)
    scores[..., ::4] = torch.linspace(40.0, 60.0, 1024)
    scores = scores.to(DEVICE, torch.bfloat16)
    got, fell_back = topk_select(scores, 4095, 4096, topk=128, engine="cuda", return_fallback=True)
    assert fell_back.all()
    assert_selects_the_reference(got, scores, 4095, 4096, 128)
    assert (got.diff(dim=-1) > 0).all()  # the whole-row select writes column order too


@CUDA_ONLY
def test_cuda_topk_pads_rows_no_longer_than_topk():
    scores = torch.randn(1, 40, 304, device=DEVICE).to(torch.bfloat16)
    got = topk_select(scores, 0, 304, topk=24, engine="cuda")
    for row in range(24):
        assert got[0, row].tolist() == list(range(row + 1)) + [-1] * (23 - row)
    assert_selects_the_reference(got, scores, q_start=0, n_keys=304, topk=24)


@pytest.mark.parametrize(
    ("dtype", "dim"), [(torch.bfloat16, 16), (torch.float32, 16), (torch.bfloat16, 128)]
)  # 128: a widened layer's index heads (train.grow_dims)
def test_select_topk_matches_the_model_selection(dtype, dim):
    q, w, k = indexer_inputs(batch=1, n_queries=48, n_keys=80, dim=dim, seed=3)
    q, w, k = q.to(dtype), w.to(dtype), k.to(dtype)
    q_start = 32
    got = select_topk(q, w, k, q_start, n_keys=80, topk=20, n_sink=2, window=3, chunk_elements=16 * 80)
    positions = torch.arange(q_start, q_start + 48, device=DEVICE)
    want = select_topk_torch(q, w, k, positions, 80, 20, n_sink=2, window=3, query_block=16, key_block=32)
    scores = index_scores_reference(q, w, k, q_start, n_sink=2, window=3)
    for row in range(48):
        mine = scores[0, row, got[0, row].long()].sort().values
        best = scores[0, row, want[0, row]].sort().values
        # bf16 scores in the kernel may swap near-equal keys at the threshold: compare what they are worth
        torch.testing.assert_close(mine, best, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("position", [40, 150, 299])
def test_select_topk_reads_the_query_position_from_a_device_tensor(position):
    """A captured decode step: the grid covers the whole cache and each row reads only its causal prefix."""
    q, w, k = indexer_inputs(batch=2, n_queries=1, n_keys=300, seed=4)
    on_host = select_topk(q, w, k, position, position + 1, topk=80, n_sink=2, window=3)
    start = torch.tensor([position], device=DEVICE)
    on_device = select_topk(q, w, k, start, 300, topk=80, n_sink=2, window=3)
    assert torch.equal(on_device.sort(-1).values, on_host.sort(-1).values)
    assert int((on_device[0, 0] >= 0).sum()) == min(80, position + 1)


def test_select_topk_rejects_a_budget_smaller_than_sinks_and_window():
    q, w, k = indexer_inputs(batch=1, n_queries=4, n_keys=4)
    with pytest.raises(ValueError, match="raise topk"):
        select_topk(q, w, k, 0, 4, topk=8, n_sink=4, window=64)


def test_fp8_quantization_roundtrip_is_close():
    x = torch.randn(3, 5, 64)
    x8, scale = quantize_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (3, 5)
    torch.testing.assert_close(x8.float() * scale[..., None], x, rtol=0.07, atol=0.02)


@pytest.mark.skipif(DEVICE == "cpu", reason="float8 tensor-core dots need a Hopper GPU")
def test_fp8_index_scores_track_bf16():
    q, w, k = indexer_inputs(batch=1, n_queries=64, n_keys=256, dim=64)
    q8, q_scale = quantize_fp8(q)
    k8, k_scale = quantize_fp8(k)
    got = index_scores(q8, w, k8, 192, 0, 1, q_scale, k_scale).float()
    want = index_scores_reference(q, w, k, 192, 0, 1)
    finite = want.isfinite()
    assert torch.corrcoef(torch.stack((got[finite], want[finite])))[0, 1] > 0.99
