"""How much the top-k selections of neighbouring queries overlap, on the default model's real inputs.

    .venv/bin/python benchmarks/selection_overlap.py --heldout heldout.npy --length 16384 --layers 0,3,9 --blocks 2,8

A gather attention that shares K/V rows across a block of queries computes every query against the union of
the block's selections; its useful share is k / union. For blocks of consecutive queries (the last
`--queries` queries of a held-out window) this prints the mean union size in units of k, and how many
64-key tiles the block touches out of all of them (a block-sparse kernel skips only the untouched ones).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag.indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint  # noqa: E402
from dsarag.indexer_model.train import N_SINK, WINDOW, frozen_attention_inputs, load_frozen_model  # noqa: E402
from dsarag.kernels.torch_dsa import select_topk  # noqa: E402

TILE = 64


def overlap(selected: torch.Tensor, block: int, topk: int) -> tuple[float, float]:
    """Mean union size (in units of topk) and mean count of touched TILE-key tiles over blocks of queries."""
    unions, tiles = [], []
    for start in range(0, selected.shape[0], block):
        keys = selected[start : start + block]
        keys = keys[keys >= 0]
        unions.append(keys.unique().numel() / topk)
        tiles.append((keys // TILE).unique().numel())
    return float(np.mean(unions)), float(np.mean(tiles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--layers", default="0,3,9", help="comma-separated layers")
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--blocks", default="2,4,8,16,32,64,128", help="comma-separated block sizes")
    options = parser.parse_args()

    torch.set_grad_enabled(False)
    model = load_frozen_model(options.model, "cpu")
    indexers = load_checkpoint(
        find_checkpoint(weights_fingerprint(model)), model.args.dim, model.args.n_layer
    )
    layers = [int(layer) for layer in options.layers.split(",")]
    blocks = [int(block) for block in options.blocks.split(",")]
    tokens = torch.from_numpy(np.load(options.heldout)[: options.length].astype(np.int64))[None]
    inputs = frozen_attention_inputs(model, tokens, max(layers) + 1)
    positions = torch.arange(tokens.shape[1])
    rows = slice(tokens.shape[1] - options.queries, tokens.shape[1])
    n_tiles = -(-tokens.shape[1] // TILE)
    print(f"{tokens.shape[1]} tokens, last {options.queries} queries, k = {options.topk}; union / k, tiles")
    print("| layer | " + " | ".join(f"block {b}" for b in blocks) + " |")
    print("|---|" + "---|" * len(blocks))
    for layer in layers:
        idx_q, idx_w, idx_k = indexers[layer].float().project(inputs[layer][0].float(), positions)
        selected = select_topk(
            idx_q[:, rows],
            idx_w[:, rows],
            idx_k,
            positions[rows],
            len(positions),
            options.topk,
            N_SINK,
            WINDOW,
        )[0]
        cells = [overlap(selected, block, options.topk) for block in blocks]
        print(f"| {layer} | " + " | ".join(f"{u:.2f} k, {t:.0f}/{n_tiles}" for u, t in cells) + " |")


if __name__ == "__main__":
    main()
