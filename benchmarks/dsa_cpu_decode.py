"""Decode time per token on the CPU after a long prompt, DSA against dense, on the default model.

One DSA prefill of held-out text fills the KV and index-key caches; then decode steps alternate between DSA and
dense attention over that same cache, each step rewriting the same next position (on a shared host the speed of
whole steps drifts by a third within a minute; steps side by side run under the same conditions). Two more modes
show what the compiled pieces save: a DSA step with the indexer's projection in PyTorch calls, and a dense step
with the weights' products in PyTorch. The medians of each mode and of its step-by-step ratios to dense are
printed. Then one DSA step is taken apart in one layer (`--layer`), on its real input and caches: the indexer's
projection (as the step runs it, and in PyTorch calls), the selection and the gather attention against dense
attention over the same cache (median of warm calls).

    .venv/bin/python benchmarks/dsa_cpu_decode.py --heldout heldout.npy --length 8192
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag.indexer_model.dsa import DSAConfig, dense_attention, dsa_attention  # noqa: E402
from dsarag.indexer_model.generate import decode_one_token, load_generator, prefill  # noqa: E402
from dsarag.kernels import cpu_dsa  # noqa: E402


def median_ms(run, calls: int = 20) -> float:
    run()
    times = []
    for _ in range(calls):
        begun = time.perf_counter()
        run()
        times.append(time.perf_counter() - begun)
    return 1000 * float(np.median(times))


def time_layer_step(
    model, layer: int, token: torch.Tensor, position: int, cfg: DSAConfig
) -> dict[str, float]:
    """One DSA decode step's pieces in `layer`, on the input a real step gives it, over the filled caches."""
    attention = model.layers[layer].attention
    timings: dict[str, float] = {}

    def hook(module, args):
        x, rope, input_pos = args[:3]
        q, _, _ = module.project(x, rope)
        n_keys = position + 1  # the cache rows at `position` hold the earlier steps' token
        k, v = (cache[:, :, :n_keys] for cache in (module.kv_cache.k_cache, module.kv_cache.v_cache))
        sparse = cfg.for_layer(module.indexer.topk_scale)
        idx_q, idx_w, _ = module.backend.project_index(module.indexer, x, input_pos)
        idx_k = module.index_cache.k_cache[:, :n_keys]
        timings["index projection"] = median_ms(
            lambda: module.backend.project_index(module.indexer, x, input_pos)
        )
        timings["(in PyTorch calls)"] = median_ms(lambda: module.indexer.project(x, input_pos))
        timings["DSA attention (selection + gather)"] = median_ms(
            lambda: dsa_attention(q, k, v, idx_q, idx_w, idx_k, input_pos, n_keys, sparse, module.backend)
        )
        timings["dense attention"] = median_ms(lambda: dense_attention(q, k, v, input_pos))

    handle = attention.register_forward_pre_hook(hook)
    decode_one_token(model, token, torch.tensor([position]), cfg)
    handle.remove()
    return timings


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=24, help="decode steps per mode, the modes alternating")
    parser.add_argument("--layer", type=int, default=9, help="the layer whose DSA step is taken apart")
    options = parser.parse_args()
    tokens = np.load(options.heldout).astype(np.int64)
    model = load_generator().model
    model.setup_caches(1, options.length + 1)
    dsa = DSAConfig(topk=options.topk, dense_threshold=0)
    started = time.perf_counter()
    prefill(model, torch.from_numpy(tokens[: options.length])[None], torch.arange(options.length), dsa)
    print(f"DSA prefill of {options.length} tokens: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    token, position = torch.tensor([[int(tokens[options.length])]]), torch.tensor([options.length])

    # The last two modes each run one compiled piece in PyTorch calls instead, as before it existed: the indexer's
    # projection of a DSA step, and the weights' matrix-vector products of a dense step.
    def in_pytorch(check: str):
        return lambda: mock.patch.object(cpu_dsa, check, lambda *_: False)

    modes = {
        "dsa": (dsa, contextlib.nullcontext),
        "dense": (None, contextlib.nullcontext),
        "dsa, projection in PyTorch": (dsa, in_pytorch("projects_natively")),
        "dense, linears in PyTorch": (None, in_pytorch("runs_linear_rows")),
    }
    steps: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(options.pairs):
        for mode, (cfg, context) in modes.items():
            with context():
                begun = time.perf_counter()
                decode_one_token(model, token, position, cfg)
                steps[mode].append(1000 * (time.perf_counter() - begun))
    for mode, times in steps.items():
        print(f"{mode} steps, ms: {np.round(times).tolist()}", file=sys.stderr)
    dense = np.array(steps["dense"])
    print("| cached tokens | k | mode | ms a token (median) | / dense, median of the step-by-step ratios |")
    for mode, times in steps.items():
        ratio = float(np.median(np.array(times) / dense))
        print(f"| {options.length} | {options.topk} | {mode} | {np.median(times):.0f} | {ratio:.2f}x |")
    pieces = time_layer_step(model, options.layer, token, options.length, dsa)
    print(f"layer {options.layer}, ms: " + ", ".join(f"{name} {ms:.3f}" for name, ms in pieces.items()))


if __name__ == "__main__":
    main()
