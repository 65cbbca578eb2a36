"""The Triton kernels' launches compiled for an H100 (sm_90) without a GPU; run by test_hopper_compile.py in a
process of its own, since the tests' Triton interpreter replaces the kernels with interpreted ones.

    python tests/kernels/hopper_launches.py  ->  one JSON object: launch -> "ok" or the compiler's error
"""

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsarag.kernels import index_projection, indexer, sparse_attention, triton_rows

HOPPER = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "weight_scale", "scale_log2"}


def signature(kernel, pointers: dict[str, str], constants: dict) -> tuple[dict, dict]:
    """Triton's compile signature: the named pointers' element types, fp32 for the float scalars, i32 for the
    other scalars, and the constexprs' values."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*" + pointers.get(name, "bf16")
        else:
            types[name] = "fp32" if name in FLOATS else "i32"
    return types, {(kernel.arg_names.index(name),): value for name, value in constants.items()}


TOPK_POINTERS = {"cand_ptr": "i32", "key_ptr": "i16", "count_ptr": "i32", "status_ptr": "i32", "out_ptr": "i32",
                 "start_ptr": "i64"}  # fmt: skip
ATTENTION = {"N_KV_HEADS": 2, "KV_PER_SET": 2, "GROUP": 7, "G_PAD": 16, "HEAD_DIM": 64, "UPCAST": False}
DECODE_POINTERS = {"idx_ptr": "i32", "m_ptr": "fp32", "l_ptr": "fp32", "acc_ptr": "fp32", "pos_ptr": "i64"}

LAUNCHES = {
    "index scores, bf16": (
        indexer._index_scores_kernel, {"start_ptr": "i64"},
        {"N_HEADS": 4, "HEAD_DIM": 64, "SCALED": False, "UPCAST": False, "BLOCK_Q": 64, "BLOCK_K": 128,
         "START_ON_DEVICE": False}, 4,
    ),
    "index scores, fp8 decode": (
        indexer._index_scores_kernel,
        {"q_ptr": "fp8e4nv", "k_ptr": "fp8e4nv", "q_scale_ptr": "fp32", "k_scale_ptr": "fp32", "start_ptr": "i64"},
        {"N_HEADS": 4, "HEAD_DIM": 64, "SCALED": True, "UPCAST": False, "BLOCK_Q": 16, "BLOCK_K": 128,
         "START_ON_DEVICE": True}, 4,
    ),
    "top-k candidates, prefill": (
        indexer._topk_candidates_kernel, TOPK_POINTERS,
        {"SAMPLE": 1024, "BLOCK": 1024, "SPLIT": 1, "START_ON_DEVICE": False}, 4,
    ),
    "top-k candidates, split decode": (
        indexer._topk_candidates_kernel, TOPK_POINTERS,
        {"SAMPLE": 1024, "BLOCK": 1024, "SPLIT": 16, "START_ON_DEVICE": True}, 4,
    ),
    "top-k merge": (indexer._topk_merge_kernel, TOPK_POINTERS, {"BLOCK": 4096, "SPLIT": 16}, 16),
    "top-k whole row": (indexer._topk_full_kernel, TOPK_POINTERS, {"BLOCK": 4096, "START_ON_DEVICE": True}, 16),
    "gather attention, prefill": (
        sparse_attention._sparse_prefill_kernel, {"idx_ptr": "i32"}, {**ATTENTION, "BLOCK_N": 32}, 1,
    ),
    "gather attention, decode": (
        sparse_attention._sparse_decode_kernel, DECODE_POINTERS, {**ATTENTION, "BLOCK_N": 64, "CONTIGUOUS": False}, 4,
    ),
    "gather attention, query pairs": (
        sparse_attention._sparse_prefill_pairs_kernel, {"idx_ptr": "i32"},
        {**ATTENTION, "G_PAD": 8, "BLOCK_N": 32, "LOG2_K": 12}, 1,
    ),
    "dense decode": (
        sparse_attention._sparse_decode_kernel, DECODE_POINTERS, {**ATTENTION, "BLOCK_N": 64, "CONTIGUOUS": True}, 4,
    ),
    "merge of decode partials": (
        sparse_attention._merge_partials_kernel, {"m_ptr": "fp32", "l_ptr": "fp32", "acc_ptr": "fp32"},
        {"GROUP": 7, "G_PAD": 16, "HEAD_DIM": 64, "SPLITS": 64}, 4,
    ),
    "indexer projection": (
        index_projection._index_rows_kernel, {"positions_ptr": "i64", "inv_freq_ptr": "fp32"},
        {"N_HEADS": 4, "HEAD_DIM": 64, "HALF": 16, "WEIGHTS": 4}, 1,
    ),
    "rms norm": (triton_rows._rms_norm_kernel, {}, {"BLOCK": 1024}, 4),
    "rope": (triton_rows._rope_kernel, {"cos_ptr": "fp32", "sin_ptr": "fp32"}, {"HEADS": 16, "HEAD_DIM": 64}, 2),
}  # fmt: skip


def compile_for_hopper(launch: str) -> None:
    kernel, pointers, constants, num_warps = LAUNCHES[launch]
    types, constexprs = signature(kernel, pointers, constants)
    compiled = triton.compile(
        ASTSource(kernel, types, constexprs=constexprs), target=HOPPER, options={"num_warps": num_warps}
    )
    assert len(compiled.asm["cubin"]) > 0


def main() -> None:
    results = {}
    for launch in LAUNCHES:
        try:
            compile_for_hopper(launch)
            results[launch] = "ok"
        except Exception as error:  # every launch reports, whatever the compiler raises
            results[launch] = f"{type(error).__name__}: {str(error)[-2000:]}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
