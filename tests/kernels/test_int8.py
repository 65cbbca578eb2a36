"""The int8 decode products (cpu_dsa.cpp dsa_linear_rows_int8, dsa_quantize_int8) against their PyTorch references,
and the backend that runs them."""

import subprocess

import pytest
import torch
import torch.nn.functional as F

from dsarag.indexer_model.model import ModelArgs, Transformer, layer_step
from dsarag.kernels import cpu_dsa
from dsarag.kernels.backend import resolve_backend


@pytest.fixture
def int8_kernels():
    if not cpu_dsa.int8_ready():
        pytest.skip("this CPU has no AVX2 + FMA + F16C: the int8 kernels are not built here")


def weights(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal weights with a block of zeros and a block of tiny values (an fp16 subnormal scale)."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    weight[0, :32] = 0
    weight[1, 32:64] *= 1e-6
    return weight.to(dtype)


@pytest.mark.needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_equals_reference(int8_kernels, dtype):
    weight = weights(37, 96, dtype)
    native, reference = cpu_dsa.quantize_int8(weight), cpu_dsa.quantize_int8_reference(weight)
    assert native.q.dtype == torch.int8 and native.scales.shape == (37, 3)
    assert torch.equal(native.q, reference.q) and torch.equal(native.scales, reference.scales)


def test_int8_weights_are_within_half_a_step_of_the_weights():
    weight = weights(16, 128, torch.float32)
    packed = cpu_dsa.quantize_int8_reference(weight)
    step = packed.scales.float().repeat_interleave(cpu_dsa.INT8_BLOCK, dim=1)
    error = (packed.dequantize() - weight).abs()
    assert (packed.dequantize()[0, :32] == 0).all()
    assert error[1, 32:64].max() < 1e-5  # a scale below fp16's range: the block's values are lost, and tiny
    error[1, 32:64] = 0
    assert error.le(step / 2 * 1.001).all()


@pytest.mark.needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows, bias", [(1, False), (3, True)])
def test_decode_linear_equals_reference(int8_kernels, dtype, n_rows, bias):
    """103 output rows (a partial block of four), 28 blocks of 32 (a partial group of block scales)."""
    gen = torch.Generator().manual_seed(7)
    packed = cpu_dsa.quantize_int8(weights(103, 896, dtype))
    bias_values = torch.randn(103, generator=gen).to(dtype) if bias else None
    x = torch.randn(1, n_rows, 896, generator=gen).to(dtype)
    with torch.inference_mode():
        assert cpu_dsa.runs_int8_rows(x, bias_values)
        got = cpu_dsa.linear_rows_int8(x, packed, bias_values)
        want = cpu_dsa.linear_int8_reference(x, packed, bias_values, cpu_dsa.rounds_x_per_block())
    assert got.shape == want.shape and got.dtype == dtype
    # Sums in another order; bf16: one rounding step of the output.
    tolerance = dict(rtol=2**-7, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("per_block", [True, False])
def test_rounded_x_is_within_half_a_step_of_x(per_block):
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3))
    x[0, :32] = 0
    rounded = cpu_dsa.round_x_reference(x, per_block)
    groups = x.view(3, 3, 32) if per_block else x[:, None]
    step = groups.abs().amax(-1, keepdim=True) / (127 if per_block else 32767)
    assert (rounded[0, :32] == 0).all()
    assert ((rounded - x).view(groups.shape).abs() <= step / 2 * 1.001).all()


