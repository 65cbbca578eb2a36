"""A decode step's RMSNorm and RoPE in compiled calls (cpu_dsa.cpp dsa_rms_norm_rows, dsa_rope_rows) against the
model's PyTorch functions, and the fallback for what they do not serve."""

import pytest
import torch

from dsarag.indexer_model.indexer import rope_cos_sin
from dsarag.indexer_model.model import apply_rope, rms_norm
from dsarag.kernels import cpu_dsa


def recording(function, calls: list):
    def fallback(*args):
        calls.append(args[0].shape)
        return function(*args)

    return fallback


@pytest.mark.needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rows_equal_the_models(dtype):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 3, 896, generator=gen).to(dtype), torch.randn(896, generator=gen).to(dtype)
    calls = []
    norm = cpu_dsa.rows_rms_norm(recording(rms_norm, calls))
    with torch.inference_mode():
        got = norm(x, weight, 1e-6)
        norm(torch.randn(1, cpu_dsa.FEW_QUERIES, 896).to(dtype), weight, 1e-6)
    assert calls == [(1, cpu_dsa.FEW_QUERIES, 896)]  # a prefill's rows stay in PyTorch
    # bf16: the sums in another order may move a value by one rounding step
    tolerance = dict(rtol=2**-7, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, rms_norm(x, weight, 1e-6), **tolerance)


@pytest.mark.needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rows_equal_the_models_on_views_of_a_joint_product(dtype):
    """q and k as views into one (B, T, (14 + 2 + 2) * 64) output, batch 2, two new tokens."""
    qkv = torch.randn(2, 2, 18 * 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    q, k = qkv[..., : 14 * 64].view(2, 2, 14, 64), qkv[..., 14 * 64 : 16 * 64].view(2, 2, 2, 64)
    cos_sin = rope_cos_sin(torch.tensor([40, 41]), 64, 1e6)
    calls = []
    rope = cpu_dsa.rows_rope(recording(apply_rope, calls))
    with torch.inference_mode():
        for heads in (q, k):
            torch.testing.assert_close(rope(heads, cos_sin), apply_rope(heads, cos_sin), rtol=1e-6, atol=1e-6)
        long = torch.randn(1, cpu_dsa.FEW_QUERIES, 2, 64).to(dtype)
        rope(long, rope_cos_sin(torch.arange(cpu_dsa.FEW_QUERIES), 64, 1e6))
    assert calls == [long.shape]
