"""Which layers of one indexer checkpoint to take into another, judged by the model's own loss.

Attention mass per layer need not follow the model's loss (a checkpoint with more mass in every layer can raise
perplexity), so this script asks the loss directly. On selection text (the indexers' training text, never the
held-out text the report measures), it scores the mean NLL of the last `--scored` tokens of `--windows` windows
with `--base`'s indexers, with `--other`'s, and with each single layer of one swapped into the other. It then
writes a checkpoint that takes from `--other` the layers whose swap into `--base` lowers the NLL at every k given,
and scores that mix too.

    python benchmarks/layer_mix.py --model q.gguf --base indexer_model/checkpoints/qwen2.5-coder-0.5b-instruct \
        --other OTHER --data train.npy --length 16384 --windows 8 --topks 512 \
        --out-checkpoint mix --out mix.json

Single swaps add up only in part. With `--sweeps N` the script instead descends layer by layer from `--base`,
over any number of `--other` checkpoints: each layer in turn takes the checkpoint whose layer gives the lowest NLL
(summed over the ks) with every other layer as chosen so far; a sweep that changes nothing ends it. Mind the
selection text: a descent fits its own windows far better than other text (docs/history.md).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dsa_quality import Deadline, load_base_model, run_meta  # noqa: E402
from dsarag.indexer_model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dsarag.indexer_model.layer_mix import assembled, coordinate_descent, mean_nll, single_swaps  # noqa: E402
from dsarag.indexer_model.train import window_starts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the base model (.gguf, folder or HF id)")
    parser.add_argument("--base", type=Path, required=True, help="the checkpoint the mix starts from")
    parser.add_argument(
        "--other",
        type=Path,
        action="append",
        required=True,
        help="a checkpoint whose layers may be taken (repeat it with --sweeps)",
    )
    parser.add_argument("--sweeps", type=int, default=0, help="0: single swaps (one --other); N: descent")
    parser.add_argument("--data", type=Path, required=True, help="selection text: token ids (.npy)")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--scored", type=int, default=1024)
    parser.add_argument("--topks", default="512,2048")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline-s", type=float, default=0, help="stop the descent after this (0 = none)")
    parser.add_argument("--out-checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the measurements as JSON")
    options = parser.parse_args()
    if options.sweeps == 0 and len(options.other) != 1:
        parser.error("single swaps compare two checkpoints: give one --other, or --sweeps N for more")
    topks = [int(k) for k in options.topks.split(",")]
    deadline = Deadline(options.deadline_s)
    started = time.perf_counter()
    model = load_base_model(options.model, options.device, None)
    paths = [options.base, *options.other]
    configs = [json.loads((path / "config.json").read_text()) for path in paths]
    for path, config in zip(paths[1:], configs[1:], strict=True):
        if config["indexer"] != configs[0]["indexer"]:
            raise SystemExit(f"{path}: its indexer config differs from {options.base}'s; mix like with like")
    sources = [load_checkpoint(path, model.args.dim, model.args.n_layer) for path in paths]
    tokens = np.load(options.data)
    starts = window_starts(len(tokens), options.length + 1, options.windows)
    windows = [tokens[s : s + options.length + 1] for s in starts]

    def nll(indexers: nn.ModuleList | None, topk: int | None) -> float:
        return round(mean_nll(model, indexers, windows, options.scored, topk), 5)

    scored: dict[tuple[int, ...], dict[int, float]] = {}  # by layer sources: the descent scores base and mix

    def per_k(choice: list[int]) -> dict[int, float]:
        if tuple(choice) not in scored:
            scored[tuple(choice)] = {k: nll(assembled(sources, choice), k) for k in topks}
        return scored[tuple(choice)]

    def summed(choice: list[int]) -> float:
        value = round(sum(per_k(choice).values()), 5)
        log(f"{choice}: {value}")
        return value

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result: dict = {"dense": nll(None, None), "sources": [str(path) for path in paths]}
    if options.sweeps:
        choice, result["descent"] = coordinate_descent(sources, summed, options.sweeps, deadline.passed)
        result["topks"] = {str(k): {"base": nll_k} for k, nll_k in per_k([0] * len(choice)).items()}
    else:
        choice, result["topks"] = single_swaps(sources[0], sources[1], nll, topks, log)
    for k, nll_k in per_k(choice).items():
        result["topks"][str(k)]["mix"] = nll_k
    result["layer_source"] = choice
    config = configs[0]
    config["layers_from"] = {"sources": result["sources"], "layer_source": choice}
    metrics = json.loads((options.base / "metrics.json").read_text())
    metrics["layer_mix"] = result
    save_checkpoint(options.out_checkpoint, assembled(sources, choice), config, metrics)
    meta = {
        **run_meta(options.device),
        "data": str(options.data),
        "windows": starts,
        "length": options.length,
        "scored": options.scored,
        "seconds": round(time.perf_counter() - started, 1),
    }
    options.out.write_text(json.dumps({"meta": meta, **result}, indent=1))
    print(f"layer sources {choice} of {result['sources']}; wrote {options.out_checkpoint}", file=sys.stderr)


if __name__ == "__main__":
    main()
