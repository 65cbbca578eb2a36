"""The compiled CPU kernels (dsarag_kernels/cpu_dsa.cpp) against their PyTorch references."""

from collections import Counter
from typing import NamedTuple

import pytest
import torch

from dsarag.base.errors import BadInputError
from dsarag.indexer_model.dsa import DSAConfig, dsa_attention
from dsarag.indexer_model.indexer import LightningIndexer
from dsarag.kernels import cpu_dsa
from dsarag.kernels.backend import TORCH, resolve_backend
from dsarag.kernels.torch_dsa import masked_dense_attention_reference, select_topk


def index_inputs(n_keys: int, n_heads: int = 4, dim: int = 64, seed: int = 0):
    """Positive queries, keys and weights: every index score is a distinct positive sum, so no ties."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(1, n_keys, n_heads, dim, generator=gen)
    w = torch.rand(1, n_keys, n_heads, generator=gen)
    k = torch.rand(1, n_keys, dim, generator=gen)
    return q, w, k


@pytest.mark.needs_compiler
@pytest.mark.parametrize("n_heads", [4, 6, 16])  # 6: padded to two groups of four heads
def test_selection_equals_reference(n_heads):
    n_keys, topk, n_sink, window = 300, 96, 4, 16
    q, w, k = index_inputs(n_keys, n_heads)
    positions = torch.arange(40, n_keys)  # a prefill chunk after 40 cached tokens
    native = cpu_dsa.select_topk(q[:, 40:], w[:, 40:], k, positions, n_keys, topk, n_sink, window)
    reference = select_topk(q[:, 40:], w[:, 40:], k, positions, n_keys, topk, n_sink, window)
    for row, position in enumerate(positions.tolist()):
        chosen = native[0, row]
        valid = chosen[chosen >= 0]
        assert torch.equal(valid, valid.sort().values), "ascending"
        assert (chosen[len(valid) :] == -1).all(), "padding at the end"
        expected = reference[0, row]
        assert set(valid.tolist()) == set(expected[expected >= 0].tolist()), position
        assert len(valid) == min(position + 1, topk)
        assert int(valid.max()) <= position  # causal
        if position + 1 > topk:
            assert set(range(n_sink)) | set(range(position - window + 1, position + 1)) <= set(valid.tolist())


@pytest.mark.needs_compiler
@pytest.mark.parametrize("n_heads", [4, 16])
def test_decode_selection_scores_the_cache_rows_like_the_tiled_path(n_heads):
    """Fewer than FEW_QUERIES queries take the row-by-row scoring (no tiled copy of the cache per step)."""
    n_keys, topk = 300, 96
    q, w, k = index_inputs(n_keys, n_heads)
    last = slice(n_keys - 3, n_keys)
    few = cpu_dsa.select_topk(q[:, last], w[:, last], k, torch.arange(n_keys)[last], n_keys, topk, 4, 16)
    many = cpu_dsa.select_topk(q, w, k, torch.arange(n_keys), n_keys, topk, 4, 16)[:, last]
    reference = select_topk(q[:, last], w[:, last], k, torch.arange(n_keys)[last], n_keys, topk, 4, 16)
    assert few.shape[1] < cpu_dsa.FEW_QUERIES <= n_keys
    assert torch.equal(few, many)
    assert all(set(few[0, t].tolist()) == set(reference[0, t].tolist()) for t in range(3))


@pytest.mark.needs_compiler
def test_selection_ties_go_to_the_earliest_keys():
    """Keys 10-109 score exactly 0, the best score (negative weights); 60 candidate slots take keys 10-69."""
    n_keys, topk, n_sink, window = 200, 80, 4, 16
    q, w, k = index_inputs(n_keys)
    k[:, 10:110] = -k[:, 10:110]  # negative dot products: ReLU 0
    chosen = cpu_dsa.select_topk(q, -w, k, torch.arange(n_keys), n_keys, topk, n_sink, window)
    expected = [*range(n_sink), *range(10, 70), *range(n_keys - window, n_keys)]
    assert chosen[0, -1].tolist() == expected


@pytest.mark.needs_compiler
@pytest.mark.parametrize(
    "n_heads, n_kv_heads, sets, dtype",
    [
        (14, 2, 1, torch.float32),
        (9, 3, 1, torch.float32),
        (18, 2, 2, torch.float32),
        (14, 2, 1, torch.bfloat16),
    ],
)
def test_gather_attention_equals_masked_dense(n_heads, n_kv_heads, sets, dtype):
    """Query heads 7, 3 and 9 per kv head (9: two lane groups), one selection per kv head, and bf16 caches."""
    gen = torch.Generator().manual_seed(1)
    n_queries, n_keys, topk, dim = 40, 160, 24, 64
    q = torch.randn(1, n_heads, n_queries, dim, generator=gen).to(dtype)
    cache = torch.randn(2, 1, n_kv_heads, n_keys + 32, dim, generator=gen).to(dtype)
    k_cache, v_cache = cache[0, :, :, :n_keys], cache[1, :, :, :n_keys]  # a preallocated cache's prefix
    shape = (1, sets, n_queries, topk) if sets > 1 else (1, n_queries, topk)
    indices = torch.rand(*shape[:-1], n_keys, generator=gen).argsort(-1)[
        ..., :topk
    ]  # distinct keys, any order
    indices[..., -5:] = -1  # unused slots
    out = cpu_dsa.sparse_attention(q, k_cache, v_cache, indices, dim**-0.5)
    reference = masked_dense_attention_reference(q, k_cache, v_cache, indices, dim**-0.5)
    assert out.dtype == dtype
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), reference.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.needs_compiler
def test_dsa_attention_native_equals_torch_path():
    """The model's switch: the same DSA layer through the compiled kernels and the PyTorch path."""
    gen = torch.Generator().manual_seed(2)
    n_keys, dim = 256, 64
    q = torch.randn(1, 14, n_keys, dim, generator=gen)
    k_cache = torch.randn(1, 2, n_keys, dim, generator=gen)
    v_cache = torch.randn(1, 2, n_keys, dim, generator=gen)
    idx_q, idx_w, idx_k = index_inputs(n_keys)
    positions = torch.arange(n_keys)
    outs = {
        kernels: dsa_attention(
            q,
            k_cache,
            v_cache,
            idx_q,
            idx_w,
            idx_k,
            positions,
            n_keys,
            DSAConfig(topk=96, n_sink=4, window=16, dense_threshold=0),
            resolve_backend("cpu", q.dtype, kernels),
        )  # fmt: skip
        for kernels in ("native", "torch")
    }
    torch.testing.assert_close(outs["native"], outs["torch"], atol=1e-5, rtol=1e-5)


