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
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag.indexer_model.checkpoint import load_checkpoint  # noqa: E402
from dsarag.indexer_model.quality import hidden_state_drift, mass_and_output_error  # noqa: E402
from dsarag.indexer_model.train import load_frozen_model, window_starts  # noqa: E402


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
