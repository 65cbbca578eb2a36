"""CPU DSA selection and a whole prefill's split, on the default model's real inputs.

    .venv/bin/python benchmarks/dsa_cpu_selection.py --heldout heldout.npy --lengths 8192 16384 --layer 9 \
        --split-length 8192

1. `select_topk` on one layer's real index queries and keys (the queries that select: positions >= k), ranking
   in the inputs' dtype (bf16 in the model, as shipped) against ranking fp32 sums (the index scores that
   training uses), alternating `--repeats` times; and the share of selected keys the two rankings agree on.
2. One DSA prefill of `--split-length` tokens with timers around the selection, the gather attention and the
   dense prefixes of every layer, beside a dense prefill of the same tokens.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dsarag.indexer_model.dsa as dsa_module  # noqa: E402
import dsarag.kernels.torch_dsa as torch_dsa  # noqa: E402
from dsarag.indexer_model.dsa import DSAConfig  # noqa: E402
from dsarag.indexer_model.generate import load_generator  # noqa: E402
from dsarag.kernels.backend import TORCH  # noqa: E402

TOPK = 2048


class Stop(Exception):
    """Raised by the capture hook: the layers after the captured one are not needed."""


def capture_index_inputs(model, tokens: np.ndarray, layer: int) -> tuple:
    captured = {}

    def hook(module, args):
        x, _, positions = args[:3]
        captured["inputs"] = (*module.indexer.project(x, positions), positions)
        raise Stop

    handle = model.layers[layer].attention.register_forward_pre_hook(hook)
    model.setup_caches(1, len(tokens))
    try:
        with torch.inference_mode():
            model(torch.from_numpy(tokens.astype(np.int64))[None], torch.arange(len(tokens)))
    except Stop:
        pass
    finally:
        handle.remove()
    return captured["inputs"]


def selection_rows(model, heldout: np.ndarray, lengths: list[int], layer: int, repeats: int) -> list[dict]:
    rows = []
    in_dtype = torch_dsa._selection_scores
    for length in lengths:
        q, w, k, positions = capture_index_inputs(model, heldout[:length], layer)
        args = (q[:, TOPK:], w[:, TOPK:], k, positions[TOPK:], length, TOPK)
        times: dict[str, list[float]] = {"inputs_dtype": [], "fp32": []}
        chosen = {}
        for _ in range(repeats):
            for name, scores in (("inputs_dtype", in_dtype), ("fp32", torch_dsa.index_scores)):
                torch_dsa._selection_scores = scores
                started = time.perf_counter()
                with torch.inference_mode():
                    chosen[name] = torch_dsa.select_topk(*args)
                times[name].append(round(time.perf_counter() - started, 3))
        torch_dsa._selection_scores = in_dtype
        sampled = range(0, length - TOPK, 97)
        pairs = [(chosen["inputs_dtype"][0, t].tolist(), chosen["fp32"][0, t].tolist()) for t in sampled]
        same = np.mean([len(set(a) & set(b)) / TOPK for a, b in pairs])
        rows.append({"length": length, "layer": layer, "dtype": str(q.dtype), "seconds": times,
                     "same_keys": round(float(same), 4)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def prefill_split(model, tokens: np.ndarray, block: int) -> dict:
    """Seconds of a dense and a DSA prefill, and the DSA one's selection / gather / dense-prefix totals;
    `block`: queries per gathered union in the gather attention."""
    totals: dict[str, float] = {}

    def timed(name, fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - started
            return result

        return run

    ids = torch.from_numpy(tokens.astype(np.int64))[None]

    def prefill(dsa) -> float:
        model.setup_caches(1, len(tokens))
        started = time.perf_counter()
        with torch.inference_mode():
            model(ids, torch.arange(len(tokens)), dsa=dsa)
        return round(time.perf_counter() - started, 2)

    model.use_backend(TORCH)  # the PyTorch path, whose gather attention takes `block`
    prefill(None)  # warm-up
    result = {"length": len(tokens), "block": block, "dense_s": prefill(None)}
    dense = dsa_module.dense_attention
    dsa_module.dense_attention = timed("dense_attention", dense)
    model.use_backend(
        replace(
            TORCH,
            select_topk=timed("select_topk", torch_dsa.select_topk),
            sparse_attention=timed("sparse_attention", partial(torch_dsa.sparse_attention, block=block)),
        )
    )
    try:
        result["dsa_s"] = prefill(DSAConfig(topk=TOPK, dense_threshold=0))
    finally:
        dsa_module.dense_attention = dense
        model.use_backend(TORCH)
    n_layer = len(model.layers)
    result["per_layer_s"] = {name: round(seconds / n_layer, 3) for name, seconds in totals.items()}
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384])
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--split-length", type=int, default=0, help="also split a whole prefill (0: no)")
    parser.add_argument("--block", type=int, default=64, help="queries per gathered union in the split")
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    heldout = np.load(options.heldout)
    model = load_generator().model
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "selection": selection_rows(model, heldout, options.lengths, options.layer, options.repeats),
    }
    if options.split_length:
        result["prefill_split"] = prefill_split(model, heldout[: options.split_length], options.block)
    text = json.dumps(result, indent=1)
    if options.out:
        options.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