@pytest.mark.needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_sets", [1, 2])
def test_index_projection_of_a_decode_step_equals_the_indexer(dtype, index_sets):
    """The kernel's q, w and k match LightningIndexer.project, RoPE included (far positions: large angles)."""
    torch.manual_seed(4)
    indexer = LightningIndexer(96, rope_base=1e6, n_heads=4, head_dim=64, index_sets=index_sets)
    with torch.no_grad():  # a trained LayerNorm, not the identity
        indexer.k_norm.weight.uniform_(0.5, 1.5)
        indexer.k_norm.bias.uniform_(-0.2, 0.2)
    indexer = indexer.to(dtype)
    x = torch.randn(2, 3, 96, dtype=dtype)
    positions = torch.tensor([20_000, 20_001, 20_002])
    with torch.inference_mode():
        assert cpu_dsa.projects_natively(indexer, x)
        expected, got = indexer.project(x, positions), cpu_dsa.index_projection(indexer, x, positions)
    one_ulp = 2**-7 if dtype == torch.bfloat16 else 1e-5  # sums in another order may round the other way
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == want.dtype
        torch.testing.assert_close(have, want, rtol=one_ulp, atol=1e-5)


def test_index_projection_leaves_prefill_and_gradients_to_pytorch():
    indexer = LightningIndexer(32, rope_base=1e4, n_heads=2, head_dim=16)
    step = torch.randn(1, 1, 32)
    with torch.no_grad():
        assert cpu_dsa.projects_natively(indexer, step)
        assert not cpu_dsa.projects_natively(indexer, torch.randn(1, cpu_dsa.FEW_QUERIES, 32))
        assert not cpu_dsa.projects_natively(indexer.to(torch.float16), step.half())
    assert not cpu_dsa.projects_natively(indexer.float(), step)  # training: the kernel has no backward


