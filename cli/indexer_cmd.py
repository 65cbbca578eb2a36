"""`dsarag indexer …`: train lightning indexers (DSA) for a base model."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

indexer_app = typer.Typer(help="Train the DSA lightning indexers of a model.", no_args_is_help=True)
stderr = Console(stderr=True)

ModelOption = Annotated[
    str, typer.Option("--model", help="Base model spec (see `dsarag ask --model`) or .gguf.")
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Indexer checkpoint folder (default: the one made for these weights)."),
]


@indexer_app.command("train")
def train(
    data: Annotated[
        Path, typer.Option("--data", help="Training text: a folder of .txt/.rst/.md, or token ids (.npy).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint folder to write.")],
    model: Annotated[
        str, typer.Option("--model", help="Base model spec (see `dsarag ask --model`) or .gguf.")
    ] = "default",
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Held-out text for recall.")] = None,
    seq_len: Annotated[
        str,
        typer.Option(
            "--seq-len",
            help="Window length in tokens; comma-separated lengths mix, one drawn at random per step.",
        ),
    ] = "8192",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Dense warm-up steps.")] = 600,
    sparse_steps: Annotated[
        int, typer.Option("--sparse-steps", min=0, help="Sparse-stage steps after it.")
    ] = 0,
    topk: Annotated[int, typer.Option("--topk", min=128, help="Selected set of the sparse stage.")] = 2048,
    sparse_dense_weight: Annotated[
        float,
        typer.Option(
            "--sparse-dense-weight",
            min=0.0,
            help="Weight of the dense KL kept in the sparse stage (0 = the selected set alone).",
        ),
    ] = 0.0,
    boundary_topks: Annotated[
        str,
        typer.Option(
            "--boundary-topks",
            help="Comma-separated ks whose attention-mass recall the boundary term aims at (with --boundary-weight).",
        ),
    ] = "512,2048",
    boundary_weight: Annotated[
        float,
        typer.Option(
            "--boundary-weight",
            min=0.0,
            help="Weight of the boundary term beside the KL: it moves the keys around each k-th score by the attention they hold (0 = KL only).",
        ),
    ] = 0.0,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    max_seconds: Annotated[
        float, typer.Option("--max-seconds", help="Stop after this much time (0 = none).")
    ] = 0.0,
    index_sets: Annotated[
        int,
        typer.Option(
            "--index-sets",
            min=1,
            help="Selections per layer: 1 shared by all heads, or one per group of kv heads.",
        ),
    ] = 1,
    index_heads: Annotated[
        int,
        typer.Option(
            "--index-heads",
            min=0,
            help="Index heads of the trained layers (0: 4 fresh, or as --init-from has them; more grows them).",
        ),
    ] = 0,
    index_dim: Annotated[
        int,
        typer.Option(
            "--index-dim",
            min=0,
            help="Dims of each index head in the trained layers (0: 64 fresh, or as --init-from has them; a multiple widens them, and RoPE then covers more frequencies).",
        ),
    ] = 0,
    query_rows: Annotated[
        int,
        typer.Option(
            "--query-rows",
            min=0,
            help="Query rows per window in the loss, drawn at random (0 = all): long windows at a fraction of the cost.",
        ),
    ] = 0,
    layers: Annotated[
        str,
        typer.Option("--layers", help="Comma-separated layers to train (default all); needs --init-from."),
    ] = "",
    eval_lengths: Annotated[
        str, typer.Option("--eval-lengths", help="Comma-separated held-out lengths for recall.")
    ] = "8192,16384",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from", help="Continue from this checkpoint (a shared one widens to --index-sets)."
        ),
    ] = None,
) -> None:
    """Distil one lightning indexer per layer from the frozen model's dense attention (KL warm-up)."""
    from dsarag.indexer_model.train import TrainConfig, run_training

    config = TrainConfig(
        seq_lens=_int_list(seq_len, "--seq-len"),
        steps=steps,
        sparse_steps=sparse_steps,
        topk=topk,
        sparse_dense_weight=sparse_dense_weight,
        boundary_topks=_int_list(boundary_topks, "--boundary-topks"),
        boundary_weight=boundary_weight,
        lr=lr,
        max_seconds=max_seconds,
        index_sets=index_sets,
        index_heads=index_heads,
        index_dim=index_dim,
        query_rows=query_rows,
        layers=_int_list(layers, "--layers"),
    )
    run_training(
        model,
        data,
        out,
        config,
        eval_data=eval_data,
        eval_lengths=_int_list(eval_lengths, "--eval-lengths"),
        device=device,
        log=stderr.print,
        init_from=init_from,
    )


