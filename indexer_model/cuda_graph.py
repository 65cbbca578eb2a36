"""Decode steps replayed from a CUDA graph: captured once per generation, replayed at every position.

An eager decode step of the default model is a few hundred small kernel launches, so on a GPU it is bound by
the host (≈ 24 ms a token whatever the context, docs/benchmarks.md). A captured step launches them all at once.
It needs fixed shapes and no host sync: the step reads the whole preallocated cache, masked by the position
held in a device tensor (`Transformer.forward(whole_cache=True)`), and the DSA kernels read that position too.
"""

import torch
from torch import Tensor

from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.model import Transformer


class GraphedDecoder:
    """`decoder(tokens (B, 1), position) -> logits (B, V)`, one token per sequence at `position`.

    The logits live in a static buffer that the next call overwrites. Capturing runs one eager step at
    `first_position` (its cache writes are overwritten by the first real step there).
    """

    def __init__(
        self, model: Transformer, batch_size: int, first_position: int, dsa: DSAConfig | None
    ) -> None:
        device = model.output.weight.device
        self.model, self.dsa = model, dsa
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.full((1,), first_position, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # One eager step outside the capture compiles the Triton kernels and warms the allocator.
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> Tensor:
        return self.model(self.tokens, self.position, dsa=self.dsa, whole_cache=True)[:, -1]

    def __call__(self, tokens: Tensor, position: int) -> Tensor:
        if self.dsa is not None and self.dsa.runs_dense(position + 1) and position + 1 > self.dsa.topk:
            # Eager DSA runs dense below its threshold; the captured step would select (k < keys) instead.
            return self.model(tokens, torch.tensor([position], device=tokens.device), dsa=self.dsa)[:, -1]
        for number, layer in enumerate(self.model.layers):  # the host bookkeeping an eager step does
            cache = layer.attention.index_cache
            if cache is None:
                continue
            if self.dsa is not None and number not in self.dsa.dense_layers:
                cache.record(position, position + 1)
            else:
                cache.invalidate_from(position)
        self.tokens.copy_(tokens)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits
