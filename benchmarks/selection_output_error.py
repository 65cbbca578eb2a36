"""What two indexer checkpoints' selections keep, per layer and head: attention mass and attention output.

For the last `--rows` queries of each held-out window, one dense forward gives every layer's q, k, v (each layer
fed the dense hidden states). Each checkpoint selects `--topk` keys per query (sinks and window included), and for
every head this reports the share of its own attention mass the set keeps and the relative error of its sparse
attention output (the kept probabilities renormalized, times v) against the dense output: why a checkpoint with
more mass can give a worse perplexity (docs/history.md). With `--drift`, it also runs the whole model on the first
window, dense and then with each checkpoint's DSA, and reports each layer's relative drift of the hidden states
from dense over the last `--drift-rows` positions, and the mean NLL there.

    .venv/bin/python benchmarks/selection_output_error.py --heldout heldout.npy --checkpoints \
        indexer_model/checkpoints/qwen2.5-coder-0.5b-instruct CANDIDATE --length 16384 --topk 512
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer_model.checkpoint import load_checkpoint  # noqa: E402
from indexer_model.dsa import DSAConfig  # noqa: E402
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


@torch.no_grad()
def hidden_state_drift(
    model: Transformer, checkpoints: dict[str, torch.nn.ModuleList], tokens: np.ndarray, topk: int, rows: int
) -> dict[str, dict]:
    """Per checkpoint: each layer's mean |h_dsa - h_dense| / |h_dense| over the last `rows` positions of `tokens`
    (the next-token targets are `tokens` shifted by one), and the mean NLL there; "dense" has the NLL alone."""
    inputs = torch.from_numpy(tokens[:-1].astype(np.int64))[None]
    targets = torch.from_numpy(tokens[-rows:].astype(np.int64))
    positions = torch.arange(inputs.shape[1])
    split = inputs.shape[1] - rows
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _, __, out, i=i: outputs.__setitem__(i, out[0].float()))
        for i, layer in enumerate(model.layers)
    ]

    def run(dsa: DSAConfig | None) -> tuple[dict[int, torch.Tensor], float]:
        model.setup_caches(1, inputs.shape[1])
        model(inputs[:, :split], positions[:split], last_logits_only=True, dsa=dsa)
        logits = model(inputs[:, split:], positions[split:], last_logits_only=False, dsa=dsa)
        return dict(outputs), float(torch.nn.functional.cross_entropy(logits[0].float(), targets))

    dense, dense_nll = run(None)
    result: dict[str, dict] = {"dense": {"nll": round(dense_nll, 4)}}
    for name, indexers in checkpoints.items():
        model.attach_indexers(copy.deepcopy(indexers))  # attaching casts them to the model's dtype
        hidden, nll = run(DSAConfig(topk=topk, dense_threshold=0))
        drift = [
            float(((hidden[i] - dense[i]).norm(dim=-1) / dense[i].norm(dim=-1)).mean()) for i in sorted(dense)
        ]
        result[name] = {"nll": round(nll, 4), "drift": [round(d, 4) for d in drift]}
    for hook in hooks:
        hook.remove()
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
    parser.add_argument("--drift", action="store_true", help="also the whole-model drift on the first window")
    parser.add_argument("--drift-rows", type=int, default=1024)
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
    report = {"windows": starts, "summary": summary, "runs": runs}
    if options.drift:
        window = tokens[starts[0] : starts[0] + options.length + 1]
        report["drift"] = hidden_state_drift(model, checkpoints, window, options.topk, options.drift_rows)
        summary["drift"] = report["drift"]
    print(json.dumps(summary, indent=1))
    if options.out:
        options.out.write_text(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
