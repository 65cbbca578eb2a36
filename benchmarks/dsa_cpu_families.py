"""The compiled CPU kernels' families side by side on one layer's real DSA inputs, on any CPU.

`capture` (needs the default model) runs a prefill of held-out text up to one layer and saves that layer's DSA
inputs: the attention's q, k, v and the indexer's q, w, k, in bf16. `time` loads them and times the selection and
the gather attention over the selected keys on every kernel family this CPU runs (AMX, AVX512-BF16, float32), so a
machine without the model (the `device` host's AMX Xeon) compares them on real selections, whose neighbouring
queries share keys, unlike random ones. About 24 MB at 8K.

    .venv/bin/python benchmarks/dsa_cpu_families.py capture --heldout ids.npy --length 8192 --layer 9 --topk 768 \
        --out layer9.pt
    python benchmarks/dsa_cpu_families.py time layer9.pt --threads 2
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag_kernels import cpu_dsa  # noqa: E402
from indexer_model.dsa import DSAConfig  # noqa: E402


class Captured(Exception):
    """Stops the prefill once the chosen layer's inputs are saved."""


@torch.inference_mode()
def capture(heldout: np.ndarray, length: int, layer: int, topk: int, out: Path) -> None:
    from indexer_model.generate import load_generator

    model = load_generator().model
    model.setup_caches(1, length)
    positions = torch.arange(length)
    cfg = DSAConfig(topk=topk)

    def save(module, args):
        x, rope = args[:2]
        q, k, v = module.project(x, rope)
        idx_q, idx_w, idx_k = module.indexer.project(x, positions)
        rows = slice(topk, None)  # the first k queries select every earlier key: DSA runs them dense
        inputs = {
            "q": q[:, :, rows],
            "k": k,
            "v": v,
            "idx_q": idx_q[:, rows],
            "idx_w": idx_w[:, rows],
            "idx_k": idx_k,
            "layer": layer,
            "topk": topk,
            "n_sink": cfg.n_sink,
            "window": cfg.window,
        }
        bf16 = {
            name: value.bfloat16() if torch.is_tensor(value) and value.is_floating_point() else value
            for name, value in inputs.items()
        }
        torch.save(bf16, out)
        raise Captured

    model.layers[layer].attention.register_forward_pre_hook(save)
    try:
        model(torch.from_numpy(heldout[:length].astype(np.int64))[None], positions, last_logits_only=True)
    except Captured:
        print(f"{out}: layer {layer}'s inputs at {length} tokens, k = {topk}", file=sys.stderr)


def best_seconds(run, repeats: int = 3) -> float:
    run()  # the first call of a shape pays one-off allocations and thread start-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def time_family(x: dict, dtype: torch.dtype) -> dict:
    """Seconds of the selection and the gather attention on the saved inputs, read in `dtype`."""
    idx_q, idx_w, idx_k, q, k, v = (x[key].to(dtype) for key in ("idx_q", "idx_w", "idx_k", "q", "k", "v"))
    n_keys = k.shape[2]
    positions = torch.arange(n_keys - q.shape[2], n_keys)
    selection = (idx_q, idx_w, idx_k, positions, n_keys, x["topk"], x["n_sink"], x["window"])
    indices = cpu_dsa.select_topk(*selection)
    scale = q.shape[-1] ** -0.5
    return {
        "select_s": round(best_seconds(lambda: cpu_dsa.select_topk(*selection)), 4),
        "attention_s": round(best_seconds(lambda: cpu_dsa.sparse_attention(q, k, v, indices, scale)), 4),
    }


def time_families(path: Path, threads: int) -> list[dict]:
    """time_family for each kernel family this CPU runs: AMX where ready, AVX512-BF16 (AMX hidden), float32."""
    torch.set_num_threads(threads)
    x = torch.load(path)
    families = [("float32", torch.float32, False)]
    if cpu_dsa.avx512_bf16_ready():
        families.insert(0, ("AVX512-BF16", torch.bfloat16, False))
    if cpu_dsa.amx_ready():
        families.insert(0, ("AMX", torch.bfloat16, True))
    amx_ready, rows = cpu_dsa.amx_ready, []
    try:
        for name, dtype, amx in families:
            cpu_dsa.amx_ready = amx_ready if amx else lambda: False
            rows.append({"family": name, **time_family(x, dtype)})
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        cpu_dsa.amx_ready = amx_ready
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    take = commands.add_parser("capture", help="save one layer's DSA inputs (needs the default model)")
    take.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    take.add_argument("--length", type=int, default=8192)
    take.add_argument("--layer", type=int, default=9)
    take.add_argument("--topk", type=int, default=768)
    take.add_argument("--out", type=Path, required=True)
    timing = commands.add_parser("time", help="time every kernel family this CPU runs on saved inputs")
    timing.add_argument("inputs", type=Path)
    timing.add_argument("--threads", type=int, default=2)
    timing.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    if args.command == "capture":
        capture(np.load(args.heldout), args.length, args.layer, args.topk, args.out)
        return
    rows = time_families(args.inputs, args.threads)
    print("| family | select s | attention s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['select_s']} | {row['attention_s']} |")
    if args.out:
        args.out.write_text(json.dumps({"inputs": str(args.inputs), "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
