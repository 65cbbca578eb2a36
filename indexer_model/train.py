"""`dsarag indexer train`: distil one lightning indexer per layer from the frozen model's dense attention.

Dense warm-up (DeepSeek-V3.2): per layer, target p[t,:] = dense attention summed over heads, L1-normalized;
loss = KL(p[t,:] || softmax(I[t,:])), computed block by block of queries. All layers learn from one frozen
forward per step. An optional sparse stage restricts the KL to the selected top-k set.
"""

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dsarag.base.errors import BadInputError
from dsarag.indexer_model.checkpoint import indexers_config, weights_fingerprint
from dsarag.indexer_model.distill import (
    blockwise_indexer_kl_loss,
    dense_attention_target,
    topk_attention_mass_recall,
)
from dsarag.indexer_model.indexer import LightningIndexer, select_topk_sets
from dsarag.indexer_model.model import Transformer, rope_cos_sin
from dsarag.indexer_model.token_ids import load_token_stream, tokenizer_encode

RECALL_KS = (256, 512, 1024, 2048)
DEFAULT_INDEX_HEADS, DEFAULT_INDEX_DIM = 4, 64
N_SINK, WINDOW = 4, 64


@dataclass
class TrainConfig:
    seq_lens: tuple[int, ...] = (8192,)  # window lengths; each step draws one of them at random
    steps: int = 600
    max_seconds: float = 0.0  # stop early when this wall time is spent (0 = no limit)
    sparse_steps: int = 0  # extra steps of the sparse stage (KL over the selected set)
    topk: int = 2048  # the selected set of the sparse stage
    # Weight of the dense KL added to the sparse stage's loss (0 = the selected set alone, as in DeepSeek-V3.2):
    # the sparse KL sharpens the order inside the set, the dense one still pulls up keys left out of it.
    sparse_dense_weight: float = 0.0
    # The boundary term beside the KL (distill._boundary_recall_sum): the ks whose recall it aims at, its weight.
    boundary_topks: tuple[int, ...] = (512, 2048)
    boundary_weight: float = 0.0
    lr: float = 1e-3
    warmup_steps: int = 20
    # Index heads of the trained layers; 0 = DEFAULT_INDEX_HEADS for fresh indexers, or as --init-from has them.
    # More than --init-from has grows those layers (grow_heads): a hard layer can get more than the rest.
    index_heads: int = 0
    # Dims of each index head in the trained layers; 0 = DEFAULT_INDEX_DIM for fresh indexers, or as --init-from
    # has them. A multiple of that widens those layers (grow_dims).
    index_dim: int = 0
    index_sets: int = 1  # selections per layer: 1 shared by all heads, or one per group of kv heads
    query_block: int = 1024
    # Query rows per window that take part in the loss (0 = all). A random subset keeps every distance up to
    # seq_len in the loss at a fraction of the cost, which makes long windows (32K) affordable: the frozen
    # forward still runs over the whole window, the KL over rows x keys shrinks with the rows.
    query_rows: int = 0
    layers: tuple[int, ...] = ()  # the layers whose indexers learn (empty = all); the rest stay as they are
    seed: int = 0


def load_frozen_model(spec: str, device: str) -> Transformer:
    """The base model in bf16, frozen. A `.gguf` path is read directly (no tokenizer needed)."""
    if spec.endswith(".gguf"):
        from dsarag.indexer_model.gguf_convert import read_gguf
        from dsarag.indexer_model.model import ModelArgs
        from dsarag.indexer_model.weights import build_model, our_name

        config, state_dict = read_gguf(Path(spec))
        state_dict = {our_name(name): tensor for name, tensor in state_dict.items()}
        model = build_model(ModelArgs.from_config(config), state_dict, Path(spec))
    else:
        from dsarag.indexer_model.resolve import resolve_model
        from dsarag.indexer_model.weights import load_model

        model = load_model(resolve_model(spec))
    return model.to(device).requires_grad_(False)


