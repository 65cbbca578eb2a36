"""GPU benchmark of the DSA kernels against the fastest dense attention on the card, side by side in one run.

    python benchmarks/dsa_kernels.py --out results.json [--lengths 8192,32768,...] [--skip-e2e]
    python benchmarks/dsa_kernels.py --out topk.json --lengths 32768,131072 --topk-against old_indexer.py
    python benchmarks/dsa_kernels.py --out engines.json --lengths 32768,131072 --topk-engines
    python benchmarks/dsa_kernels.py --out profile.json --e2e-lengths 32768,131072 --profile

1. Per kernel at the default model's attention shape (14 q / 2 kv heads, d 64; indexer 4 x 64; k = 2048;
   batch 1): ms and TFLOP/s on the work actually done (causal pairs for the indexer, min(t + 1, k) keys per
   query for the sparse attention); the top-k pass in ms and GB/s of scores read.
2. One DSA attention layer (index scores + top-k + gather attention, bf16 and FP8 indexer) against the
   fastest `F.scaled_dot_product_attention` backend at that shape (cuDNN, flash and memory-efficient are each
   timed; the row names the winner); the share of the layer spent in top-k. The gather again with query pairs
   sharing their keys (`pairs=True`), on these selections and on selections whose neighbours share keys.
   Decode: DSA against the faster of flash-forced SDPA and the project's split dense decode kernel (flash
   decoding).
3. End to end: the default model's architecture (random weights: speed does not depend on them; RoPE
   positions beyond the trained 32K are fine for speed) prefill dense vs DSA, and one decode step at batch 1
   and 16 with caches of L tokens, eager and replayed from a CUDA graph (`GraphedDecoder`, as `generate` runs);
   both again with the indexer's projection, RMSNorm and RoPE in PyTorch instead of one Triton launch each.
4. `--topk-against PATH` (alone): `topk_select` against the one in a copy of dsarag_kernels/indexer.py (say
   `git show REV:dsarag_kernels/indexer.py > old_indexer.py`), prefill (every query chunk) and decode (batch 1
   and 16, replayed from a CUDA graph), on index scores from random weights, from weights all negative (every
   score ≤ 0: keys whose logits are all ≤ 0 tie at 0, the maximum) and from negative weights whose logits are
   all negative (every key but the sinks and window ties at 0); with the share of rows that needed the radix
   select over the whole row.
5. `--topk-engines` (alone): the CUDA top-k (`dsarag_kernels/cuda_topk.py`) against the Triton one, prefill
   chunks on the same three kinds of scores, with the rows whose key sets differ; the CUDA kernel alone with
   1 to 4 steps of loads in flight ahead of its scan (`PREFETCH`); decode steps at batch 1 and 16 (graphed).
6. `--profile` (alone): the GPU kernels of one model prefill and one decode step (eager; the same kernels a
   graph replays), dense and DSA, at the end-to-end lengths: launches, device ms and the longest kernels.
Every random input is seeded; every timing is the median of repeated runs (at least 5) after warm-up.
"""

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsarag.indexer_model.cuda_graph import GraphedDecoder  # noqa: E402
from dsarag.indexer_model.dsa import DSAConfig  # noqa: E402
from dsarag.indexer_model.indexer import LightningIndexer  # noqa: E402
from dsarag.indexer_model.model import ModelArgs, Transformer  # noqa: E402
from dsarag.kernels import cuda_topk  # noqa: E402
from dsarag.kernels.indexer import index_scores, quantize_fp8, select_topk, topk_select  # noqa: E402
from dsarag.kernels.sparse_attention import (  # noqa: E402
    dense_attention_decode,
    sparse_attention_decode,
    sparse_attention_prefill,
)

