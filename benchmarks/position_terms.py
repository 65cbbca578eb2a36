"""How much of one layer's attention is a function of distance alone, and whether an indexer's RoPE can draw it.

    .venv/bin/python benchmarks/position_terms.py --heldout heldout.npy --layer 0 --length 16384

With q and k biases (Qwen2), each logit q_t . R(t - s) k_s splits into four terms: content . content,
query content . key bias, query bias . key content, and bias . bias, the last a function of the distance t - s
alone. Part 1 gives each term's variance along the keys of a query row (what the softmax sees), per head, over
the last `--queries` queries of a held-out window. Part 2 fits each head's bias . bias curve over distances
0 .. `--length` by least squares on the cosines and sines of the frequencies an indexer of `--index-dim` dims
rotates at (RoPE on half of its dims), and prints the residual's standard deviation per distance band, in
logit units: an indexer of 64 dims turns at every second frequency of the model's 64-dim heads.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag.indexer_model.indexer import apply_partial_rope, rope_cos_sin  # noqa: E402
from dsarag.indexer_model.model import Transformer  # noqa: E402
from dsarag.indexer_model.train import frozen_attention_inputs, load_frozen_model  # noqa: E402

BANDS = ((0, 1024), (1024, 8192), (8192, 16384), (16384, 32768))


def term_variances(
    model: Transformer, tokens: torch.Tensor, layer: int, queries: int
) -> dict[str, torch.Tensor]:
    """Per head: each logit term's variance along the causal keys of a row, averaged over the last queries."""
    attention, args = model.layers[layer].attention, model.args
    normed_input = frozen_attention_inputs(model, tokens[None], layer + 1)[layer][0]
    h = normed_input.float()[0]
    positions = torch.arange(len(tokens))
    cos, sin = rope_cos_sin(positions, args.head_dim, args.rope_base)
    group = args.n_head // args.n_kv_head
    q_weight, q_bias = attention.q_proj.weight.float(), attention.q_proj.bias.float()
    k_weight, k_bias = attention.k_proj.weight.float(), attention.k_proj.bias.float()
    q_content = (h[-queries:] @ q_weight.T).view(queries, args.n_head, args.head_dim)
    k_content = (h @ k_weight.T).view(len(tokens), args.n_kv_head, args.head_dim)
    q_const = q_bias.view(1, args.n_head, args.head_dim).expand_as(q_content)
    k_const = k_bias.view(1, args.n_kv_head, args.head_dim).expand_as(k_content)
    causal = positions[None, :] <= positions[-queries:, None]
    terms = {
        "content.content": (q_content, k_content),
        "content.bias": (q_content, k_const),
        "bias.content": (q_const, k_content),
        "bias.bias": (q_const, k_const),
    }
    variances = {}
    for name, (q, k) in terms.items():
        q = apply_partial_rope(q, cos[-queries:, None], sin[-queries:, None]).transpose(0, 1)
        k = apply_partial_rope(k, cos[:, None], sin[:, None]).transpose(0, 1).repeat_interleave(group, 0)
        logits = (q @ k.transpose(1, 2)) * args.head_dim**-0.5
        logits = logits.masked_fill(~causal, float("nan"))
        spread = (logits - logits.nanmean(-1, keepdim=True)).nan_to_num(0.0).pow(2).sum(-1) / causal.sum(-1)
        variances[name] = spread.mean(-1)
    return variances


def distance_fit_residuals(model: Transformer, layer: int, length: int, index_dim: int) -> list[list[float]]:
    """Per head: std of the bias . bias curve minus its best fit on the indexer's RoPE frequencies, per band."""
    attention, args = model.layers[layer].attention, model.args
    q_bias = attention.q_proj.bias.float().view(args.n_head, args.head_dim)
    k_bias = attention.k_proj.bias.float().view(args.n_kv_head, args.head_dim)
    distance = torch.arange(length, dtype=torch.float64)
    half = args.head_dim // 2
    model_freq = 1.0 / args.rope_base ** (
        torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim
    )
    index_freq = 1.0 / args.rope_base ** (
        torch.arange(0, index_dim // 2, 2, dtype=torch.float64) / (index_dim // 2)
    )
    angles = distance[:, None] * index_freq
    basis = torch.cat((angles.cos(), angles.sin(), torch.ones(length, 1, dtype=torch.float64)), dim=-1)
    rows = []
    for head in range(args.n_head):
        q, k = q_bias[head].double(), k_bias[head // (args.n_head // args.n_kv_head)].double()
        # Half-split pair i: q R(d) k = (q_i k_i + q_j k_j) cos(w_i d) + (q_i k_j - q_j k_i) sin(w_i d), j = i + half.
        cos_part = q[:half] * k[:half] + q[half:] * k[half:]
        sin_part = q[:half] * k[half:] - q[half:] * k[:half]
        curve = (cos_part * (distance[:, None] * model_freq).cos()).sum(-1)
        curve = (curve + (sin_part * (distance[:, None] * model_freq).sin()).sum(-1)) * args.head_dim**-0.5
        # SVD-based: the lowest frequencies barely turn over these distances, so their columns are nearly parallel.
        fit = basis @ torch.linalg.lstsq(basis, curve[:, None], rcond=1e-12, driver="gelsd").solution
        residual = curve - fit[:, 0]
        rows.append([float(curve.std())] + [float(residual[lo:hi].std()) for lo, hi in BANDS if hi <= length])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument(
        "--index-dims", default="64,128", help="indexer head dims whose frequencies part 2 fits"
    )
    options = parser.parse_args()

    torch.set_grad_enabled(False)
    model = load_frozen_model(options.model, "cpu")
    if not model.args.qkv_bias:
        sys.exit(
            f"{options.model}: its attention has no q / k biases, so there is no bias . bias term to split off"
        )
    tokens = torch.from_numpy(np.load(options.heldout)[: options.length].astype(np.int64))
    variances = term_variances(model, tokens, options.layer, options.queries)
    print(
        f"layer {options.layer}, {options.length} tokens, last {options.queries} queries: logit variance per term"
    )
    print("| head | " + " | ".join(variances) + " |")
    print("|---|" + "---|" * len(variances))
    for head in range(model.args.n_head):
        print(f"| {head} | " + " | ".join(f"{float(v[head]):.1f}" for v in variances.values()) + " |")
    bands = [f"{lo}-{hi}" for lo, hi in BANDS if hi <= options.length]
    for index_dim in (int(d) for d in options.index_dims.split(",")):
        rows = distance_fit_residuals(model, options.layer, options.length, index_dim)
        print(f"\nbias . bias curve fitted on the {index_dim // 4} frequencies of a {index_dim}-dim indexer")
        print("| head | curve std | " + " | ".join(f"residual std {band}" for band in bands) + " |")
        print("|---|---|" + "---|" * len(bands))
        for head, row in enumerate(rows):
            print(f"| {head} | " + " | ".join(f"{value:.2f}" for value in row) + " |")


if __name__ == "__main__":
    main()