def make_indexers(model: Transformer, config: TrainConfig) -> nn.ModuleList:
    args = model.args
    if args.n_kv_head % config.index_sets:
        raise BadInputError(
            f"--index-sets {config.index_sets} does not divide the model's {args.n_kv_head} kv heads: "
            f"use 1 or a divisor of {args.n_kv_head}"
        )
    return nn.ModuleList(
        LightningIndexer(
            args.dim,
            args.rope_base,
            config.index_heads or DEFAULT_INDEX_HEADS,
            config.index_dim or DEFAULT_INDEX_DIM,
            config.index_sets,
        )
        for _ in range(args.n_layer)
    )


@torch.no_grad()
def frozen_attention_inputs(
    model: Transformer, tokens: Tensor, n_layers: int | None = None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer: (normed input h (B,T,D), q (B,Hq,T,d), k (B,Hkv,T,d)) of one dense forward, q and k post-RoPE.

    With n_layers, the forward stops after that many layers (training only the first layers needs no more)."""
    model.clear_caches()  # one full causal pass: a generation's KV cache must not take part
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    rope = rope_cos_sin(positions, model.args.head_dim, model.args.rope_base)
    x = model.tok_embeddings(tokens)
    captured = []
    layers = model.layers[:n_layers]
    for layer in layers:
        h = layer.attention_norm(x)
        q, k, _ = layer.attention.project(h, rope)
        captured.append((h, q, k))
        if len(captured) < len(layers):  # the last layer's output is never read
            x = layer(x, rope, positions, tokens.shape[1])
    return captured


def widen_to_sets(indexers: nn.ModuleList, index_sets: int) -> nn.ModuleList:
    """Indexers with one shared set -> `index_sets` sets that all start from its head weights (every set
    selects what the shared indexer did until training moves them apart)."""
    if indexers[0].index_sets == index_sets:
        return indexers
    if indexers[0].index_sets != 1:
        raise BadInputError(
            f"--init-from has {indexers[0].index_sets} index sets, not 1: continue it with --index-sets "
            f"{indexers[0].index_sets}"
        )
    widened = nn.ModuleList()
    for shared in indexers:
        indexer = LightningIndexer(
            shared.wq.in_features, shared.rope_base, shared.n_heads, shared.head_dim, index_sets
        )
        state = shared.state_dict()
        state["weights_proj.weight"] = state["weights_proj.weight"].repeat(index_sets, 1)
        indexer.load_state_dict(state)
        widened.append(indexer)
    return widened


def grow_heads(indexers: nn.ModuleList, layers: list[int], n_heads: int) -> nn.ModuleList:
    """The same indexers with `n_heads` index heads in `layers`. The old heads keep their weights (rescaled for
    the wider H_I^-1/2 factor) and the new heads start at zero weight, so scores and selections are unchanged
    until training moves them; fewer heads than a layer has is refused."""
    grown = nn.ModuleList(indexers)
    for layer in layers:
        old = indexers[layer]
        if old.n_heads == n_heads:
            continue
        if old.n_heads > n_heads:
            raise BadInputError(
                f"--index-heads {n_heads}: layer {layer} of --init-from has {old.n_heads} index heads — "
                f"pass {old.n_heads} or more"
            )
        dim, sets = old.wq.in_features, old.index_sets
        new = LightningIndexer(dim, old.rope_base, n_heads, old.head_dim, sets).to(old.wq.weight.dtype)
        state = {
            **new.state_dict(),
            "wk.weight": old.wk.weight,
            **{f"k_norm.{name}": value for name, value in old.k_norm.state_dict().items()},
        }
        state["wq.weight"][: old.n_heads * old.head_dim] = old.wq.weight.detach()
        weights = torch.zeros(sets, n_heads, dim, dtype=old.weights_proj.weight.dtype)
        weights[:, : old.n_heads] = old.weights_proj.weight.detach().view(sets, old.n_heads, dim)
        state["weights_proj.weight"] = (weights * math.sqrt(n_heads / old.n_heads)).view(sets * n_heads, dim)
        new.load_state_dict(state)
        grown[layer] = new
    return grown


def grow_dims(indexers: nn.ModuleList, layers: list[int], head_dim: int) -> nn.ModuleList:
    """The same indexers with `head_dim` dims in `layers`, m times what they have; index scores are unchanged.

    RoPE covers half of d_I, so m times the dims carries m times the frequencies: an indexer of 64 dims rotates
    at every second frequency of a 64-dim model head, and only approximates a position pattern built on the others
    (Qwen2.5's layer 0, whose q and k biases make its attention mostly a function of distance:
    benchmarks/position_terms.py). Old rotation pair i moves to pair i * m, which turns at the same frequency;
    every key dim is repeated m times, which leaves the key's LayerNorm statistics as they were; the query reads
    only the first copy until training moves it."""
    grown = nn.ModuleList(indexers)
    for layer in layers:
        old = indexers[layer]
        if old.head_dim == head_dim:
            continue
        if head_dim % old.head_dim:
            raise BadInputError(
                f"--index-dim {head_dim}: layer {layer} of --init-from has {old.head_dim} dims — pass a multiple of it"
            )
        repeat, dim = head_dim // old.head_dim, old.wq.in_features
        source, first = _repeated_dims(old.rope_dims, old.head_dim, repeat)
        new = LightningIndexer(dim, old.rope_base, old.n_heads, head_dim, old.index_sets)
        new = new.to(old.wq.weight.dtype)
        with torch.no_grad():
            new.wk.weight.copy_(old.wk.weight[source])
            new.k_norm.weight.copy_(old.k_norm.weight[source])
            new.k_norm.bias.copy_(old.k_norm.bias[source])
            query = old.wq.weight.view(old.n_heads, old.head_dim, dim)[:, source] * first[None, :, None]
            new.wq.weight.copy_(query.reshape(-1, dim))
            # Scores carry a factor (H_I d_I)^-1/2: the wider head's smaller factor is made up in the weights.
            new.weights_proj.weight.copy_(old.weights_proj.weight * math.sqrt(repeat))
        grown[layer] = new
    return grown


def _repeated_dims(rope_dims: int, head_dim: int, repeat: int) -> tuple[Tensor, Tensor]:
    """For each dim of an indexer `repeat` times wider: the old dim it copies, and whether it is the first copy.

    Half-split layout: old pair (i, i + rope_dims/2) -> new pairs (i*repeat + c, i*repeat + c + new rope_dims/2);
    the dims without RoPE follow the new rotated ones, each repeated in place."""
    half, new_half = rope_dims // 2, rope_dims * repeat // 2
    source = torch.empty(head_dim * repeat, dtype=torch.long)
    pairs = torch.arange(half).repeat_interleave(repeat)
    source[:new_half], source[new_half : 2 * new_half] = pairs, pairs + half
    source[2 * new_half :] = torch.arange(rope_dims, head_dim).repeat_interleave(repeat)
    # Every block of `repeat` dims starts at a multiple of `repeat` (new_half is one), so its copy number is n % repeat.
    return source, torch.arange(head_dim * repeat) % repeat == 0


def train_indexers(
    model: Transformer,
    tokens: np.ndarray,
    config: TrainConfig,
    log: Callable[[str], None] = print,
    init: nn.ModuleList | None = None,
) -> tuple[nn.ModuleList, list[dict]]:
    """Train indexers (fresh, or continuing from `init`) on random windows of `tokens`; return them and the loss curve."""
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    indexers = (init if init is not None else make_indexers(model, config)).float().to(device)
    optimizer = torch.optim.AdamW(indexers.parameters(), lr=config.lr, weight_decay=0.0)
    total_steps = config.steps + config.sparse_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config, total_steps)
    )
    layers = _layer_list(config.layers, len(indexers))
    boundary = (
        (config.boundary_topks, config.boundary_weight, (N_SINK, WINDOW)) if config.boundary_weight else None
    )
    curve: list[dict] = []
    started = time.perf_counter()
    for step in range(total_steps):
        sparse = step >= config.steps
        # One length draws nothing, so single-length runs pick the same windows as before lengths could mix.
        seq_len = config.seq_lens[0] if len(config.seq_lens) == 1 else int(rng.choice(config.seq_lens))
        positions = torch.arange(seq_len, device=device)
        start = int(rng.integers(0, len(tokens) - seq_len))
        window = torch.from_numpy(tokens[start : start + seq_len]).to(device)[None]
        rows = _query_rows(rng, seq_len, config.query_rows, device)
        step_loss = 0.0
        inputs = frozen_attention_inputs(model, window, max(layers) + 1)
        for layer in layers:
            h, q, k = inputs[layer]
            idx_q, idx_w, idx_k = indexers[layer].project(h.float(), positions)
            idx_q, idx_w, q = idx_q[:, rows], idx_w[:, rows], q[:, :, rows]
            indices = None
            if sparse:
                with torch.no_grad():
                    indices = select_topk_sets(
                        idx_q, idx_w, idx_k, positions[rows], seq_len, config.topk, N_SINK, WINDOW
                    )
            loss = blockwise_indexer_kl_loss(
                q, k, positions[rows], idx_q, idx_w, idx_k, indices, config.query_block,
                dense_weight=config.sparse_dense_weight, boundary=boundary,
            )  # fmt: skip
            loss.backward()  # layer by layer: only one layer's graph is alive at a time
            step_loss += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        elapsed = time.perf_counter() - started
        curve.append(
            {
                "step": step,
                "loss": step_loss / len(layers),
                "seconds": round(elapsed, 2),
                "sparse": sparse,
                "seq_len": seq_len,
            }
        )
        if step % 10 == 0 or step == total_steps - 1:
            log(
                f"step {step:5d}  loss {step_loss / len(layers):.4f}  {'sparse' if sparse else 'dense'}  {elapsed:.0f}s"
            )
        if config.max_seconds and elapsed > config.max_seconds:
            log(f"stopping at step {step}: {config.max_seconds:.0f}s spent")
            break
    return indexers, curve


def _layer_list(layers: tuple[int, ...], n_layer: int) -> list[int]:
    """The layers asked for, sorted (empty = all); one the model lacks is refused."""
    wrong = [layer for layer in layers if not 0 <= layer < n_layer]
    if wrong:
        raise BadInputError(f"--layers {wrong}: the model has layers 0 to {n_layer - 1}")
    return sorted(set(layers)) or list(range(n_layer))


def _query_rows(rng: np.random.Generator, seq_len: int, query_rows: int, device: torch.device) -> Tensor:
    """Sorted query positions of this step's loss: all of them, or `query_rows` drawn at random."""
    if not 0 < query_rows < seq_len:
        return torch.arange(seq_len, device=device)
    rows = np.sort(rng.choice(seq_len, query_rows, replace=False))
    return torch.from_numpy(rows).to(device)


def _lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def attention_mass_recall(
    model: Transformer,
    indexers: nn.ModuleList,
    tokens: np.ndarray,
    ks: tuple[int, ...] = RECALL_KS,
    query_rows: int = 512,
    layers: tuple[int, ...] = (),
) -> dict:
    """Per layer and k: share of the dense attention mass kept by the indexer's top-k (sinks + window
    included), over the last `query_rows` queries of `tokens`; with the oracle ceiling (top-k of the true
    attention) and the sinks-plus-recent baseline beside it. With index sets, each set is scored against the
    attention of the heads it serves, and the layer's figure is the mean over sets. `layers` limits it to
    those layers (the lists then follow `result["layers"]`; the forward stops after the last one)."""
    device = next(model.parameters()).device
    seq_len = len(tokens)
    ks = tuple(k for k in ks if k < seq_len)
    layers = _layer_list(layers, len(indexers))
    window = torch.from_numpy(tokens).to(device)[None]
    positions = torch.arange(seq_len, device=device)
    rows = slice(seq_len - query_rows, seq_len)
    result: dict = {
        "seq_len": seq_len,
        "query_rows": query_rows,
        "layers": layers,
        "indexer": {},
        "oracle": {},
        "recent": {},
    }
    for k in ks:
        for name in ("indexer", "oracle", "recent"):
            result[name][str(k)] = []
    inputs = frozen_attention_inputs(model, window, max(layers) + 1)
    for layer in layers:
        indexer, (h, q, k_main) = indexers[layer], inputs[layer]
        target = dense_attention_target(q[:, :, rows], k_main, positions[rows], sets=indexer.index_sets)
        idx_q, idx_w, idx_k = indexer.project(h.float(), positions)
        for k in ks:
            chosen = select_topk_sets(
                idx_q[:, rows], idx_w[:, rows], idx_k, positions[rows], seq_len, k, N_SINK, WINDOW
            )
            oracle = target.topk(k, dim=-1).indices
            result["indexer"][str(k)].append(float(topk_attention_mass_recall(target, chosen).mean()))
            result["oracle"][str(k)].append(float(topk_attention_mass_recall(target, oracle).mean()))
            result["recent"][str(k)].append(float(_recent_recall(target, positions[rows], k).mean()))
    for name in ("indexer", "oracle", "recent"):
        result[f"{name}_mean"] = {k: float(np.mean(values)) for k, values in result[name].items()}
    return result


def window_starts(total: int, length: int, count: int) -> list[int]:
    """`count` window starts spread evenly over a stream of `total` tokens; the first window starts at 0."""
    return [round(i * (total - length) / count) for i in range(count)]


def recall_over_windows(
    model: Transformer,
    indexers: nn.ModuleList,
    tokens: np.ndarray,
    length: int,
    windows: int,
    ks: tuple[int, ...] = RECALL_KS,
    layers: tuple[int, ...] = (),
) -> dict:
    """`attention_mass_recall` averaged over `windows` windows of `length` tokens spread evenly over `tokens`
    (the first starts at 0): per layer and k, and the means over layers."""
    starts = window_starts(len(tokens), length, windows)
    runs = [attention_mass_recall(model, indexers, tokens[s : s + length], ks, layers=layers) for s in starts]
    result = {"seq_len": length, "windows": starts, "layers": runs[0]["layers"]}
    for name in ("indexer", "oracle", "recent"):
        result[name] = {
            k: np.mean([run[name][k] for run in runs], axis=0).round(4).tolist() for k in runs[0][name]
        }
        result[f"{name}_mean"] = {k: round(float(np.mean(v)), 4) for k, v in result[name].items()}
    return result


def evaluate_checkpoint(
    model_spec: str,
    eval_data: Path,
    checkpoint: Path | None,
    lengths: tuple[int, ...],
    ks: tuple[int, ...],
    windows: int,
    layers: tuple[int, ...] = (),
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict:
    """`dsarag indexer eval`: recall of a checkpoint (default: the one made for these weights) per length."""
    from dsarag.indexer_model.checkpoint import find_checkpoint, load_checkpoint

    device = _resolve_device(device)
    if checkpoint is not None and not (checkpoint / "config.json").is_file():
        raise BadInputError(f"{checkpoint}: no config.json — pass a folder written by `dsarag indexer train`")
    model = load_frozen_model(model_spec, device)
    checkpoint = checkpoint or find_checkpoint(weights_fingerprint(model))
    if checkpoint is None:
        raise BadInputError(
            f"{model_spec}: no indexer checkpoint matches these weights — pass --checkpoint DIR or train one "
            "with `dsarag indexer train`"
        )
    _layer_list(layers, model.args.n_layer)  # refuses layers the model lacks, before the slow part
    tokens = load_token_stream(eval_data, tokenizer_encode(model_spec))
    longest = min(len(tokens), model.args.max_seq_len)
    if any(length > longest for length in lengths):
        raise BadInputError(
            f"{eval_data}: --lengths {max(lengths)} is longer than the held-out text or the model's context "
            f"({longest} tokens) — pass shorter lengths"
        )
    indexers = load_checkpoint(checkpoint, model.args.dim, model.args.n_layer).to(device)
    log(f"{checkpoint}: {len(tokens):,} held-out tokens; device {device}")
    results = []
    for length in lengths:
        results.append(recall_over_windows(model, indexers, tokens, length, windows, ks, layers))
        log(f"recall @{length}: {results[-1]['indexer_mean']}  oracle {results[-1]['oracle_mean']}")
    return {"model": model_spec, "checkpoint": str(checkpoint), "recall": results}


def _recent_recall(target: Tensor, q_positions: Tensor, k: int) -> Tensor:
    """Mass kept by the sinks plus the most recent k - N_SINK keys: what a trivial selector gets."""
    key_positions = torch.arange(target.shape[-1], device=target.device)
    recent = key_positions[None, :] > q_positions[:, None] - (k - N_SINK)
    keep = (recent | (key_positions[None, :] < N_SINK)) & (key_positions[None, :] <= q_positions[:, None])
    return (target * keep).sum(dim=-1)


def checkpoint_config(model: Transformer, indexers: nn.ModuleList, config: TrainConfig, extra: dict) -> dict:
    return {
        "base_fingerprint": weights_fingerprint(model),
        "n_layer": model.args.n_layer,
        "dim": model.args.dim,
        "indexer": indexers_config(indexers),
        "dsa": {"n_sink": N_SINK, "window": WINDOW},
        "training": {**asdict(config), **extra},
    }


def run_training(
    model_spec: str,
    data: Path,
    out: Path,
    config: TrainConfig,
    eval_data: Path | None = None,
    eval_lengths: tuple[int, ...] = (8192, 16384),
    device: str = "auto",
    log: Callable[[str], None] = print,
    init_from: Path | None = None,
) -> dict:
    """Train, measure recall on held-out text (trained vs untrained indexer), write the checkpoint to `out`."""
    from dsarag.indexer_model.checkpoint import save_checkpoint

    device = _resolve_device(device)
    started = time.perf_counter()
    model = load_frozen_model(model_spec, device)
    tokens = load_token_stream(data, tokenizer_encode(model_spec))
    log(f"{model_spec}: {model.args.n_layer} layers; {len(tokens):,} training tokens; device {device}")
    longest = min(len(tokens) - 1, model.args.max_seq_len)
    if not config.seq_lens or not all(128 <= length <= longest for length in config.seq_lens):
        raise BadInputError(
            f"--seq-len {','.join(map(str, config.seq_lens))}: windows must be 128 to {longest:,} tokens (the "
            f"training text and the model's context) — pass shorter lengths or more text"
        )
    if config.boundary_weight and not (
        config.boundary_topks and min(config.boundary_topks) > N_SINK + WINDOW
    ):
        raise BadInputError(
            f"--boundary-topks {','.join(map(str, config.boundary_topks))}: each k must exceed the "
            f"{N_SINK} sinks and the window of {WINDOW} it always keeps — pass larger ks"
        )
    init = None
    if config.layers and init_from is None:
        raise BadInputError("--layers trains some layers and keeps the others: pass --init-from CHECKPOINT")
    if init_from is not None:
        from dsarag.indexer_model.checkpoint import load_checkpoint

        init = widen_to_sets(
            load_checkpoint(init_from, model.args.dim, model.args.n_layer), config.index_sets
        )
        if config.index_heads:
            init = grow_heads(init, _layer_list(config.layers, len(init)), config.index_heads)
        if config.index_dim:
            init = grow_dims(init, _layer_list(config.layers, len(init)), config.index_dim)
        log(f"continuing from {init_from}")
    indexers, curve = train_indexers(model, tokens, config, log, init)
    train_seconds = time.perf_counter() - started
    metrics: dict = {"loss_curve": curve, "train_seconds": round(train_seconds, 1), "recall": {}}
    if eval_data is not None:
        held_out = load_token_stream(eval_data, tokenizer_encode(model_spec))
        untrained = make_indexers(model, config).to(device)
        for length in eval_lengths:
            if length > min(len(held_out), model.args.max_seq_len):
                continue
            sample = held_out[:length]
            metrics["recall"][str(length)] = {
                "trained": attention_mass_recall(model, indexers, sample),
                "untrained": attention_mass_recall(model, untrained, sample)["indexer_mean"],
            }
            trained = metrics["recall"][str(length)]["trained"]
            log(f"recall @{length}: trained {trained['indexer_mean']}  oracle {trained['oracle_mean']}")
    extra = {
        "init_from": str(init_from) if init_from else None,
        "data": str(data),
        "tokens": int(len(tokens)),
        "device": _device_name(device),
        "seconds": train_seconds,
    }
    save_checkpoint(out, indexers, checkpoint_config(model, indexers, config, extra), metrics)
    log(f"wrote {out}")
    return metrics


def _resolve_device(device: str) -> str:
    """--device auto means the GPU when there is one."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
