"""The fused indexer projection (Triton) against LightningIndexer.project (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from dsarag.indexer_model.indexer import LightningIndexer
from dsarag.kernels.index_projection import index_projection, project_index, projects_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_indexer(dtype: torch.dtype, index_sets: int = 1) -> LightningIndexer:
    torch.manual_seed(0)
    indexer = LightningIndexer(dim=48, rope_base=1e4, n_heads=4, head_dim=16, index_sets=index_sets)
    with torch.no_grad():  # LayerNorm's default ones / zeros would hide a swapped weight and bias
        indexer.k_norm.weight.uniform_(0.5, 1.5)
        indexer.k_norm.bias.uniform_(-0.5, 0.5)
    return indexer.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_sets", [1, 2])
def test_fused_projection_matches_the_indexer(dtype, index_sets):
    indexer = random_indexer(dtype, index_sets)
    x = torch.randn(2, 5, 48, device=DEVICE).to(dtype)
    positions = torch.arange(30000, 30005, device=DEVICE)  # large angles: the rotation must use each position
    with torch.no_grad():
        assert projects_fused(indexer, x)
        got, want = index_projection(indexer, x, positions), indexer.project(x, positions)
    # bf16: a float32 sum in another order can round an element to the neighbouring bf16 value
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for name, fused, reference in zip("qwk", got, want, strict=True):
        assert fused.shape == reference.shape and fused.dtype == dtype, name
        torch.testing.assert_close(fused, reference, **tolerance, msg=name)


def test_one_decode_token_reads_its_position_from_the_device_tensor():
    indexer = random_indexer(torch.float32)
    x = torch.randn(3, 1, 48, device=DEVICE)
    with torch.no_grad():
        for position in (0, 7, 131071):
            got = index_projection(indexer, x, torch.tensor([position], device=DEVICE))
            want = indexer.project(x, torch.tensor([position], device=DEVICE))
            for fused, reference in zip(got, want, strict=True):
                torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_a_projection_that_wants_gradients_runs_in_pytorch():
    indexer = random_indexer(torch.float32)
    x = torch.randn(1, 3, 48, device=DEVICE, requires_grad=True)
    assert not projects_fused(indexer, x)
    q, w, k = project_index(indexer, x, torch.arange(3, device=DEVICE))
    (q.sum() + w.sum() + k.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
