"""Decode time per token on the CPU after a long prompt, DSA against dense, on the default model.

One DSA prefill of held-out text fills the KV and index-key caches; then rounds of decode steps alternate between
DSA and dense attention over that same cache (the same positions are rewritten each round), and the median step of
each round is printed with the DSA / dense ratio. Then one DSA step is taken apart in one layer (`--layer`), on
its real input and caches: the indexer's projection, the selection and the gather attention against dense
attention over the same cache (median of warm calls).

    .venv/bin/python benchmarks/dsa_cpu_decode.py --heldout heldout.npy --length 8192
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer_model.dsa import DSAConfig, dense_attention, dsa_attention  # noqa: E402
from indexer_model.generate import decode_one_token, load_generator, prefill  # noqa: E402


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
        n_keys = position + 1  # the cache rows at `position` hold an earlier round's step
        k, v = (cache[:, :, :n_keys] for cache in (module.kv_cache.k_cache, module.kv_cache.v_cache))
        idx_q, idx_w, _ = module.indexer.project(x, input_pos)
        idx_k = module.index_cache.k_cache[:, :n_keys]
        sparse = cfg.for_layer(module.indexer.topk_scale)
        timings["index projection"] = median_ms(lambda: module.indexer.project(x, input_pos))
        timings["DSA attention (selection + gather)"] = median_ms(
            lambda: dsa_attention(q, k, v, idx_q, idx_w, idx_k, input_pos, n_keys, sparse)
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
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, DSA and dense alternating")
    parser.add_argument("--layer", type=int, default=9, help="the layer whose DSA step is taken apart")
    options = parser.parse_args()
    tokens = np.load(options.heldout).astype(np.int64)
    model = load_generator().model
    model.setup_caches(1, options.length + options.steps)
    dsa = DSAConfig(topk=options.topk, dense_threshold=0)
    started = time.perf_counter()
    prefill(model, torch.from_numpy(tokens[: options.length])[None], torch.arange(options.length), dsa)
    print(f"DSA prefill of {options.length} tokens: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    token = torch.tensor([[int(tokens[options.length])]])
    medians: dict[str, list[float]] = {"dsa": [], "dense": []}
    for _ in range(options.rounds):
        for mode, cfg in (("dsa", dsa), ("dense", None)):
            steps = []
            for step in range(options.steps):
                begun = time.perf_counter()
                decode_one_token(model, token, torch.tensor([options.length + step]), cfg)
                steps.append(time.perf_counter() - begun)
            medians[mode].append(float(np.median(steps)))
            print(f"{mode}: median {medians[mode][-1] * 1000:.0f} ms a token", file=sys.stderr)
    dsa_ms, dense_ms = (1000 * float(np.median(medians[mode])) for mode in ("dsa", "dense"))
    print(f"| {options.length} | {options.topk} | {dense_ms:.0f} | {dsa_ms:.0f} | {dsa_ms / dense_ms:.2f}x |")
    pieces = time_layer_step(model, options.layer, token, options.length, dsa)
    print(f"layer {options.layer}, ms: " + ", ".join(f"{name} {ms:.3f}" for name, ms in pieces.items()))


if __name__ == "__main__":
    main()
