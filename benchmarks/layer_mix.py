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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dsa_quality import Deadline, load_base_model, run_meta, window_nll  # noqa: E402
from indexer_model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from indexer_model.dsa import DSAConfig  # noqa: E402
from indexer_model.model import Transformer  # noqa: E402
from indexer_model.train import window_starts  # noqa: E402


def mixed(base: nn.ModuleList, other: nn.ModuleList, from_other: set[int]) -> nn.ModuleList:
    return nn.ModuleList(other[i] if i in from_other else layer for i, layer in enumerate(base))


def assembled(sources: list[nn.ModuleList], choice: list[int]) -> nn.ModuleList:
    """Layer i from checkpoint `choice[i]`."""
    return nn.ModuleList(sources[source][i] for i, source in enumerate(choice))


def same_layer(a: nn.Module, b: nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(
        first[name].shape == second[name].shape and torch.equal(first[name], second[name]) for name in first
    )


def coordinate_descent(
    sources: list[nn.ModuleList],
    score: Callable[[list[int]], float],
    sweeps: int,
    deadline: Deadline,
) -> tuple[list[int], list[dict]]:
    """(the checkpoint each layer comes from, every score taken): from all-`sources[0]`, layer by layer, keep the
    source that lowers `score` most given the other layers' current choice. A layer whose tensors equal those of a
    source already tried is not scored again (a mix shares most of its layers with its parents)."""
    n_layer = len(sources[0])
    distinct = [
        [
            s
            for s in range(len(sources))
            if not any(same_layer(sources[s][i], sources[t][i]) for t in range(s))
        ]
        for i in range(n_layer)
    ]
    choice = [0] * n_layer
    best = score(choice)
    history = [{"sweep": 0, "layer": None, "source": None, "score": best, "kept": True}]
    for sweep in range(1, sweeps + 1):
        moved = False
        for i in range(n_layer):
            for source in distinct[i]:
                if source == choice[i] or deadline.passed():
                    continue
                trial = choice[:i] + [source] + choice[i + 1 :]
                value = score(trial)
                kept = value < best
                history.append({"sweep": sweep, "layer": i, "source": source, "score": value, "kept": kept})
                if kept:
                    choice, best, moved = trial, value, True
        if not moved or deadline.passed():
            break
    return choice, history


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


def single_swaps(
    base: nn.ModuleList, other: nn.ModuleList, nll: Callable[[nn.ModuleList, int], float], topks: list[int]
) -> tuple[list[int], dict]:
    """Session 22's rule: (the layers of `other` whose swap into `base` lowers the NLL at every k, the scores)."""
    result: dict = {}
    for k in topks:
        row = {"base": nll(base, k), "other": nll(other, k)}
        row["other_layer_into_base"] = [
            round(nll(mixed(base, other, {i}), k) - row["base"], 5) for i in range(len(base))
        ]
        row["base_layer_into_other"] = [
            round(nll(mixed(other, base, {i}), k) - row["other"], 5) for i in range(len(base))
        ]
        result[str(k)] = row
        print(f"k = {k}: {json.dumps(row)}", file=sys.stderr, flush=True)
    taken = sorted(
        i for i in range(len(base)) if all(result[str(k)]["other_layer_into_base"][i] < 0 for k in topks)
    )
    return [1 if i in taken else 0 for i in range(len(base))], result


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
        print(f"{choice}: {value}", file=sys.stderr, flush=True)
        return value

    result: dict = {"dense": nll(None, None), "sources": [str(path) for path in paths]}
    if options.sweeps:
        choice, result["descent"] = coordinate_descent(sources, summed, options.sweeps, deadline)
        result["topks"] = {str(k): {"base": nll_k} for k, nll_k in per_k([0] * len(choice)).items()}
    else:
        choice, result["topks"] = single_swaps(sources[0], sources[1], nll, topks)
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
