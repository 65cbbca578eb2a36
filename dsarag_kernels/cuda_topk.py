"""The top-k in CUDA (topk_rows.cu), compiled at first use with NVRTC through PyTorch.

`indexer.topk_select` runs it on prefill chunks (and on decode steps with engine="cuda"). NVRTC ships with
PyTorch's CUDA wheels, so nothing beyond PyTorch is needed; `torch.cuda._compile_kernel` is private API, so a
failure to build makes the engine unusable and `topk_select` says so. `indexer.topk_select_reference` is the
oracle.
"""

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("topk_rows.cu")
# the fastest at 32K, within 3 % at 128K (H100); PREFETCH: how many steps' loads run ahead of the scan
THREADS, MIN_BLOCKS, PREFETCH = 512, 3, 1

log = logging.getLogger(__name__)


def shared_bytes(topk: int, capacity: int) -> int:
    """Dynamic shared memory of one row's lists: columns above the threshold and tied with it, order keys."""
    return 4 * (capacity + topk) + 2 * capacity


@functools.cache
def compiled(shared: int, threads: int = THREADS, min_blocks: int = MIN_BLOCKS, prefetch: int = PREFETCH):
    """The kernel for this GPU, allowed `shared` bytes of dynamic shared memory, or None where it does not
    build (no NVRTC, a PyTorch without the API, too little shared memory)."""
    defines = {"THREADS": threads, "MIN_BLOCKS": min_blocks, "PREFETCH": prefetch}
    try:
        kernel = torch.cuda._compile_kernel(
            SOURCE.read_text(),
            "topk_rows",
            nvcc_options=[f"-D{k}={v}" for k, v in defines.items()] + ["-std=c++17"],
        )
        kernel.set_shared_memory_config(shared)
        return kernel
    except Exception as error:  # any build failure makes the engine unusable, not the caller fail
        log.warning("the CUDA top-k did not build: %s", error)
        return None


def usable(scores: Tensor, topk: int, capacity: int) -> bool:
    """Whether rows of `scores` (B, T, S) bf16 can take the CUDA kernel with lists of `capacity` keys above
    the threshold: 16-byte aligned rows on a GPU."""
    return (
        scores.is_cuda
        and scores.dtype == torch.bfloat16
        and scores.stride(-1) == 1
        and scores.stride(0) % 8 == 0
        and scores.stride(1) % 8 == 0
        and scores.data_ptr() % 16 == 0
        and compiled(shared_bytes(topk, capacity)) is not None
    )


def topk_rows(
    scores: Tensor,
    q_start: int | Tensor,
    n_keys: int,
    topk: int,
    capacity: int,
    out: Tensor,
    status: Tensor,
    threads: int = THREADS,
    min_blocks: int = MIN_BLOCKS,
    prefetch: int = PREFETCH,
) -> None:
    """Each row's top-k into `out` (B, T, topk) int32 in column order, as `indexer.topk_select` (which leaves
    the order open); status (B, T) int32: 2 for the rows that took the radix select over the whole row (more
    than `capacity` keys above the sampled threshold, or fewer than topk at or above it), 0 for the rest.
    q_start: a host int, or a one-element int64 device tensor the kernel reads (a captured decode step).
    `scores` must be `usable`; threads, min_blocks and prefetch pick the launch."""
    batch, n_queries, _ = scores.shape
    assert max(scores.stride(0), scores.stride(1), out.stride(0), out.stride(1)) < 2**31  # C ints
    on_device = isinstance(q_start, Tensor)
    assert not on_device or q_start.dtype == torch.int64
    shared = shared_bytes(topk, capacity)
    compiled(shared, threads, min_blocks, prefetch)(
        grid=(n_queries, batch, 1),
        block=(threads, 1, 1),
        args=[
            scores, out, status, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
            0 if on_device else q_start, n_keys, topk, capacity, q_start if on_device else status, int(on_device),
        ],
        shared_mem=shared,
    )  # fmt: skip
