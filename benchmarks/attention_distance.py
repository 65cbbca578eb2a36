"""Where one layer's attention mass lies by distance, and which of it the indexer's top-k keeps.

    .venv/bin/python benchmarks/attention_distance.py --heldout heldout.npy --layer 0 --length 32768 \
        --checkpoint old=path/to/stage4 --checkpoint new=indexer_model/checkpoints/qwen2.5-coder-0.5b-instruct

For the last `--queries` queries of a held-out window: the layer's dense attention (head-summed, L1-normalized,
as the indexer is trained on) split into distance buckets; per bucket the mass each checkpoint's top-k keeps
and how many of its k keys it spends there, beside the oracle (top-k of the true attention). This is how the
stage-4 indexers' 32K breakdown was traced to layer 0's far-looking heads (docs/history.md).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag.indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint  # noqa: E402
from dsarag.indexer_model.distill import dense_attention_target  # noqa: E402
from dsarag.indexer_model.train import N_SINK, WINDOW, frozen_attention_inputs, load_frozen_model  # noqa: E402
from dsarag.kernels.torch_dsa import select_topk  # noqa: E402

EDGES = (0, 64, 1024, 4096, 8192, 16384, 24576, 32768, 65536, 131072)


def distance_split(target: torch.Tensor, q_positions: torch.Tensor, keep: torch.Tensor | None) -> list[dict]:
    """Per distance bucket: the target's mass (per query), and with `keep` (indices) the kept mass and keys."""
    distance = q_positions[:, None] - torch.arange(target.shape[-1])[None, :]
    kept = None
    if keep is not None:
        kept = torch.zeros_like(target, dtype=torch.bool).scatter_(-1, keep.clamp(min=0), True)
    rows = []
    for low, high in zip(EDGES[:-1], EDGES[1:], strict=True):
        bucket = (distance >= low) & (distance < high)
        if not bucket.any():
            continue
        row = {"from": low, "to": high, "mass": float(target[bucket].sum()) / len(q_positions)}
        if kept is not None:
            row["kept"] = float(target[bucket & kept].sum()) / len(q_positions)
            row["keys"] = float((bucket & kept).sum()) / len(q_positions)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--start", type=int, default=0, help="window start in the held-out stream")
    parser.add_argument("--queries", type=int, default=256, help="the last queries of the window")
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument(
        "--checkpoint", action="append", default=[], help="NAME=FOLDER (repeatable; default: the shipped one)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    options = parser.parse_args()

    torch.set_grad_enabled(False)
    model = load_frozen_model(options.model, "cpu")
    tokens = np.load(options.heldout)[options.start : options.start + options.length].astype(np.int64)
    h, q, k = frozen_attention_inputs(model, torch.from_numpy(tokens)[None], options.layer + 1)[options.layer]
    positions = torch.arange(len(tokens))
    rows = slice(len(tokens) - options.queries, len(tokens))
    target = dense_attention_target(q[:, :, rows], k, positions[rows], block=64)[0]
    forced = (positions[None] < N_SINK) | (positions[None] > positions[rows, None] - WINDOW)
    columns = {"oracle": target.masked_fill(forced, 2.0).topk(options.topk, dim=-1).indices}
    checkpoints = [spec.split("=", 1) for spec in options.checkpoint] or [
        ["shipped", str(find_checkpoint(weights_fingerprint(model)))]
    ]
    for name, folder in checkpoints:
        indexer = load_checkpoint(Path(folder), model.args.dim, model.args.n_layer)[options.layer].float()
        idx_q, idx_w, idx_k = indexer.project(h.float(), positions)
        columns[name] = select_topk(
            idx_q[:, rows], idx_w[:, rows], idx_k, positions[rows], len(tokens), options.topk, N_SINK, WINDOW
        )[0]
    split = {name: distance_split(target, positions[rows], keep) for name, keep in columns.items()}
    result = {"layer": options.layer, "length": len(tokens), "topk": options.topk, "split": split}
    if options.json:
        print(json.dumps(result, indent=1))
        return
    names = list(columns)
    print(f"layer {options.layer}, {len(tokens)} tokens, last {options.queries} queries, k = {options.topk}")
    print("| distance | mass | " + " | ".join(f"{name} kept (keys)" for name in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i, bucket in enumerate(split["oracle"]):
        cells = [f"{split[name][i]['kept']:.3f} ({split[name][i]['keys']:.0f})" for name in names]
        print(f"| {bucket['from']}-{bucket['to']} | {bucket['mass']:.3f} | " + " | ".join(cells) + " |")
    totals = [f"{sum(b['kept'] for b in split[name]):.3f}" for name in names]
    print("| all | 1.000 | " + " | ".join(totals) + " |")


if __name__ == "__main__":
    main()
