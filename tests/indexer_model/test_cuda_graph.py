"""Decode steps replayed from a CUDA graph give the eager steps' tokens (GPU only: run on the device machine)."""

import pytest
import torch

from dsarag.indexer_model.cuda_graph import GraphedDecoder
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.indexer import LightningIndexer
from dsarag.indexer_model.model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

SMALL = ModelArgs(
    model_type="qwen2", vocab_size=512, dim=128, n_layer=3, n_head=4, n_kv_head=2, head_dim=32,
    intermediate_size=256, rope_base=1e4, norm_eps=1e-6, max_seq_len=4096, qkv_bias=True, tie_embeddings=False,
)  # fmt: skip


def decode_logits(
    model: Transformer, prompt: torch.Tensor, tokens: torch.Tensor, dsa: DSAConfig | None, graphed: bool
):
    """Logits of each decode step after a prefill of `prompt`, fed `tokens` (B, steps) one at a time."""
    n, steps = prompt.shape[1], tokens.shape[1]
    model.clear_caches()
    model.setup_caches(prompt.shape[0], n + steps + 4)  # spare slots the whole-cache mask must hide
    model(prompt, torch.arange(n, device="cuda"), dsa=dsa)
    decoder = GraphedDecoder(model, prompt.shape[0], n, dsa) if graphed else None
    logits = []
    for step in range(steps):
        token, position = tokens[:, step : step + 1], n + step
        if decoder is not None:
            logits.append(decoder(token, position).float().clone())
        else:
            logits.append(model(token, torch.tensor([position], device="cuda"), dsa=dsa)[:, -1].float())
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("dsa", [None, DSAConfig(topk=256, dense_threshold=0)], ids=["dense", "sparse"])
@torch.inference_mode()
def test_graphed_decode_steps_give_the_eager_logits(dsa):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(SMALL)
        indexers = torch.nn.ModuleList(
            LightningIndexer(SMALL.dim, SMALL.rope_base) for _ in range(SMALL.n_layer)
        )
    model = model.to(torch.bfloat16).eval()
    model.attach_indexers(indexers)
    prompt = torch.randint(0, SMALL.vocab_size, (2, 1000), device="cuda")
    tokens = torch.randint(0, SMALL.vocab_size, (2, 12), device="cuda")
    eager = decode_logits(model, prompt, tokens, dsa, graphed=False)
    graphed = decode_logits(model, prompt, tokens, dsa, graphed=True)
    torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2)