HEADS, KV_HEADS, HEAD_DIM, INDEX_HEADS, INDEX_DIM, TOPK = 14, 2, 64, 4, 64, 2048
DEFAULT_MODEL = ModelArgs(  # Qwen2.5-Coder-0.5B-Instruct (docs/design.md)
    model_type="qwen2",
    vocab_size=151936,
    dim=896,
    n_layer=24,
    n_head=14,
    n_kv_head=2,
    head_dim=64,
    intermediate_size=4864,
    rope_base=1e6,
    norm_eps=1e-6,
    max_seq_len=131072 + 64,
    qkv_bias=True,
    tie_embeddings=False,
)


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def sparse_pairs(length: int, topk: int) -> int:
    """Sum over queries of min(t + 1, k): the (query, key) pairs the gather attention computes."""
    return causal_pairs(min(length, topk)) + max(0, length - topk) * topk


PREFILL_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
E2E_REPEATS = 5


def time_ms(fn) -> float:
    """Median ms over 100 ms of timed runs, and over at least 5 for a slow call."""
    times = do_bench(fn, warmup=25, rep=100, return_mode="all")
    if len(times) < 5:
        times = do_bench(fn, warmup=0, rep=6 * max(times), return_mode="all")
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph: a decode step is a handful of tiny kernels, and launching them from
    Python would measure the launcher (as gpt-fast, real decoding loops replay graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def dense_sdpa(q, k, v, backend: SDPBackend = SDPBackend.FLASH_ATTENTION):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def fastest(candidates: dict) -> tuple[str, float, dict]:
    """Build and time each candidate (name → a function returning the call to time); one that this card or
    shape cannot run is left out. The fastest's name, its ms, and every candidate's ms or why it did not run."""
    timings = {}
    for name, build in candidates.items():
        try:
            fn = build()
            fn()
            timings[name] = time_ms(fn)
        except RuntimeError as error:  # e.g. no cuDNN attention for this shape or build
            timings[name] = f"unavailable: {str(error).splitlines()[0][:120]}"
    ran = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
    best = min(ran, key=ran.__getitem__)
    return best, ran[best], timings


def pair_union(indices: Tensor, pairs: int = 4096) -> float:
    """The mean number of keys that the last `pairs` pairs of neighbouring queries chose together, in units of k:
    2 when they share none, 1 when they chose the same keys."""
    rows = indices[0, -2 * pairs :].long()
    both = torch.cat((rows[0::2], rows[1::2]), dim=-1).sort(dim=-1).values
    repeated = ((both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)).sum(-1)
    chosen = (both >= 0).sum(-1)
    return ((chosen - repeated).float().mean() / indices.shape[-1]).item()


def layer_row(length: int, fp8_too: bool) -> dict:
    """Kernels and one attention layer at context `length`, batch 1, bf16."""
    device = "cuda"
    torch.manual_seed(length)
    q = torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
    idx_q = torch.randn(1, length, INDEX_HEADS, INDEX_DIM, device=device, dtype=torch.bfloat16)
    idx_w = torch.randn(1, length, INDEX_HEADS, device=device, dtype=torch.bfloat16)
    idx_k = torch.randn(1, length, INDEX_DIM, device=device, dtype=torch.bfloat16)
    # as dsarag_kernels.indexer.select_topk: 2 GiB of bf16 scores
    chunk = max(1, min(length, (1 << 30) // length))
    buffer = torch.empty(1, chunk, length, dtype=torch.bfloat16, device=device)
    indices = torch.empty(1, length, TOPK, dtype=torch.int32, device=device)

    quantized = (*quantize_fp8(idx_q), *quantize_fp8(idx_k))

    def run_indexer(fp8: bool = False, scores: bool = True, topk: bool = True):
        """index_scores and/or topk_select over the query chunks, as dsarag_kernels.indexer.select_topk runs them."""
        for t0 in range(0, length, chunk):
            rows = slice(t0, min(t0 + chunk, length))
            out = buffer[:, : rows.stop - t0]
            if scores and fp8:
                q8, q_scale, k8, k_scale = quantized
                index_scores(q8[:, rows], idx_w[:, rows], k8, t0, 4, 64, q_scale[:, rows], k_scale, out=out)
            elif scores:
                index_scores(idx_q[:, rows], idx_w[:, rows], idx_k, t0, 4, 64, out=out)
            if topk:
                topk_select(out, t0, length, TOPK, out=indices[:, rows])

    run_indexer()
    scale = HEAD_DIM**-0.5
    row = {"length": length, "topk": TOPK}
    dense = {
        name: partial(partial, dense_sdpa, q, k, v, backend) for name, backend in PREFILL_BACKENDS.items()
    }
    row["dense_backend"], row["dense_sdpa_ms"], row["dense_backends_ms"] = fastest(dense)
    row["dense_tflops"] = 4 * HEADS * HEAD_DIM * causal_pairs(length) / row["dense_sdpa_ms"] / 1e9
    row["index_scores_ms"] = time_ms(lambda: run_indexer(topk=False))
    row["index_scores_tflops"] = (
        2 * INDEX_HEADS * INDEX_DIM * causal_pairs(length) / row["index_scores_ms"] / 1e9
    )
    # Top-k alone re-reads the buffer (the last chunk's scores): the same bytes and work as a real pass.
    run_indexer(topk=False)
    row["topk_ms"] = time_ms(lambda: run_indexer(scores=False))
    row["topk_gbps"] = 2 * causal_pairs(length) / row["topk_ms"] / 1e6  # the bf16 scores, read once
    row["sparse_attention_ms"] = time_ms(lambda: sparse_attention_prefill(q, k, v, indices, scale))
    row["sparse_attention_tflops"] = (
        4 * HEADS * HEAD_DIM * sparse_pairs(length, TOPK) / row["sparse_attention_ms"] / 1e9
    )
    # Query pairs sharing their gathered keys (rows ascending: the CUDA top-k's order), on these selections and
    # on selections from index queries shared by each pair, plus noise (the shipped indexers' neighbouring pairs
    # share half to two thirds of their keys: docs/benchmarks.md, "Neighbouring queries' selections")
    row["pair_union"] = pair_union(indices)
    row["sparse_attention_pairs_ms"] = time_ms(
        lambda: sparse_attention_prefill(q, k, v, indices, scale, pairs=True)
    )
    shared_q = idx_q.clone()
    shared_q[:, 1::2] = 0.8 * idx_q[:, 0::2] + 0.6 * idx_q[:, 1::2]
    shared_w = idx_w.clone()
    shared_w[:, 1::2] = idx_w[:, 0::2]
    correlated = select_topk(shared_q, shared_w, idx_k, 0, length, TOPK)
    row["correlated_pair_union"] = pair_union(correlated)
    row["sparse_attention_correlated_ms"] = time_ms(
        lambda: sparse_attention_prefill(q, k, v, correlated, scale)
    )
    row["sparse_attention_correlated_pairs_ms"] = time_ms(
        lambda: sparse_attention_prefill(q, k, v, correlated, scale, pairs=True)
    )
    row["dsa_layer_ms"] = time_ms(lambda: (run_indexer(), sparse_attention_prefill(q, k, v, indices, scale)))
    row["speedup_vs_dense"] = row["dense_sdpa_ms"] / row["dsa_layer_ms"]
    row["topk_share"] = row["topk_ms"] / row["dsa_layer_ms"]
    if fp8_too:
        row["index_scores_fp8_ms"] = time_ms(lambda: run_indexer(fp8=True, topk=False))
        row["dsa_layer_fp8_ms"] = time_ms(
            lambda: (run_indexer(fp8=True), sparse_attention_prefill(q, k, v, indices, scale))
        )
        row["speedup_vs_dense_fp8"] = row["dense_sdpa_ms"] / row["dsa_layer_fp8_ms"]
    flops_dense = 4 * HEADS * HEAD_DIM * causal_pairs(length)
    flops_dsa = 4 * HEADS * HEAD_DIM * sparse_pairs(
        length, TOPK
    ) + 2 * INDEX_HEADS * INDEX_DIM * causal_pairs(length)
    row["flop_ratio"] = flops_dense / flops_dsa
    return row


def decode_row(length: int, batch: int) -> dict:
    """Kernel-level decode: one new query per sequence over `length` cached keys."""
    device = "cuda"
    torch.manual_seed(length * 1000 + batch)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx_q = torch.randn(batch, 1, INDEX_HEADS, INDEX_DIM, device=device, dtype=torch.bfloat16)
    idx_w = torch.randn(batch, 1, INDEX_HEADS, device=device, dtype=torch.bfloat16)
    idx_k = torch.randn(batch, length, INDEX_DIM, device=device, dtype=torch.bfloat16)
    k8, k_scale = quantize_fp8(idx_k)  # FP8 index keys as a cache would hold them
    q8, q_scale = quantize_fp8(idx_q)
    scores = torch.empty(batch, 1, length, dtype=torch.bfloat16, device=device)
    scale = HEAD_DIM**-0.5

    def dsa(fp8: bool, split: int | None = None):
        if fp8:
            index_scores(q8, idx_w, k8, length - 1, 4, 64, q_scale, k_scale, out=scores)
        else:
            index_scores(idx_q, idx_w, idx_k, length - 1, 4, 64, out=scores)
        indices = topk_select(scores, length - 1, length, TOPK, split=split)
        return sparse_attention_decode(q, k, v, indices, scale)

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def sdpa_default():
        grouped = q.view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        return F.scaled_dot_product_attention(grouped, k, v)

    position = torch.tensor([length - 1], device=device)
    dense = {
        "sdpa-flash": partial(graphed, sdpa_flash),
        "split-kernel": partial(graphed, lambda: dense_attention_decode(q, k, v, position, scale)),
        "sdpa-default": partial(graphed, sdpa_default),
    }
    row = {"length": length, "batch": batch, "cuda_graphs": True}
    row["dense_backend"], row["dense_ms"], row["dense_backends_ms"] = fastest(dense)
    row["dsa_ms"] = time_ms(graphed(lambda: dsa(False)))
    row["dsa_fp8_ms"] = time_ms(graphed(lambda: dsa(True)))
    row["dsa_one_program_per_row_ms"] = time_ms(
        graphed(lambda: dsa(False, split=1))
    )  # before the split top-k
    row["speedup"] = row["dense_ms"] / row["dsa_ms"]
    row["speedup_fp8"] = row["dense_ms"] / row["dsa_fp8_ms"]
    return row


def tune(length: int) -> dict:
    """Launch parameters of each kernel at one length: where the layer's time goes and what moves it."""
    device, scale = "cuda", HEAD_DIM**-0.5
    q = torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx_q = torch.randn(1, length, INDEX_HEADS, INDEX_DIM, device=device, dtype=torch.bfloat16)
    idx_w = torch.randn(1, length, INDEX_HEADS, device=device, dtype=torch.bfloat16)
    idx_k = torch.randn(1, length, INDEX_DIM, device=device, dtype=torch.bfloat16)
    rows = min(length, 8192)  # one chunk of queries: the last (longest) rows
    t0 = length - rows
    buffer = torch.empty(1, rows, length, dtype=torch.bfloat16, device=device)
    indices = torch.empty(1, length, TOPK, dtype=torch.int32, device=device)
    result = {"length": length, "rows": rows, "index_scores": [], "topk": [], "attention": []}
    for block_q, block_k, warps in [(64, 128, 4), (128, 128, 8), (128, 64, 4), (64, 256, 8), (128, 256, 8)]:
        run = partial(index_scores, idx_q[:, t0:], idx_w[:, t0:], idx_k, t0, 4, 64, out=buffer)
        ms = time_ms(partial(run, block_q=block_q, block_k=block_k, num_warps=warps))
        result["index_scores"].append({"block_q": block_q, "block_k": block_k, "warps": warps, "ms": ms})
    index_scores(idx_q[:, t0:], idx_w[:, t0:], idx_k, t0, 4, 64, out=buffer)
    for block, warps in [(256, 1), (512, 2), (512, 4), (1024, 2), (1024, 4), (2048, 8)]:
        run = partial(topk_select, buffer, t0, length, TOPK, out=indices[:, t0:])
        result["topk"].append(
            {"block": block, "warps": warps, "ms": time_ms(partial(run, block=block, num_warps=warps))}
        )
    for t in range(0, length, rows):  # every query gets a real selection for the attention sweep
        n = min(rows, length - t)
        index_scores(idx_q[:, t : t + n], idx_w[:, t : t + n], idx_k, t, 4, 64, out=buffer[:, :n])
        topk_select(buffer[:, :n], t, length, TOPK, out=indices[:, t : t + n])
    for block_n, warps, stages in [(32, 1, 3), (32, 1, 4), (16, 1, 3), (64, 1, 3), (32, 2, 3), (64, 2, 2)]:
        run = partial(sparse_attention_prefill, q, k, v, indices, scale, block_n=block_n)
        ms = time_ms(partial(run, num_warps=warps, num_stages=stages))
        result["attention"].append({"block_n": block_n, "warps": warps, "stages": stages, "ms": ms})
    for block_n, warps, stages in [(32, 1, 3), (32, 1, 2), (16, 1, 3), (32, 4, 3), (64, 4, 2)]:  # query pairs
        run = partial(sparse_attention_prefill, q, k, v, indices, scale, block_n=block_n, pairs=True)
        ms = time_ms(partial(run, num_warps=warps, num_stages=stages))
        result["attention"].append(
            {"pairs": True, "block_n": block_n, "warps": warps, "stages": stages, "ms": ms}
        )
    return result


def load_indexer_copy(path: Path):
    """A copy of dsarag_kernels/indexer.py (another revision's) as a module of its own."""
    spec = importlib.util.spec_from_file_location("indexer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Triton reads a kernel's source through its module
    spec.loader.exec_module(module)
    return module


def index_inputs(kind: str, batch: int, n_queries: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Index queries, weights and keys: "random" as everywhere here, "negative" weights (the scores' maximum is
    0, which 1 key in 16 scores: all 4 logits ≤ 0), "all-tied" (negative weights, logits all negative)."""
    idx_q = torch.randn(batch, n_queries, INDEX_HEADS, INDEX_DIM, device="cuda", dtype=torch.bfloat16)
    idx_w = torch.randn(batch, n_queries, INDEX_HEADS, device="cuda", dtype=torch.bfloat16)
    idx_k = torch.randn(batch, length, INDEX_DIM, device="cuda", dtype=torch.bfloat16)
    if kind != "random":
        idx_w = -idx_w.abs()
    if kind == "all-tied":
        idx_q, idx_k = -idx_q.abs(), idx_k.abs()
    return idx_q, idx_w, idx_k


def last_chunk_scores(kind: str, length: int) -> Tensor:
    """Seeded index scores (`index_inputs`) of the last query chunk at `length`, chunked as select_topk: 2 GiB
    of bf16 scores."""
    torch.manual_seed(length)
    idx_q, idx_w, idx_k = index_inputs(kind, 1, length, length)
    t_last = length - max(1, min(length, (1 << 30) // length))
    return index_scores(idx_q[:, t_last:], idx_w[:, t_last:], idx_k, t_last, 4, 64)


def topk_prefill(select, scores: Tensor, length: int, indices: Tensor, **options) -> list:
    """Every query chunk's top-k, each re-reading the last chunk's scores (as layer_row's top-k timing)."""
    chunk = scores.shape[1]
    return [
        select(
            scores[:, : min(chunk, length - t0)], t0, length, TOPK, out=indices[:, t0 : t0 + chunk], **options
        )
        for t0 in range(0, length, chunk)
    ]


def topk_against(lengths: list[int], batches: list[int], baseline_path: Path) -> list[dict]:
    """`topk_select` against a baseline copy's, prefill and decode, on each kind of index scores."""
    baseline = load_indexer_copy(baseline_path)
    rows = []
    for length in lengths:
        for kind in ("random", "negative", "all-tied"):
            scores = last_chunk_scores(kind, length)
            indices = torch.empty(1, length, TOPK, dtype=torch.int32, device="cuda")
            passes = topk_prefill(topk_select, scores, length, indices, return_fallback=True)
            row = {"length": length, "scores": kind, "pass": "prefill"}
            row["whole_row_share"] = sum(int(whole_row.sum()) for _, whole_row in passes) / length
            row["ms"] = time_ms(partial(topk_prefill, topk_select, scores, length, indices))
            row["baseline_ms"] = time_ms(partial(topk_prefill, baseline.topk_select, scores, length, indices))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del scores, passes
            for batch in batches:
                idx_q, idx_w, idx_k = index_inputs(kind, batch, 1, length)
                scores = index_scores(idx_q, idx_w, idx_k, length - 1, 4, 64)
                _, whole_row = topk_select(scores, length - 1, length, TOPK, return_fallback=True)
                row = {"length": length, "scores": kind, "pass": f"decode b{batch}"}
                row["whole_row_share"] = whole_row.float().mean().item()
                for name, select in (("ms", topk_select), ("baseline_ms", baseline.topk_select)):
                    row[name] = time_ms(graphed(partial(select, scores, length - 1, length, TOPK)))
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


CUDA_PREFETCH = (1, 2, 3, 4)


def cuda_kernel_alone(
    scores: Tensor, q_start: int, n_keys: int, topk: int, out: Tensor, prefetch: int
) -> None:
    """The CUDA top-k kernel alone, at a depth of loads in flight."""
    status = torch.empty(scores.shape[:2], dtype=torch.int32, device=scores.device)
    cuda_topk.topk_rows(scores, q_start, n_keys, topk, 4 * topk, out, status, prefetch=prefetch)


def topk_engines(lengths: list[int]) -> list[dict]:
    """The CUDA top-k against the Triton one on the same prefill chunks, each kind of index scores: every
    chunk's ms (both engines twice, alternating), and the rows of the last chunk whose key sets differ."""
    rows = []
    for length in lengths:
        for kind in ("random", "negative", "all-tied"):
            scores = last_chunk_scores(kind, length)
            t_last = length - scores.shape[1]
            cuda, whole_row = topk_select(scores, t_last, length, TOPK, engine="cuda", return_fallback=True)
            triton_ = topk_select(scores, t_last, length, TOPK, engine="triton")
            differ = (cuda.sort(-1).values != triton_.sort(-1).values).any(-1)
            row = {"length": length, "scores": kind, "rows_differing": int(differ.sum())}
            row["cuda_whole_row_share"] = whole_row.float().mean().item()
            indices = torch.empty(1, length, TOPK, dtype=torch.int32, device="cuda")
            for engine in ("triton", "cuda", "triton", "cuda"):
                ms = time_ms(partial(topk_prefill, topk_select, scores, length, indices, engine=engine))
                row.setdefault(f"{engine}_ms", []).append(ms)
            # The CUDA kernel alone at each depth of loads in flight ahead of its scan
            for depth in (*CUDA_PREFETCH, *CUDA_PREFETCH):
                kernel = partial(cuda_kernel_alone, prefetch=depth)
                row.setdefault(f"cuda_kernel_prefetch{depth}_ms", []).append(
                    time_ms(partial(topk_prefill, kernel, scores, length, indices))
                )
                kernel(scores, t_last, length, TOPK, out=indices[:, t_last:])
                row[f"cuda_kernel_prefetch{depth}_rows_differing"] = int(
                    (indices[:, t_last:] != cuda).any(-1).sum()
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
            del scores, indices, cuda, triton_
        for batch in (1, 16):  # decode steps, replayed from a CUDA graph: the position on the device
            torch.manual_seed(length * 1000 + batch)
            idx_q, idx_w, idx_k = index_inputs("random", batch, 1, length)
            position = torch.tensor([length - 1], device="cuda")
            scores = index_scores(idx_q, idx_w, idx_k, position, 4, 64)
            picked = {e: topk_select(scores, position, length, TOPK, engine=e) for e in ("triton", "cuda")}
            differ = (picked["cuda"].sort(-1).values != picked["triton"].sort(-1).values).any(-1)
            row = {
                "length": length,
                "scores": "random",
                "pass": f"decode b{batch}",
                "rows_differing": int(differ.sum()),
            }
            for engine in ("triton", "cuda", "triton", "cuda"):
                step = graphed(partial(topk_select, scores, position, length, TOPK, engine=engine))
                row.setdefault(f"{engine}_ms", []).append(time_ms(step))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def default_model_with_indexers() -> Transformer:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(DEFAULT_MODEL)
        indexers = torch.nn.ModuleList(
            LightningIndexer(DEFAULT_MODEL.dim, DEFAULT_MODEL.rope_base) for _ in range(DEFAULT_MODEL.n_layer)
        )
    model = model.to(torch.bfloat16).eval()
    model.attach_indexers(indexers)
    return model


@torch.inference_mode()
def e2e_rows(lengths: list[int], decode_batches: list[int]) -> list[dict]:
    model = default_model_with_indexers()
    dsa = DSAConfig(topk=TOPK)
    triton_backend = model.attention_backend()
    # As before the fused launches: the indexer's projection, RMSNorm and RoPE in PyTorch (their share of a step)
    pytorch_ops = replace(
        triton_backend, project_index=lambda indexer, x, pos: indexer.project(x, pos), rows=None
    )
    modes = (
        ("dense", None, triton_backend),
        ("dsa", dsa, triton_backend),
        ("dense_pytorch_ops", None, pytorch_ops),
        ("dsa_pytorch_ops", dsa, pytorch_ops),
    )
    rows = []
    for length in lengths:
        torch.manual_seed(length)
        row = {"length": length}
        model.setup_caches(1, length + 8)
        tokens = torch.randint(0, DEFAULT_MODEL.vocab_size, (1, length), device="cuda")
        positions = torch.arange(length, device="cuda")
        for name, mode, backend in modes:
            model.use_backend(backend)
            model(tokens, positions, dsa=mode)  # warm-up (Triton compiles on the first call)
            seconds = []
            for _ in range(E2E_REPEATS):
                torch.cuda.synchronize()
                started = time.perf_counter()
                model(tokens, positions, dsa=mode)
                torch.cuda.synchronize()
                seconds.append(time.perf_counter() - started)
            row[f"prefill_{name}_s"] = statistics.median(seconds)
        row["prefill_speedup"] = row["prefill_dense_s"] / row["prefill_dsa_s"]
        for batch in decode_batches:
            model.clear_caches()
            torch.cuda.empty_cache()
            model.setup_caches(batch, length + 8)
            for layer in model.layers:  # caches as after a prefill of `length` tokens (random content)
                attention = layer.attention
                attention.kv_cache.k_cache.normal_()
                attention.kv_cache.v_cache.normal_()
                attention.index_cache.k_cache.normal_()
                attention.index_cache.valid_until = length
            token = torch.randint(0, DEFAULT_MODEL.vocab_size, (batch, 1), device="cuda")
            position = torch.tensor([length], device="cuda")
            for name, mode, backend in modes:
                model.use_backend(backend)
                row[f"decode_b{batch}_{name}_ms"] = time_ms(
                    lambda mode=mode, token=token, position=position: model(token, position, dsa=mode)
                )
                decoder = GraphedDecoder(model, batch, length, mode)  # as `generate` decodes on a GPU
                row[f"decode_b{batch}_{name}_graph_ms"] = time_ms(
                    lambda decoder=decoder, token=token, length=length: decoder(token, length)
                )
                del decoder
            for kind in ("", "_graph"):
                row[f"decode_b{batch}{kind}_speedup"] = (
                    row[f"decode_b{batch}_dense{kind}_ms"] / row[f"decode_b{batch}_dsa{kind}_ms"]
                )
        model.use_backend(triton_backend)
        model.clear_caches()
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def kernel_table(run, repeats: int = 1) -> dict:
    """The GPU kernels `run` launches, from the PyTorch profiler: their count, device ms (a run's), and the 25
    longest (name, ms, launches)."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    events = [e for e in profiler.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    return {
        "launches": sum(e.count for e in events) // repeats,
        "device_ms": sum(e.self_device_time_total for e in events) / 1e3 / repeats,
        "kernels": [
            (e.key[:100], round(e.self_device_time_total / 1e3 / repeats, 3), e.count // repeats)
            for e in events[:25]
        ],
    }


@torch.inference_mode()
def profile_rows(lengths: list[int], decode_batches: list[int]) -> list[dict]:
    """Where the time goes: the kernels of one model prefill and of one decode step (eager, as a CUDA graph
    replays them), dense and DSA, at each length; a decode step's graph-replayed ms beside its device time
    shows what its launches cost."""
    model = default_model_with_indexers()
    dsa = DSAConfig(topk=TOPK)
    rows = []
    for length in lengths:
        torch.manual_seed(length)
        model.setup_caches(max(decode_batches), length + 8)
        tokens = torch.randint(0, DEFAULT_MODEL.vocab_size, (1, length), device="cuda")
        positions = torch.arange(length, device="cuda")
        for name, mode in (("dense", None), ("dsa", dsa)):
            row = {"length": length, "attention": name, "pass": "prefill"}
            row.update(kernel_table(partial(model, tokens, positions, dsa=mode)))
            rows.append(row)
            print(json.dumps(row), flush=True)
        for layer in model.layers:  # the caches as after a prefill of `length` tokens (random content)
            attention = layer.attention
            for cache in (
                attention.kv_cache.k_cache,
                attention.kv_cache.v_cache,
                attention.index_cache.k_cache,
            ):
                cache.normal_()
            attention.index_cache.valid_until = length
        position = torch.tensor([length], device="cuda")
        for batch in decode_batches:
            token = torch.randint(0, DEFAULT_MODEL.vocab_size, (batch, 1), device="cuda")
            for name, mode in (("dense", None), ("dsa", dsa)):
                step = partial(model, token, position, dsa=mode, whole_cache=True)
                row = {"length": length, "attention": name, "pass": f"decode b{batch}"}
                row.update(kernel_table(step, repeats=5))
                row["graph_ms"] = time_ms(graphed(step))
                rows.append(row)
                print(json.dumps(row), flush=True)
        model.clear_caches()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    parser.add_argument("--e2e-lengths", default="8192,32768,131072")
    parser.add_argument("--decode-batches", default="1,16")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-layers", action="store_true", help="decode rows (and e2e) only")
    parser.add_argument("--tune", type=int, help="only sweep launch parameters at this length")
    parser.add_argument("--skip-decode", action="store_true", help="layer rows (and e2e) only")
    parser.add_argument(
        "--topk-against",
        type=Path,
        help="only time topk_select against this copy of dsarag_kernels/indexer.py",
    )
    parser.add_argument(
        "--topk-engines", action="store_true", help="only time the CUDA top-k against the Triton one"
    )
    parser.add_argument(
        "--profile", action="store_true", help="only the kernel tables of a model prefill and decode step"
    )
    args = parser.parse_args()
    if args.profile:
        rows = profile_rows(
            [int(n) for n in args.e2e_lengths.split(",")], [int(n) for n in args.decode_batches.split(",")]
        )
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "profile": rows}, indent=1))
        return
    if args.topk_engines:
        rows = topk_engines([int(n) for n in args.lengths.split(",")])
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "topk": rows}, indent=1))
        return
    if args.tune:
        args.out.write_text(json.dumps(tune(args.tune), indent=1))
        print(args.out.read_text())
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    batches = [int(n) for n in args.decode_batches.split(",")]
    if args.topk_against:
        rows = topk_against(lengths, batches, args.topk_against)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "topk": rows}, indent=1))
        return
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "layer": [],
        "decode_kernels": [],
        "e2e": [],
    }
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    for length in [] if args.skip_layers else lengths:
        result["layer"].append(layer_row(length, fp8))
        print(json.dumps(result["layer"][-1]), flush=True)
        args.out.write_text(json.dumps(result, indent=1))  # a run cut short keeps its finished rows
    for length in [] if args.skip_decode else lengths:
        for batch in batches:
            result["decode_kernels"].append(decode_row(length, batch))
            print(json.dumps(result["decode_kernels"][-1]), flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    if not args.skip_e2e:
        result["e2e"] = e2e_rows([int(n) for n in args.e2e_lengths.split(",")], batches)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
