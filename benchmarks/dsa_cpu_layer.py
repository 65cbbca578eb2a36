"""Where a DSA layer's time goes on the CPU, against dense SDPA, on the default model's real attention inputs.

One dense prefill of held-out text runs through the model; a hook on each chosen layer takes that layer's q, k, v
and indexer projections and times, side by side on the same tensors: dense causal SDPA; the PyTorch path's index
scores + top-k (`select_topk`) and gather attention (`sparse_attention`), for the queries that select (the first
k queries attend to every earlier key and run dense in DSA too); and the same two steps through the compiled CPU
kernels (`dsarag_kernels/cpu_dsa.py`) where they build: on a CPU with AVX512-BF16, where the model runs in bf16,
their bf16 kernels (on AMX where the CPU has it), and beside them the float32 kernels on the same inputs. It also
reports how many keys a block of queries gathers on the PyTorch path (the union of its selections) against k.

    .venv/bin/python benchmarks/dsa_cpu_layer.py --heldout heldout.npy --lengths 8192 16384 --layers 0 9 16 23
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag.indexer_model.checkpoint import load_checkpoint  # noqa: E402
from dsarag.indexer_model.dsa import DSAConfig, dense_attention  # noqa: E402
from dsarag.indexer_model.generate import load_generator  # noqa: E402
from dsarag.kernels import cpu_dsa  # noqa: E402
from dsarag.kernels.torch_dsa import (
    select_topk,  # noqa: E402
    sparse_attention,
    union_of_selections,
)


def seconds(run) -> tuple[float, object]:
    """Wall time of a second, warm call: the first call of a shape pays one-off allocations and thread-pool
    start-up (layer 9's sparse attention at 8K: 1.2-1.4 s cold, 0.7-0.9 s warm)."""
    run()
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def time_layer(attention, x, rope, positions, cfg: DSAConfig, block: int) -> dict:
    """Dense vs DSA pieces for one layer's inputs x (1, T, D)."""
    q, k, v = attention.project(x, rope)
    idx_q, idx_w, idx_k = attention.indexer.project(x, positions)
    n_dense = min(cfg.topk, len(positions))
    rows = slice(n_dense, None)
    dense_s, _ = seconds(lambda: dense_attention(q, k, v, positions))
    prefix_s, _ = seconds(
        lambda: dense_attention(q[:, :, :n_dense], k[:, :, :n_dense], v[:, :, :n_dense], positions[:n_dense])
    )
    topk_s, indices = seconds(
        lambda: select_topk(
            idx_q[:, rows],
            idx_w[:, rows],
            idx_k,
            positions[rows],
            len(positions),
            cfg.topk,
            cfg.n_sink,
            cfg.window,
        )
    )
    scale = q.shape[-1] ** -0.5
    sparse_s, _ = seconds(lambda: sparse_attention(q[:, :, rows], k, v, indices, scale, block))
    unions = [
        len(union_of_selections(indices[0, t0 : t0 + block], len(positions))[0])
        for t0 in range(0, indices.shape[1], block)
    ]
    dsa_s = prefix_s + topk_s + sparse_s
    native = {}
    if cpu_dsa.native_library() is not None:
        args = (idx_q[:, rows], idx_w[:, rows], idx_k, positions[rows], len(positions), cfg.topk)
        native_topk_s, native_indices = seconds(lambda: cpu_dsa.select_topk(*args, cfg.n_sink, cfg.window))
        native_sparse_s, _ = seconds(
            lambda: cpu_dsa.sparse_attention(q[:, :, rows], k, v, native_indices, scale)
        )
        native_s = prefix_s + native_topk_s + native_sparse_s
        bf16 = cpu_dsa.avx512_bf16_ready() and q.dtype == torch.bfloat16
        kind = ("bf16 (AMX)" if cpu_dsa.amx_ready() else "bf16 (AVX512-BF16)") if bf16 else "float32"
        native = {
            "native_select_topk_s": round(native_topk_s, 3),
            "native_sparse_attention_s": round(native_sparse_s, 3),
            "native_dsa_s": round(native_s, 3),
            "native_over_dense": round(native_s / dense_s, 2),
            "native_kernels": kind,
        }
        if bf16:  # beside them, the float32 kernels on the same inputs
            f32 = [x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in args]
            f32_topk_s, _ = seconds(lambda: cpu_dsa.select_topk(*f32, cfg.n_sink, cfg.window))
            q32, k32, v32 = q[:, :, rows].float(), k.float(), v.float()
            f32_sparse_s, _ = seconds(lambda: cpu_dsa.sparse_attention(q32, k32, v32, native_indices, scale))
            native["float32_select_topk_s"] = round(f32_topk_s, 3)
            native["float32_sparse_attention_s"] = round(f32_sparse_s, 3)
    return {
        "dense_s": round(dense_s, 3),
        "dense_prefix_s": round(prefix_s, 3),
        "select_topk_s": round(topk_s, 3),
        "sparse_attention_s": round(sparse_s, 3),
        "dsa_s": round(dsa_s, 3),
        "dsa_over_dense": round(dsa_s / dense_s, 2),
        "union_over_k": round(float(np.mean(unions)) / cfg.topk, 2),
        "dtype": str(q.dtype).removeprefix("torch."),
        **native,
    }


@torch.inference_mode()
def measure(
    heldout: np.ndarray, length: int, layers: list[int], cfg: DSAConfig, block: int, checkpoint: Path | None
) -> dict:
    model = load_generator().model
    if checkpoint is not None:  # another checkpoint of the same base model, e.g. one with a wider layer
        model.attach_indexers(load_checkpoint(checkpoint, model.args.dim, model.args.n_layer))
    model.setup_caches(1, length)
    positions = torch.arange(length)
    results: dict = {}

    def hook(number):
        def run(module, args):
            x, rope, input_pos = args[:3]
            results[number] = time_layer(module, x, rope, input_pos, cfg, block)
            print(f"{length} layer {number}: {results[number]}", file=sys.stderr, flush=True)

        return run

    handles = [model.layers[n].attention.register_forward_pre_hook(hook(n)) for n in layers]
    model(torch.from_numpy(heldout[:length].astype(np.int64))[None], positions, last_logits_only=True)
    for handle in handles:
        handle.remove()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 9, 16, 23])
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--block", type=int, default=64, help="queries per gathered union")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    parser.add_argument("--checkpoint", type=Path, help="indexer checkpoint (default: the shipped one)")
    options = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    heldout = np.load(options.heldout)
    cfg = DSAConfig(topk=options.topk, dense_threshold=0)
    rows = {
        n: measure(heldout, n, options.layers, cfg, options.block, options.checkpoint)
        for n in options.lengths
    }
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "topk": options.topk,
        "checkpoint": str(options.checkpoint or "shipped"),
        "block": options.block,
        "load_average": os.getloadavg()[0],
    }
    print(
        "| tokens | layer | dense SDPA s | DSA: dense prefix s | select_topk s | sparse attention s | DSA s | "
        "DSA / dense | union / k | compiled: select s | compiled: attention s | compiled DSA s | compiled / dense | "
        "compiled kernels | float32 kernels: select s | float32 kernels: attention s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length, layers in rows.items():
        for number, r in layers.items():
            compiled = [
                r.get(key, "-")
                for key in (
                    "native_select_topk_s",
                    "native_sparse_attention_s",
                    "native_dsa_s",
                    "native_over_dense",
                    "native_kernels",
                    "float32_select_topk_s",
                    "float32_sparse_attention_s",
                )
            ]
            print(
                f"| {length} | {number} | {r['dense_s']} | {r['dense_prefix_s']} | {r['select_topk_s']} | "
                f"{r['sparse_attention_s']} | {r['dsa_s']} | {r['dsa_over_dense']}x | {r['union_over_k']} | "
                f"{' | '.join(map(str, compiled))} |"
            )
    if options.out:
        options.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
