"""How far DSA leaves the model from dense attention, measured on token windows: the NLL of a window's last
tokens, and per layer and head the attention mass and output a selection keeps, and the hidden-state drift it
causes. The benchmarks (`benchmarks/dsa_quality.py`, `layer_mix.py`, `selection_output_error.py`) report them;
attention-mass recall itself is `train.attention_mass_recall`.
"""

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.indexer import select_topk_sets
from dsarag.indexer_model.model import Transformer, rope_cos_sin
from dsarag.indexer_model.train import N_SINK, WINDOW


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def window_nll(
    model: Transformer, ids: np.ndarray, scored: int, dsa: DSAConfig | None
) -> tuple[float, float]:
    """(summed NLL of the last `scored` next-token predictions in `ids`, seconds): a prefill of all but the
    scored positions (last logits only), then the scored positions with every logit, attention as `dsa`."""
    device = str(model.output.weight.device)
    inputs = torch.from_numpy(ids[:-1].astype(np.int64)).to(device)[None]
    targets = torch.from_numpy(ids[-scored:].astype(np.int64)).to(device)
    positions = torch.arange(inputs.shape[1], device=device)
    split = inputs.shape[1] - scored
    model.setup_caches(1, inputs.shape[1])
    _synchronize(device)
    started = time.perf_counter()
    model(inputs[:, :split], positions[:split], last_logits_only=True, dsa=dsa)
    logits = model(inputs[:, split:], positions[split:], last_logits_only=False, dsa=dsa)
    nll = F.cross_entropy(logits[0].float(), targets, reduction="sum")
    _synchronize(device)
    return float(nll), time.perf_counter() - started


@torch.no_grad()
def mass_and_output_error(
    model: Transformer, checkpoints: dict[str, torch.nn.ModuleList], tokens: np.ndarray, topk: int, rows: int
) -> dict[str, dict[str, list[list[float]]]]:
    """Per checkpoint: `mass` and `error`, each (layers x heads), means over the window's last `rows` queries.

    One dense forward gives every layer's q, k, v (each layer fed the dense hidden states). Each checkpoint's
    indexers select `topk` keys per query (sinks and window included); `mass` is the share of a head's own
    attention mass the set keeps, `error` the relative error of its sparse attention output (the kept
    probabilities renormalized, times v) against the dense output."""
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
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _, __, out, i=i: outputs.__setitem__(i, out[0].float()))
        for i, layer in enumerate(model.layers)
    ]

    def run(dsa: DSAConfig | None) -> tuple[dict[int, torch.Tensor], float]:
        nll, _ = window_nll(model, tokens, rows, dsa)
        return dict(outputs), nll / rows

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