@indexer_app.command("eval")
def evaluate(
    eval_data: Annotated[
        Path,
        typer.Option("--eval-data", help="Held-out text: a folder of .txt/.rst/.md, or token ids (.npy)."),
    ],
    model: ModelOption = "default",
    checkpoint: CheckpointOption = None,
    lengths: Annotated[str, typer.Option("--lengths", help="Comma-separated window lengths.")] = "8192,16384",
    ks: Annotated[str, typer.Option("--ks", help="Comma-separated top-k sizes.")] = "256,512,1024,2048",
    windows: Annotated[int, typer.Option("--windows", min=1, help="Windows per length, spread evenly.")] = 2,
    layers: Annotated[
        str,
        typer.Option("--layers", help="Comma-separated layers (default all; the forward stops after them)."),
    ] = "",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """Attention-mass recall of a checkpoint's indexers on held-out text: per layer and k, with the oracle."""
    import json

    from dsarag.indexer_model.train import evaluate_checkpoint

    results = evaluate_checkpoint(
        model,
        eval_data,
        checkpoint,
        _int_list(lengths, "--lengths"),
        _int_list(ks, "--ks"),
        windows,
        _int_list(layers, "--layers"),
        device,
        log=stderr.print,
    )
    if as_json:
        print(json.dumps(results, indent=1))
        return
    for result in results["recall"]:
        ks_here = list(result["indexer"])
        print(f"\n{result['seq_len']} tokens, windows at {result['windows']} (indexer / oracle)")
        print("| layer | " + " | ".join(f"k = {k}" for k in ks_here) + " |")
        print("|---|" + "---|" * len(ks_here))
        for i, layer in enumerate(result["layers"]):
            cells = [f"{result['indexer'][k][i]:.3f} / {result['oracle'][k][i]:.3f}" for k in ks_here]
            print(f"| {layer} | " + " | ".join(cells) + " |")
        means = [f"{result['indexer_mean'][k]:.3f} / {result['oracle_mean'][k]:.3f}" for k in ks_here]
        print("| mean | " + " | ".join(means) + " |")


@indexer_app.command("budget")
def budget(
    eval_data: Annotated[
        Path,
        typer.Option("--eval-data", help="Text to measure on (not the held-out text of the quality report)."),
    ],
    model: ModelOption = "default",
    checkpoint: CheckpointOption = None,
    topk: Annotated[int, typer.Option("--topk", min=256, help="The k the scales are measured around.")] = 512,
    length: Annotated[int, typer.Option("--length", help="Window length.")] = 16384,
    windows: Annotated[int, typer.Option("--windows", min=1, help="Windows, spread evenly.")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """Spread a top-k budget over the layers: measure each layer's recall at k/2, k and 2k, pick per-layer
    multipliers (1/2, 1 or 2, same keys in all) that keep the most attention mass, record them in the checkpoint."""
    import json

    from dsarag.indexer_model.checkpoint import write_topk_scales
    from dsarag.indexer_model.layer_budget import allocate_topk_scales, budget_recall
    from dsarag.indexer_model.train import evaluate_checkpoint

    ks = (topk // 2, topk, topk * 2)
    results = evaluate_checkpoint(
        model, eval_data, checkpoint, (length,), ks, windows, (), device, stderr.print
    )
    recall = {int(k): values for k, values in results["recall"][0]["indexer"].items()}
    scales = allocate_topk_scales(recall, topk)
    measurement = {
        "eval_data": str(eval_data),
        "length": length,
        "windows": results["recall"][0]["windows"],
        "topk": topk,
        "recall": {str(k): values for k, values in recall.items()},
        "mean_recall_uniform": budget_recall(recall, topk, [1.0] * len(scales)),
        "mean_recall_scaled": budget_recall(recall, topk, scales),
    }
    write_topk_scales(Path(results["checkpoint"]), scales, measurement)
    if as_json:
        print(json.dumps({"checkpoint": results["checkpoint"], "layer_topk_scales": scales, **measurement}))
        return
    print(f"{results['checkpoint']}: layer_topk_scales {list(scales)}")
    print(
        f"mean recall at k = {topk}, {length} tokens: uniform {measurement['mean_recall_uniform']:.4f}, "
        f"per layer {measurement['mean_recall_scaled']:.4f}"
    )


@indexer_app.command("tokenize")
def tokenize(
    folder: Annotated[
        Path, typer.Argument(help="Folder of .txt/.rst/.md files, read as `train --data` reads it.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Token ids to write (.npy).")],
    model: ModelOption = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Save a text folder's token ids for `train --data` / `--eval-data` on a machine with only the GGUF."""
    import json

    from dsarag.indexer_model.token_ids import write_token_ids

    summary = write_token_ids(model, folder, out)
    if as_json:
        print(json.dumps(summary))
        return
    print(
        f"{summary['out']}: {summary['tokens']:,} tokens from {summary['files']} files (sha256 {summary['sha256']})"
    )


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, got {text!r}") from None
