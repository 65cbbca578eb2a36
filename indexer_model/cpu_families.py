"""The compiled CPU kernels' families (AMX, AVX512-BF16, float32) timed side by side on one layer's real DSA
inputs: `capture` saves them from a prefill of the default model, `time_families` times the selection and the
gather attention on each family this CPU runs. Real selections matter: neighbouring queries share keys, unlike
random ones. `benchmarks/dsa_cpu_families.py` is the command line (docs/benchmarks.md).
"""

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsarag.indexer_model.dsa import DSAConfig
from dsarag.kernels import cpu_dsa


class Captured(Exception):
    """Stops the prefill once the chosen layer's inputs are saved."""


@torch.inference_mode()
def capture(heldout: np.ndarray, length: int, layer: int, topk: int, out: Path) -> None:
    """Prefill the default model on `heldout[:length]` up to `layer` and save that layer's DSA inputs to `out`:
    the attention's q, k, v and the indexer's q, w, k in bf16, the queries from the k-th on."""
    from dsarag.indexer_model.generate import load_generator

    model = load_generator().model
    model.setup_caches(1, length)
    positions = torch.arange(length)
    cfg = DSAConfig(topk=topk)

    def save(module: torch.nn.Module, args: tuple) -> None:
        x, rope = args[:2]
        q, k, v = module.project(x, rope)
        idx_q, idx_w, idx_k = module.indexer.project(x, positions)
        rows = slice(topk, None)  # the first k queries select every earlier key: DSA runs them dense
        inputs = {
            "q": q[:, :, rows],
            "k": k,
            "v": v,
            "idx_q": idx_q[:, rows],
            "idx_w": idx_w[:, rows],
            "idx_k": idx_k,
            "layer": layer,
            "topk": topk,
            "n_sink": cfg.n_sink,
            "window": cfg.window,
        }
        bf16 = {
            name: value.bfloat16() if torch.is_tensor(value) and value.is_floating_point() else value
            for name, value in inputs.items()
        }
        torch.save(bf16, out)
        raise Captured

    model.layers[layer].attention.register_forward_pre_hook(save)
    try:
        model(torch.from_numpy(heldout[:length].astype(np.int64))[None], positions, last_logits_only=True)
    except Captured:
        print(f"{out}: layer {layer}'s inputs at {length} tokens, k = {topk}", file=sys.stderr)


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # the first call of a shape pays one-off allocations and thread start-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def time_family(x: dict, dtype: torch.dtype) -> dict:
    """Seconds of the selection and the gather attention on the saved inputs, read in `dtype`."""
    idx_q, idx_w, idx_k, q, k, v = (x[key].to(dtype) for key in ("idx_q", "idx_w", "idx_k", "q", "k", "v"))
    n_keys = k.shape[2]
    positions = torch.arange(n_keys - q.shape[2], n_keys)
    selection = (idx_q, idx_w, idx_k, positions, n_keys, x["topk"], x["n_sink"], x["window"])
    indices = cpu_dsa.select_topk(*selection)
    scale = q.shape[-1] ** -0.5
    return {
        "select_s": round(best_seconds(lambda: cpu_dsa.select_topk(*selection)), 4),
        "attention_s": round(best_seconds(lambda: cpu_dsa.sparse_attention(q, k, v, indices, scale)), 4),
    }


def time_families(path: Path, threads: int) -> list[dict]:
    """time_family for each kernel family this CPU runs: AMX where ready, AVX512-BF16 (AMX hidden), float32."""
    torch.set_num_threads(threads)
    x = torch.load(path)
    families = [("float32", torch.float32, False)]
    if cpu_dsa.avx512_bf16_ready():
        families.insert(0, ("AVX512-BF16", torch.bfloat16, False))
    if cpu_dsa.amx_ready():
        families.insert(0, ("AMX", torch.bfloat16, True))
    amx_ready, rows = cpu_dsa.amx_ready, []
    try:
        for name, dtype, amx in families:
            cpu_dsa.amx_ready = amx_ready if amx else lambda: False
            rows.append({"family": name, **time_family(x, dtype)})
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        cpu_dsa.amx_ready = amx_ready
    return rows