@pytest.mark.needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gated_product_is_silu_of_the_gate_times_up(int8_kernels, dtype):
    """Gate and up stacked: 37 rows each (a partial block of four), k = 160 (an odd number of blocks)."""
    gen = torch.Generator().manual_seed(11)
    gate, up = weights(37, 160, dtype, seed=1), weights(37, 160, dtype, seed=2)
    packed = cpu_dsa.quantize_int8(torch.cat([gate, up]))
    x = torch.randn(1, 2, 160, generator=gen).to(dtype)
    with torch.inference_mode():
        got = cpu_dsa.linear_rows_int8(x, packed, None, gated=True)
        wide = cpu_dsa.linear_int8_reference(x.float(), packed, None, cpu_dsa.rounds_x_per_block())
    want = (F.silu(wide[..., :37]) * wide[..., 37:]).to(dtype)
    assert got.shape == (1, 2, 37) and got.dtype == dtype
    tolerance = dict(rtol=2**-7, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.needs_compiler
def test_a_joint_product_equals_each_int8_product(int8_kernels):
    """q, k, v stacked into one call give what three calls on their own int8 copies give, biases included."""
    linears = [torch.nn.Linear(96, n, bias=True) for n in (64, 32, 32)]
    linears[1].bias = None
    fallback_calls = []

    def fallback(x, *given):
        fallback_calls.append(x.shape[1])
        return tuple(linear(x) for linear in given)

    product = cpu_dsa.int8_joint_product(linears, fallback)
    x = torch.randn(1, 1, 96)
    with torch.inference_mode():
        joint = product(x, *linears)
        alone = [cpu_dsa.int8_product(lin.weight, None)(x, lin.weight, lin.bias) for lin in linears]
        product(torch.randn(1, cpu_dsa.FEW_QUERIES, 96), *linears)
    assert [t.shape[-1] for t in joint] == [64, 32, 32]
    for got, want in zip(joint, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert fallback_calls == [cpu_dsa.FEW_QUERIES]


@pytest.mark.needs_compiler
def test_the_product_leaves_prefill_gradients_and_odd_shapes_to_the_fallback(int8_kernels):
    calls = []

    def fallback(x, weight, bias):
        calls.append(x.shape[1])
        return F.linear(x, weight, bias)

    weight = weights(8, 64, torch.float32)
    product = cpu_dsa.int8_product(weight, fallback)
    with torch.no_grad():
        product(torch.randn(1, 1, 64), weight, None)
        product(torch.randn(1, cpu_dsa.FEW_QUERIES, 64), weight, None)
    product(torch.randn(1, 1, 64, requires_grad=True), weight, None)
    assert calls == [cpu_dsa.FEW_QUERIES, 1]
    assert cpu_dsa.int8_product(torch.randn(8, 48), fallback) is fallback


def test_decode_weights_are_int8_unless_opted_out(monkeypatch):
    monkeypatch.setattr(cpu_dsa, "native_library", lambda: object())
    monkeypatch.setattr(cpu_dsa, "avx512_bf16_ready", lambda: False)
    monkeypatch.setattr(cpu_dsa, "int8_ready", lambda: True)
    monkeypatch.delenv("DSARAG_DECODE_WEIGHTS", raising=False)
    assert resolve_backend("cpu", torch.float32).int8_decode
    assert not resolve_backend("cpu", torch.float32, decode_weights="model").int8_decode
    monkeypatch.setenv("DSARAG_DECODE_WEIGHTS", "model")
    assert not resolve_backend("cpu", torch.bfloat16).int8_decode
    assert not resolve_backend("cpu", torch.bfloat16, "torch").int8_decode
    monkeypatch.setenv("DSARAG_DECODE_WEIGHTS", "int4")
    with pytest.raises(ValueError, match="DSARAG_DECODE_WEIGHTS"):
        resolve_backend("cpu", torch.float32)
    monkeypatch.setattr(cpu_dsa, "int8_ready", lambda: False)  # a CPU without AVX2
    assert not resolve_backend("cpu", torch.float32, decode_weights="int8").int8_decode


def small_model() -> Transformer:
    args = ModelArgs("qwen2", 512, 128, 2, 4, 2, 32, 256, 10_000.0, 1e-6, 64, True, True)
    torch.manual_seed(0)
    return Transformer(args).eval()


@pytest.mark.needs_compiler
def test_a_decode_step_on_int8_weights_ranks_tokens_like_the_model_weights(int8_kernels):
    model = small_model()
    prompt, steps = torch.randint(0, 512, (1, 20)), {}
    with torch.inference_mode():
        for weights_choice in ("model", "int8"):
            model.use_backend(resolve_backend("cpu", torch.float32, decode_weights=weights_choice))
            model.setup_caches(1, 32)
            model(prompt, torch.arange(20))
            steps[weights_choice] = model(prompt[:, -1:], torch.tensor([20]))[0, -1]
            model.clear_caches()
    assert steps["int8"].topk(5).indices.equal(steps["model"].topk(5).indices)
    torch.testing.assert_close(steps["int8"], steps["model"], rtol=0, atol=0.05 * steps["model"].abs().max())


@pytest.mark.needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_decode_layer_equals_the_layer_op_by_op(int8_kernels, dtype):
    """The whole layer in one call (dsa_decode_layer_int8) against the same int8 products called one by one: the
    logits of two steps (the second attends to the first's cache row) and the cache rows written."""
    model = small_model().to(dtype)
    prompt, runs = torch.randint(0, 512, (1, 20)), {}
    with torch.inference_mode():
        for compiled in (True, False):
            model.use_backend(resolve_backend("cpu", dtype, decode_weights="int8"))
            assert all(layer.dense_step is not layer_step for layer in model.layers)
            if not compiled:
                for layer in model.layers:
                    layer.dense_step = layer_step
            model.setup_caches(1, 32)
            model(prompt, torch.arange(20))
            steps = [model(prompt[:, -i:][:, :1], torch.tensor([19 + i]))[0, -1] for i in (1, 2)]
            runs[compiled] = (*steps, model.layers[1].attention.kv_cache.k_cache[:, :, :22].clone())
            model.clear_caches()
    for got, want in zip(runs[True], runs[False], strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            continue
        # bf16: SDPA rounds inside its attention where the compiled layer keeps float32; a rounding step there
        # can move the next product's int8 x by a level
        torch.testing.assert_close(got, want, rtol=0, atol=0.01 * want.abs().max().item())
    for got, want in zip(runs[True][:2], runs[False][:2], strict=True):
        assert got.topk(5).indices.equal(want.topk(5).indices)


@pytest.mark.needs_compiler
def test_a_long_cache_leaves_the_layer_op_by_op(int8_kernels, monkeypatch):
    """Past COMPILED_LAYER_MAX_KEYS a layer runs op by op (PyTorch's attention); up to it, in one compiled call."""
    library = cpu_dsa.native_library()
    kernel, calls = library.dsa_decode_layer_int8, []
    monkeypatch.setattr(library, "dsa_decode_layer_int8", lambda *args: calls.append(1) or kernel(*args))
    model, prompt = small_model(), torch.randint(0, 512, (1, 20))
    model.use_backend(resolve_backend("cpu", torch.float32, decode_weights="int8"))
    model.setup_caches(1, 32)
    with torch.inference_mode():
        model(prompt, torch.arange(20))
        model(prompt[:, -1:], torch.tensor([20]))
        assert len(calls) == len(model.layers)
        monkeypatch.setattr(cpu_dsa, "COMPILED_LAYER_MAX_KEYS", 20)
        model(prompt[:, -1:], torch.tensor([21]))
    assert len(calls) == len(model.layers)


@pytest.mark.slow
@pytest.mark.needs_compiler
def test_the_avx2_build_equals_the_native_build(int8_kernels, tmp_path):
    """Laptops without AVX-512 run the AVX2 branch: build it (x86-64-v3) and compare with the reference."""
    import ctypes

    target = tmp_path / "cpu_dsa_avx2.so"
    flags = cpu_dsa.compile_flags("avx2")
    subprocess.run(["g++", *flags, "-o", str(target), str(cpu_dsa.SOURCE)], check=True)
    avx2 = ctypes.CDLL(str(target))
    avx2.dsa_linear_rows_int8.argtypes = cpu_dsa._SIGNATURES["dsa_linear_rows_int8"]
    packed = cpu_dsa.quantize_int8(weights(103, 896, torch.float32))
    x, bias = torch.randn(2, 896), torch.randn(103)
    out = torch.empty(2, 103)
    avx2.dsa_linear_rows_int8(
        x.data_ptr(), packed.q.data_ptr(), packed.scales.data_ptr(), bias.data_ptr(), 2, 103, 896, 0, 0,
        out.data_ptr(), 1,
    )  # fmt: skip
    avx2.dsa_int8_rounds_x_per_block.restype = ctypes.c_int
    assert not avx2.dsa_int8_rounds_x_per_block()  # no VNNI in x86-64-v3: x in int16 per row
    want = cpu_dsa.linear_int8_reference(x, packed, bias, x_per_block=False)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


def test_doctor_names_the_int8_decode_products(monkeypatch):
    from dsarag.indexer_model import weights
    from dsarag.rag.doctor import DoctorReport, _check_cpu_kernels

    monkeypatch.setattr(cpu_dsa, "native_library", lambda: object())
    monkeypatch.setattr(cpu_dsa, "amx_ready", lambda: False)
    monkeypatch.setattr(cpu_dsa, "avx512_bf16_ready", lambda: False)
    monkeypatch.setattr(cpu_dsa, "int8_ready", lambda: True)
    monkeypatch.setattr(weights, "default_dtype", lambda device: torch.float32)
    monkeypatch.delenv("DSARAG_DECODE_WEIGHTS", raising=False)
    report = DoctorReport()
    _check_cpu_kernels(report)
    assert (
        "(backend cpu-fp32: float32, and decode steps' weight products on int8 copies"
        in report.checks[0].detail
    )
    monkeypatch.setenv("DSARAG_DECODE_WEIGHTS", "model")
    report = DoctorReport()
    _check_cpu_kernels(report)
    assert "int8" not in report.checks[0].detail
