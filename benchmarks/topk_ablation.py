"""Where the two-pass top-k's time goes on the GPU: the candidates kernel with its stages switched off one by one.

    python benchmarks/topk_ablation.py --length 131072 --out ablation.json

Times `dsarag_kernels.indexer.topk_select`'s fast path on the last (longest) 8K query rows at one context length
(random index scores, k = 2048), then copies of its kernel that stop after each stage: the sample sort and
threshold; the pass over the row that only counts keys above the threshold; the same pass with the prefix sum
that gives each candidate its slot; with the candidate stores; and the whole kernel (with the radix select).
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsarag.kernels.indexer import _order_key, _radix_topk, index_scores, topk_select  # noqa: E402

TOPK = 2048


@triton.jit
def _ablated_kernel(
    scores_ptr, cand_ptr, count_ptr, out_ptr, q_start, n_keys, topk, capacity, stride_st, stride_ct, stride_ot,
    SAMPLE: tl.constexpr, BLOCK: tl.constexpr, STAGE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    row_scores = scores_ptr + row * stride_st
    row_cands = cand_ptr + row * stride_ct
    row_len = tl.minimum(q_start + row + 1, n_keys)
    sample_cols = (tl.arange(0, SAMPLE).to(tl.int64) * row_len // SAMPLE).to(tl.int32)
    sample = tl.sort(_order_key(tl.load(row_scores + sample_cols)), descending=True)
    expected = SAMPLE * topk / row_len
    rank = tl.minimum(expected * 1.25 + 4.0 * tl.sqrt(expected) + 8.0, SAMPLE - 1).to(tl.int32)
    threshold = tl.sum(tl.where(tl.arange(0, SAMPLE) == rank, sample, 0), 0)
    n_cands = 0
    if STAGE >= 1:
        for start in range(0, row_len, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            key = _order_key(tl.load(row_scores + cols, mask=cols < row_len, other=float("-inf")))
            keep = (cols < row_len) & (key >= threshold)
            if STAGE >= 2:
                slot = n_cands + tl.cumsum(keep.to(tl.int32), 0) - 1
                if STAGE >= 3:
                    tl.store(row_cands + slot, cols, mask=keep & (slot < capacity))
                else:
                    n_cands += tl.max(slot, 0) - tl.max(slot, 0)  # keep the scan alive
            n_cands += tl.sum(keep.to(tl.int32), 0)
    if STAGE >= 4:
        if (n_cands >= topk) & (n_cands <= capacity):
            _radix_topk(
                row_scores, row_cands, out_ptr + row * stride_ot, n_cands, topk, BLOCK=BLOCK, INDIRECT=True
            )
    tl.store(count_ptr + row, n_cands + threshold)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    length, rows = args.length, 8192
    t0 = length - rows
    q = torch.randn(1, rows, 4, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, rows, 4, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, 64, device="cuda", dtype=torch.bfloat16)
    scores = index_scores(q, w, k, t0, 4, 64)
    out = torch.empty(1, rows, TOPK, dtype=torch.int32, device="cuda")
    cands = torch.empty(rows, 4 * TOPK, dtype=torch.int32, device="cuda")
    counts = torch.empty(rows, dtype=torch.int32, device="cuda")
    result = {"length": length, "rows": rows, "device": torch.cuda.get_device_name()}
    result["topk_select_ms"] = do_bench(
        lambda: topk_select(scores, t0, length, TOPK, out=out), warmup=5, rep=30
    )
    result["bf16_read_floor_ms"] = do_bench(lambda: scores.sum(dtype=torch.float32), warmup=5, rep=30)
    names = [
        "sample_sort",
        "count_pass",
        "count_and_prefix_sum",
        "with_candidate_stores",
        "with_radix_select",
    ]
    for stage, name in enumerate(names):
        for block, warps in [(1024, 4), (2048, 8), (4096, 8)]:
            run = partial(
                _ablated_kernel[(rows,)], scores[0], cands, counts, out[0], t0, length, TOPK, 4 * TOPK,
                scores.stride(1), cands.stride(0), out.stride(1),
                SAMPLE=1024, BLOCK=block, STAGE=stage, num_warps=warps,
            )  # fmt: skip
            result[f"{name}_b{block}_w{warps}_ms"] = do_bench(run, warmup=5, rep=30)
            print(name, block, warps, result[f"{name}_b{block}_w{warps}_ms"], flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
