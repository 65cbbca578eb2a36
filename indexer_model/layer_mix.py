"""Indexer checkpoints mixed layer by layer, each layer taken from the checkpoint that gives the model the lower
loss. `benchmarks/layer_mix.py` runs it on selection text and writes the mix as a checkpoint; half the layers of
the default model's shipped indexers came from it (docs/benchmarks-pipeline.md, "Indexer training")."""

import json
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.model import Transformer
from dsarag.indexer_model.quality import window_nll


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
    out_of_time: Callable[[], bool],
) -> tuple[list[int], list[dict]]:
    """(the checkpoint each layer comes from, every score taken): from all-`sources[0]`, layer by layer, keep the
    source that lowers `score` most given the other layers' current choice, until a sweep changes nothing, after
    `sweeps` sweeps, or once `out_of_time()`. A layer whose tensors equal those of a source already tried is not
    scored again (a mix shares most of its layers with its parents)."""
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
                if source == choice[i] or out_of_time():
                    continue
                trial = choice[:i] + [source] + choice[i + 1 :]
                value = score(trial)
                kept = value < best
                history.append({"sweep": sweep, "layer": i, "source": source, "score": value, "kept": kept})
                if kept:
                    choice, best, moved = trial, value, True
        if not moved or out_of_time():
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
    base: nn.ModuleList,
    other: nn.ModuleList,
    nll: Callable[[nn.ModuleList, int], float],
    topks: list[int],
    log: Callable[[str], None] = print,
) -> tuple[list[int], dict]:
    """The layers of `other` whose swap into `base` lowers the NLL at every k, and the scores."""
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
        log(f"k = {k}: {json.dumps(row)}")
    taken = sorted(
        i for i in range(len(base)) if all(result[str(k)]["other_layer_into_base"][i] < 0 for k in topks)
    )
    return [1 if i in taken else 0 for i in range(len(base))], result