def test_without_a_compiler_the_torch_path_runs(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-dsarag")
    cpu_dsa.native_library.cache_clear()
    try:
        assert cpu_dsa.native_library() is None
        q = torch.randn(1, 2, 100, 16)
        kv = torch.randn(1, 1, 100, 16)
        idx_q, idx_w, idx_k = (x[..., :16] for x in index_inputs(100, dim=16))
        args = (q, kv, kv, idx_q, idx_w, idx_k, torch.arange(100), 100)
        auto = resolve_backend("cpu", torch.float32)
        assert auto is TORCH
        dsa_attention(*args, DSAConfig(topk=40, n_sink=2, window=8, dense_threshold=0), auto)
        with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
            resolve_backend("cpu", torch.float32, "native")
    finally:
        cpu_dsa.native_library.cache_clear()


def test_the_avx2_switch_compiles_for_avx2_and_runs_the_model_in_float32(monkeypatch):
    from dsarag.indexer_model.weights import default_dtype

    monkeypatch.setenv("DSARAG_CPU_ISA", "avx2")
    assert cpu_dsa.cpu_isa() == "avx2"
    assert "-march=x86-64-v3" in cpu_dsa.compile_flags("avx2")
    assert "-march=native" not in cpu_dsa.compile_flags("avx2")
    assert default_dtype("cpu") == torch.float32
    monkeypatch.setenv("DSARAG_CPU_ISA", "avx512")
    with pytest.raises(BadInputError, match="DSARAG_CPU_ISA"):
        cpu_dsa.cpu_isa()


@pytest.mark.needs_compiler
def test_the_avx2_build_runs_no_avx512_kernels(monkeypatch):
    """DSARAG_CPU_ISA=avx2 builds a library of its own: no bf16 or AMX kernels, int8 products without VNNI."""
    native = cpu_dsa.native_library()
    monkeypatch.setenv("DSARAG_CPU_ISA", "avx2")
    cpu_dsa.native_library.cache_clear()
    try:
        assert cpu_dsa.native_library()._name != native._name
        assert not cpu_dsa.avx512_bf16_ready() and not cpu_dsa.amx_ready()
        assert cpu_dsa.int8_ready() and not cpu_dsa.rounds_x_per_block()
        assert resolve_backend("cpu", torch.float32).name == "cpu-fp32"
    finally:
        cpu_dsa.native_library.cache_clear()


def small_integer_inputs(n_keys: int, n_heads: int, seed: int = 3):
    """bf16 index inputs whose scores are exact small integers in any order of summation: many ties, and the
    same scores in the bf16 (AMX) and float32 kernels."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, n_keys, n_heads, 64), generator=gen).to(torch.bfloat16)
    w = torch.randint(-2, 4, (1, n_keys, n_heads), generator=gen).to(torch.bfloat16)
    k = torch.randint(-2, 3, (1, n_keys, 64), generator=gen).to(torch.bfloat16)
    return q, w, k


class Bf16Kernels(NamedTuple):
    selection: str  # the prefill's selection kernel
    attention: str  # the prefill's gather attention kernel
    decode_selection: str  # a decode step's (a few queries)
    calls: Counter  # compiled calls by name


@pytest.fixture(
    params=[
        pytest.param("amx", marks=pytest.mark.needs_amx),
        pytest.param("avx512-bf16", marks=pytest.mark.needs_avx512_bf16),
    ]
)
def bf16_kernels(request, monkeypatch) -> Bf16Kernels:
    """Runs a test once per family of bf16 kernels this CPU has (an AMX CPU runs both: the second hides its AMX),
    counting the compiled calls, so that a test also shows which kernels ran."""
    if request.param == "avx512-bf16":
        monkeypatch.setattr(cpu_dsa, "amx_ready", lambda: False)
    library, calls = cpu_dsa.native_library(), Counter()
    for name in cpu_dsa._SIGNATURES:
        if hasattr(library, name):
            kernel = getattr(library, name)
            monkeypatch.setattr(
                library, name, lambda *a, kernel=kernel, name=name: calls.update([name]) or kernel(*a)
            )
    if request.param == "amx":
        return Bf16Kernels(
            "dsa_select_topk_amx", "dsa_sparse_attention_amx", "dsa_select_topk_amx_rows", calls
        )
    return Bf16Kernels(
        "dsa_select_topk_bf16", "dsa_sparse_attention_rows_bf16", "dsa_select_topk_bf16", calls
    )


@pytest.mark.parametrize(
    "n_heads, n_queries, topk",
    [
        *[(n_heads, 45, topk) for n_heads, topk in [(4, 96), (6, 96), (4, 300), (16, 300), (4, 68)]],
        *[(4, 1, 96), (4, 5, 300), (16, 1, 96), (6, 3, 68)],  # decode steps: a few queries
    ],
)
def test_bf16_selection_equals_float32_kernel(bf16_kernels, n_heads, n_queries, topk):
    """The bf16 scores and the AVX-512 threshold search pick exactly the float32 kernel's keys, ties included:
    a prefill of 45 queries after 295 cached keys (a last, partial block), or a decode step's few queries (the last
    tile of 340 keys partial). k = 68: sinks and window only."""
    n_keys = 340
    q, w, k = small_integer_inputs(n_keys, n_heads)
    positions = torch.arange(n_keys - n_queries, n_keys)
    rows = slice(n_keys - n_queries, None)
    bf16 = cpu_dsa.select_topk(q[:, rows], w[:, rows], k, positions, n_keys, topk, 4, 64)
    few = n_queries < cpu_dsa.FEW_QUERIES
    assert bf16_kernels.calls[bf16_kernels.decode_selection if few else bf16_kernels.selection] == 1
    fp32 = cpu_dsa.select_topk(
        q[:, rows].float(), w[:, rows].float(), k.float(), positions, n_keys, topk, 4, 64
    )
    assert torch.equal(bf16, fp32)


def test_bf16_selection_of_equal_scores_takes_the_earliest_keys(bf16_kernels):
    n_keys, topk = 200, 80
    q, w, k = small_integer_inputs(n_keys, 4)
    chosen = cpu_dsa.select_topk(q, torch.zeros_like(w), k, torch.arange(n_keys), n_keys, topk, 4, 16)
    assert bf16_kernels.calls[bf16_kernels.selection] == 1
    assert chosen[0, -1].tolist() == [*range(4), *range(4, 64), *range(n_keys - 16, n_keys)]


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, sets, n_queries, n_keys, topk, dim",
    [
        (14, 2, 1, 40, 160, 24, 64),  # the default model's grouping; a partial last block
        (9, 3, 1, 16, 160, 24, 64),  # 3 query heads per kv head
        (4, 2, 1, 40, 160, 24, 64),  # 2 query heads per kv head: 8 lanes per head without AMX
        (3, 3, 1, 33, 160, 24, 64),  # 1 query head per kv head: a head's 16 lanes take 16 dim pairs of a key
        (18, 2, 2, 33, 160, 24, 64),  # one selection per kv head
        (32, 2, 1, 20, 700, 200, 64),  # 16 query heads per kv head; unions of up to 16 x 200 keys
        (14, 2, 1, 1, 300, 96, 64),  # one query: a decode step of --attention sparse (heads in lanes)
        (8, 2, 1, 1, 300, 95, 64),  # 4 query heads per kv head, an odd number of keys
        (32, 2, 2, 3, 300, 96, 64),  # a few queries, 16 query heads per kv head, one selection per kv head
        (12, 2, 1, 40, 160, 24, 128),  # head size 128 (Qwen2.5-1.5B): per query, with or without AMX
        (16, 8, 1, 1, 300, 95, 128),  # a decode step, 2 query heads per kv head (Qwen3-0.6B's shape)
    ],
)
def test_bf16_gather_attention_equals_masked_dense(
    bf16_kernels, n_heads, n_kv_heads, sets, n_queries, n_keys, topk, dim
):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, n_heads, n_queries, dim, generator=gen).to(torch.bfloat16)
    cache = torch.randn(2, 1, n_kv_heads, n_keys + 32, dim, generator=gen).to(torch.bfloat16)
    k_cache, v_cache = cache[0, :, :, :n_keys], cache[1, :, :, :n_keys]
    shape = (1, sets, n_queries, topk) if sets > 1 else (1, n_queries, topk)
    indices = torch.rand(*shape[:-1], n_keys, generator=gen).argsort(-1)[..., :topk]
    indices[..., -5:] = -1
    indices[..., -1, 1:] = -1  # a query with a single key
    out = cpu_dsa.sparse_attention(q, k_cache, v_cache, indices, dim**-0.5)
    # A decode step reads its rows in place with or without AMX, and so does every query with 128-dim heads.
    rows = n_queries < cpu_dsa.FEW_QUERIES or dim != cpu_dsa.AMX_HEAD_DIM
    assert bf16_kernels.calls["dsa_sparse_attention_rows_bf16" if rows else bf16_kernels.attention] == 1
    reference = masked_dense_attention_reference(q, k_cache, v_cache, indices, dim**-0.5)
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2, rtol=2e-2)
    exact = masked_dense_attention_reference(q.float(), k_cache.float(), v_cache.float(), indices, dim**-0.5)
    relative = (out.float() - exact).norm() / exact.norm()
    assert relative < 5e-3  # bf16 probabilities: about 2e-3


def test_dsa_layer_in_bf16_runs_the_bf16_kernels_like_the_torch_path(bf16_kernels):
    gen = torch.Generator().manual_seed(5)
    n_keys = 256
    q = torch.randn(1, 14, n_keys, 64, generator=gen).bfloat16()
    k_cache, v_cache = torch.randn(2, 1, 2, n_keys, 64, generator=gen).bfloat16()
    # Distinct integer index scores (a permutation of 0-255, exact in bf16): both paths rank the keys alike.
    idx_q, idx_w = torch.ones(1, n_keys, 4, 64).bfloat16(), torch.ones(1, n_keys, 4).bfloat16()
    idx_k = torch.zeros(1, n_keys, 64)
    idx_k[0, :, 0] = torch.randperm(n_keys, generator=gen) / 4
    idx_k = idx_k.bfloat16()
    cfg = dict(topk=96, n_sink=4, window=16, dense_threshold=0)
    args = (q, k_cache, v_cache, idx_q, idx_w, idx_k, torch.arange(n_keys), n_keys)
    native = dsa_attention(*args, DSAConfig(**cfg), resolve_backend("cpu", torch.bfloat16, "native"))
    assert bf16_kernels.calls[bf16_kernels.selection] == bf16_kernels.calls[bf16_kernels.attention] == 1
    torch_path = dsa_attention(*args, DSAConfig(**cfg), TORCH)
    torch.testing.assert_close(native.float(), torch_path.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.needs_avx512_bf16
@pytest.mark.parametrize("n_rows, bias", [(1, False), (3, True)])
def test_decode_linear_equals_pytorch(n_rows, bias):
    """The decode step's bf16 matrix-vector product against F.linear: 103 output rows (a partial last block of
    four), an inner size of 4 x 32 x 7, float32 sums rounded once."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(103, 896, generator=gen).bfloat16()
    bias_values = torch.randn(103, generator=gen).bfloat16() if bias else None
    x = torch.randn(1, n_rows, 896, generator=gen).bfloat16()
    with torch.inference_mode():
        assert cpu_dsa.runs_linear_rows(x, weight, bias_values)
        got = cpu_dsa.linear_rows(x, weight, bias_values)
        want = torch.nn.functional.linear(x, weight, bias_values)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)  # sums in another order: one bf16 step


def test_decode_linear_leaves_prefill_float32_and_gradients_to_pytorch():
    weight = torch.randn(8, 64).bfloat16()
    with torch.no_grad():
        assert not cpu_dsa.runs_linear_rows(torch.randn(1, cpu_dsa.FEW_QUERIES, 64).bfloat16(), weight, None)
        assert not cpu_dsa.runs_linear_rows(torch.randn(1, 1, 64), weight.float(), None)
        assert not cpu_dsa.runs_linear_rows(
            torch.randn(1, 1, 48).bfloat16(), torch.randn(8, 48).bfloat16(), None
        )
    assert not cpu_dsa.runs_linear_rows(torch.randn(1, 1, 64).bfloat16(), weight.requires_grad_(), None)
