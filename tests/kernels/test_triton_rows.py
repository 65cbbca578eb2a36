"""RMSNorm and RoPE in one Triton launch each against the model's PyTorch ones (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from dsarag.indexer_model.indexer import rope_cos_sin
from dsarag.indexer_model.model import apply_rope, rms_norm
from dsarag.kernels.triton_rows import rows_rms_norm, rows_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def must_not_run(*args):
    raise AssertionError("the PyTorch fallback ran")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_model_s(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 96, device=DEVICE) * 3).to(dtype)
    weight = torch.rand(96, device=DEVICE).add(0.5).to(dtype)
    got = rows_rms_norm(must_not_run)(x, weight, 1e-6)
    want = rms_norm(x, weight, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_the_model_s_on_a_view_of_a_joint_product(dtype):
    torch.manual_seed(0)
    heads, kv_heads, head_dim = 6, 2, 16
    qkv = torch.randn(2, 5, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[..., : heads * head_dim].view(2, 5, heads, head_dim)  # strided rows: a view, not a copy
    k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].view(2, 5, kv_heads, head_dim)
    cos_sin = rope_cos_sin(torch.arange(40000, 40005, device=DEVICE), head_dim, 1e6)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for x in (q, k):
        got = rows_rope(must_not_run)(x, cos_sin)
        torch.testing.assert_close(got, apply_rope(x, cos_sin), **tolerance)


def test_inputs_that_want_gradients_take_the_fallback():
    x = torch.randn(1, 2, 32, device=DEVICE, requires_grad=True)
    weight = torch.ones(32, device=DEVICE)
    calls = []
    rows_rms_norm(lambda *args: calls.append("norm") or rms_norm(*args))(x, weight, 1e-6)
    cos_sin = rope_cos_sin(torch.arange(2, device=DEVICE), 16, 1e4)
    rows_rope(lambda *args: calls.append("rope") or apply_rope(*args))(x.view(1, 2, 2, 16), cos_sin)
    assert calls == ["norm", "rope"]
