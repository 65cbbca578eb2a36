"""Decode time per token on the CPU after a long prompt, DSA against dense, on the default model.

One DSA prefill of held-out text fills the KV and index-key caches; then rounds of decode steps alternate between
DSA and dense attention over that same cache (the same positions are rewritten each round), and the median step of
each round is printed with the DSA / dense ratio.

    .venv/bin/python benchmarks/dsa_cpu_decode.py --heldout heldout.npy --length 8192
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer_model.dsa import DSAConfig  # noqa: E402
from indexer_model.generate import decode_one_token, load_generator, prefill  # noqa: E402


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


if __name__ == "__main__":
    main()
