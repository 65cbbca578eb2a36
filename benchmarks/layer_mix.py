"""Which layers of one indexer checkpoint to take into another, judged by the model's own loss.

Session 18's boundary-term checkpoint kept more attention mass than stage 6 in every layer, yet raised perplexity
at k = 512: per-layer means did not follow the model's loss. This script asks the loss directly. On selection text
(the indexers' training text, never the held-out text the report measures), it scores the mean NLL of the last
`--scored` tokens of `--windows` windows with `--base`'s indexers, with `--other`'s, and with each single layer
of one swapped into the other. It then writes a checkpoint that takes from `--other` the layers whose swap into
`--base` lowers the NLL at every k given, and scores that mix too.

    python benchmarks/layer_mix.py --model q.gguf --base indexer_model/checkpoints/qwen2.5-coder-0.5b-instruct \
        --other ck-w100c --data train.npy --length 16384 --windows 8 --topks 512 \
        --out-checkpoint /tmp/mix --out mix.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dsa_quality import load_base_model, run_meta, window_nll  # noqa: E402
from indexer_model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from indexer_model.dsa import DSAConfig  # noqa: E402
from indexer_model.model import Transformer  # noqa: E402
from indexer_model.train import window_starts  # noqa: E402


def mixed(base: nn.ModuleList, other: nn.ModuleList, from_other: set[int]) -> nn.ModuleList:
    return nn.ModuleList(other[i] if i in from_other else layer for i, layer in enumerate(base))


def mean_nll(
    model: Transformer,
    indexers: nn.ModuleList | None,
    windows: list[np.ndarray],
    scored: int,
    topk: int | None,
) -> float:
    """Mean NLL per scored token over the windows: dense when `indexers` is None, else DSA at `topk`."""
    dsa = None
    if indexers is not None:
        model.attach_indexers(indexers)
        dsa = DSAConfig(topk=topk, dense_threshold=0)
    return sum(window_nll(model, ids, scored, dsa)[0] for ids in windows) / (scored * len(windows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the base model (.gguf, folder or HF id)")
    parser.add_argument("--base", type=Path, required=True, help="the checkpoint the mix starts from")
    parser.add_argument("--other", type=Path, required=True, help="the checkpoint whose layers may be taken")
    parser.add_argument("--data", type=Path, required=True, help="selection text: token ids (.npy)")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--scored", type=int, default=1024)
    parser.add_argument("--topks", default="512,2048")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out-checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the measurements as JSON")
    options = parser.parse_args()
    topks = [int(k) for k in options.topks.split(",")]
    started = time.perf_counter()
    model = load_base_model(options.model, options.device, None)
    n_layer = model.args.n_layer
    base = load_checkpoint(options.base, model.args.dim, n_layer)
    other = load_checkpoint(options.other, model.args.dim, n_layer)
    tokens = np.load(options.data)
    starts = window_starts(len(tokens), options.length + 1, options.windows)
    windows = [tokens[s : s + options.length + 1] for s in starts]

    def nll(indexers: nn.ModuleList | None, topk: int | None) -> float:
        return round(mean_nll(model, indexers, windows, options.scored, topk), 5)

    result: dict = {"dense": nll(None, None), "topks": {}}
    for k in topks:
        row = {"base": nll(base, k), "other": nll(other, k)}
        row["other_layer_into_base"] = [
            round(nll(mixed(base, other, {i}), k) - row["base"], 5) for i in range(n_layer)
        ]
        row["base_layer_into_other"] = [
            round(nll(mixed(other, base, {i}), k) - row["other"], 5) for i in range(n_layer)
        ]
        result["topks"][str(k)] = row
        print(f"k = {k}: {json.dumps(row)}", file=sys.stderr, flush=True)
    taken = sorted(
        i
        for i in range(n_layer)
        if all(result["topks"][str(k)]["other_layer_into_base"][i] < 0 for k in topks)
    )
    mix = mixed(base, other, set(taken))
    for k in topks:
        result["topks"][str(k)]["mix"] = nll(mix, k)
    result["taken_from_other"] = taken
    config = json.loads((options.base / "config.json").read_text())
    config["layers_from"] = {"checkpoint": str(options.other), "layers": taken}
    metrics = json.loads((options.base / "metrics.json").read_text())
    metrics["layer_mix"] = {"base": str(options.base), "other": str(options.other), **result}
    save_checkpoint(options.out_checkpoint, mix, config, metrics)
    meta = {
        **run_meta(options.device),
        "data": str(options.data),
        "windows": starts,
        "length": options.length,
        "scored": options.scored,
        "seconds": round(time.perf_counter() - started, 1),
    }
    options.out.write_text(json.dumps({"meta": meta, **result}, indent=1))
    print(f"took layers {taken} from {options.other}; wrote {options.out_checkpoint}", file=sys.stderr)


if __name__ == "__main__":
    main()
