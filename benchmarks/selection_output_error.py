"""What two indexer checkpoints' selections keep, per layer and head: attention mass and attention output.

For the last `--rows` queries of each held-out window, one dense forward gives every layer's q, k, v (each layer
fed the dense hidden states). Each checkpoint selects `--topk` keys per query (sinks and window included), and for
every head this reports the share of its own attention mass the set keeps and the relative error of its sparse
attention output (the kept probabilities renormalized, times v) against the dense output. Session 18 used it to
ask why a checkpoint with more mass gave a worse perplexity (docs/benchmarks.md).

    .venv/bin/python benchmarks/selection_output_error.py --heldout heldout.npy --checkpoints \
        indexer_model/checkpoints/qwen2.5-coder-0.5b-instruct CANDIDATE --length 16384 --topk 512
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer_model.checkpoint import load_checkpoint  # noqa: E402
from indexer_model.indexer import select_topk_sets  # noqa: E402
from indexer_model.model import Transformer, rope_cos_sin  # noqa: E402
from indexer_model.train import N_SINK, WINDOW, load_frozen_model, window_starts  # noqa: E402


@torch.no_grad()
def mass_and_output_error(
    model: Transformer, checkpoints: dict[str, torch.nn.ModuleList], tokens: np.ndarray, topk: int, rows: int
) -> dict[str, dict[str, list[list[float]]]]:
    """Per checkpoint: `mass` and `error`, each (layers x heads), means over the window's last `rows` queries."""
    length = len(tokens)
    positions = torch.arange(length)
    queries = positions[length - rows :]
    rope = rope_cos_sin(positions, model.args.head_dim, model.args.rope_base)
    x = model.tok_embeddings(torch.from_numpy(tokens.astype(np.int64))[None])
    result = {name: {"mass": [], "error": []} for name in checkpoints}
    for index, layer in enumerate(model.layers):
        h = layer.attention_norm(x)
        q, k, v = layer.attention.project(h, rope)
        group = q.shape[1] // k.shape[1]
        keys, values = (t.float().repeat_interleave(group, dim=1)[0] for t in (k, v))
        scores = q[0, :, length - rows :].float() @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(positions[None] > queries[:, None], float("-inf")).softmax(dim=-1)
        dense = probs @ values
        for name, indexers in checkpoints.items():
            idx_q, idx_w, idx_k = indexers[index].project(h.float(), positions)
            chosen = select_topk_sets(
                idx_q[:, -rows:], idx_w[:, -rows:], idx_k, queries, length, topk, N_SINK, WINDOW
            )
            kept = torch.zeros(rows, length, dtype=torch.bool).scatter_(1, chosen[0].clamp(min=0), True)
            kept_probs = probs * kept
            mass = kept_probs.sum(dim=-1)
            sparse = (kept_probs / mass[..., None]) @ values
            error = (sparse - dense).norm(dim=-1) / dense.norm(dim=-1)
            result[name]["mass"].append(mass.mean(dim=-1).tolist())
            result[name]["error"].append(error.mean(dim=-1).tolist())
        x = layer(x, rope, positions, length)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument(
        "--windows", type=int, default=2, help="spread evenly, as the report's recall windows"
    )
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    model = load_frozen_model(options.model, "cpu")
    checkpoints = {
        str(path): load_checkpoint(path, model.args.dim, model.args.n_layer) for path in options.checkpoints
    }
    tokens = np.load(options.heldout)
    starts = window_starts(len(tokens), options.length, options.windows)
    runs = [
        mass_and_output_error(model, checkpoints, tokens[s : s + options.length], options.topk, options.rows)
        for s in starts
    ]
    summary = {
        name: {key: round(float(np.mean([run[name][key] for run in runs])), 4) for key in ("mass", "error")}
        for name in checkpoints
    }
    print(json.dumps(summary, indent=1))
    if options.out:
        options.out.write_text(json.dumps({"windows": starts, "summary": summary, "runs": runs}) + "\n")


if __name__ == "__main__":
    main()
