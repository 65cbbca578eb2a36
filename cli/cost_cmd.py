"""`dsarag cost report` and `dsarag bench`: what answers cost, and dense vs sparse across context lengths."""

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dsarag.base.errors import BadInputError

cost_app = typer.Typer(help="The cost ledger of answered questions.", no_args_is_help=True)
stderr = Console(stderr=True)

PRICE_ENV = "DSARAG_GPU_PRICE"


def gpu_price(price_per_hour: float | None) -> float:
    """--price-per-hour, else $DSARAG_GPU_PRICE, else $2 (DeepSeek's published curve uses $2/GPU-hour)."""
    if price_per_hour is None:
        raw = os.environ.get(PRICE_ENV, "2.0")
        try:
            price_per_hour = float(raw)
        except ValueError:
            raise BadInputError(
                f"${PRICE_ENV}={raw!r} is not a number — set it to dollars per GPU-hour"
            ) from None
    if price_per_hour < 0:
        raise BadInputError(f"GPU price {price_per_hour} is negative — pass dollars per GPU-hour, e.g. 2.0")
    return price_per_hour


def render_cost(cost: dict) -> None:
    """The compact meter after an answer: sparse vs dense, analytic, with what was measured."""
    if not cost:
        return
    dense, sparse = cost["dense"], cost["sparse"]
    k = f"k = {cost['topk']}" if cost["mode_ran"] == "sparse" else f"sparse column at k = {cost['topk']}"
    table = Table(title=f"cost: ran {cost['mode_ran']} ({k}), {cost['prompt_tokens']} tokens in")
    for column in ("", "dense", "sparse", "saving"):
        table.add_column(column, justify="right")

    def saving(a: float, b: float) -> str:
        return f"{1 - b / a:.0%}" if a else ""

    dense_flops = dense["prefill_flops"] + dense["decode_flops"]
    sparse_flops = sparse["prefill_flops"] + sparse["decode_flops"]
    table.add_row(
        "GFLOP", f"{dense_flops / 1e9:,.1f}", f"{sparse_flops / 1e9:,.1f}", saving(dense_flops, sparse_flops)
    )
    table.add_row(
        "decode MB read", f"{dense['decode_bytes'] / 2**20:,.1f}", f"{sparse['decode_bytes'] / 2**20:,.1f}",
        saving(dense["decode_bytes"], sparse["decode_bytes"]),
    )  # fmt: skip
    table.add_row(
        f"GPU ms / $ ({cost['gpu']['name']})",
        f"{dense['roofline_ms']:.2f} / ${dense['dollars']:.2e}",
        f"{sparse['roofline_ms']:.2f} / ${sparse['dollars']:.2e}",
        saving(dense["dollars"], sparse["dollars"]),
    )
    measured = cost["measured"]
    stderr.print(table)
    line = (
        f"measured here ({cost['mode_ran']}): prefill {measured['prefill_s']:.2f}s, decode {measured['decode_s']:.2f}s"
        f", {measured['tokens_per_s'] or 0:.1f} tok/s, peak {measured['peak_memory_mb']:.0f} MB"
        f", ${measured['dollars_at_price']:.2e} at ${cost['gpu']['price_per_hour']}/h"
    )
    compare = cost.get("compare")
    if compare and "skipped" in compare:
        line += f"; compare: {compare['skipped']}"
    elif compare:
        agreement = (
            "same answer" if compare["answers_identical"] else f"word overlap {compare['token_overlap']:.0%}"
        )
        line += f"; sparse vs dense measured: {compare['speedup']:.2f}× ({agreement})"
    stderr.print(f"[dim]{line}[/]", highlight=False)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInputError(
            f"{option} {text!r}: give comma-separated whole numbers, e.g. 1024,4096"
        ) from None
    if not values or min(values) < 1:
        raise BadInputError(f"{option} {text!r}: give at least one positive number")
    return values


@cost_app.command("report")
def report(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Sum the ledger: answers, tokens, measured time and $, and the analytic saving — per day, per mode."""
    from dsarag.rag.cost_ledger import cost_report, ledger_dir, read_ledger

    summary = cost_report(read_ledger())
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    if not summary["total"]["answers"]:
        stderr.print(f"no answers in the ledger yet ({ledger_dir()}): run `dsarag ask` first")
        return
    groups = [("total", summary["total"])]
    groups += [(f"day {day}", values) for day, values in summary["by_day"].items()]
    groups += [(f"mode {mode}", values) for mode, values in summary["by_mode"].items()]
    rows = [
        (
            name,
            str(values["answers"]),
            f"{values['prompt_tokens']:,}/{values['new_tokens']:,}",
            f"{values['measured_s']:.1f}",
            f"{values['measured_dollars']:.1e}",
            f"{values['dense_dollars']:.1e}",
            f"{values['sparse_dollars']:.1e}",
            f"{values['flops_saving']:.0%}",
        )
        for name, values in groups
    ]
    # One-word headers and no borders: the table fits an 80-column terminal without cutting a figure.
    table = Table(
        title="cost ledger: tokens in/out; seconds and $ measured; dense, sparse $ analytic",
        box=None,
        pad_edge=False,
    )
    for header in ("group", "answers", "tokens", "seconds", "$", "dense $", "sparse $", "saving"):
        table.add_column(header, justify="left" if header == "group" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    stderr.print(table)


def bench(
    out: Annotated[Path, typer.Option("--out", help="Folder for bench.json and the PNG plots.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Generator (see `dsarag ask --model`).")
    ] = None,
    lengths: Annotated[
        str, typer.Option("--lengths", help="Context lengths, comma-separated.")
    ] = "1024,4096,8192",
    topk: Annotated[
        str, typer.Option("--topk", help="Top-k values to sweep, comma-separated.")
    ] = "256,512,2048",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    decode_steps: Annotated[
        int, typer.Option("--decode-steps", min=1, help="Decode steps timed per run.")
    ] = 8,
    price_per_hour: Annotated[
        float | None, typer.Option("--price-per-hour", help=f"GPU $/hour for the curves (env {PRICE_ENV}).")
    ] = None,
    repeats: Annotated[
        int,
        typer.Option("--repeats", min=1, help="A served model (openai:…): requests per length (medians)."),
    ] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result JSON on stdout.")] = False,
) -> None:
    """Sweep context length and top-k: dense vs sparse latency, accuracy, analytic cost; JSON + PNG plots.
    With a served model (--model openai:…): time to first text and decode tokens/s per length."""
    from dsarag.rag.remote_endpoint import is_remote_spec

    length_list = _int_list(lengths, "--lengths")
    if is_remote_spec(model):
        _bench_served(model, out, length_list, decode_steps, repeats, json_out)
        return
    from dsarag.evals.bench import bench as run_bench
    from dsarag.evals.bench import write_report
    from dsarag.indexer_model.generate import load_generator
    from dsarag.rag.cost import GpuSpec

    topk_list = _int_list(topk, "--topk")
    gpu = GpuSpec(price_per_hour=gpu_price(price_per_hour))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BadInputError("--device cuda: no CUDA GPU is visible here — use --device cpu")
    generator = load_generator(model, device=device)
    stderr.print(f"bench {generator.name} on {device}: L = {length_list}, k = {topk_list}")
    result = run_bench(generator, length_list, topk_list, device, decode_steps, gpu)
    written = write_report(result, out)
    table = Table(title=f"dense vs sparse — {result['model']} on {result['device']}")
    for column in (
        "L",
        "mode",
        "k",
        "prefill s",
        "decode ms/tok",
        "speedup (FLOP ratio)",
        "agreement",
        "peak MB",
    ):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        speedup = (
            f"{row['measured_prefill_speedup']:.2f}× ({row['analytic_prefill_flop_ratio']:.2f}×)"
            if row["mode"] == "sparse"
            else ""
        )
        table.add_row(
            str(row["length"]),
            row["mode"],
            str(row["topk"] or ""),
            f"{row['prefill_s']:.3f}",
            f"{row['decode_ms_per_token']:.1f}",
            speedup,
            f"{row['accuracy']:.2f}",
            f"{row['peak_memory_mb']:.0f}",
        )
    stderr.print(table)
    stderr.print("wrote " + ", ".join(str(path) for path in written))
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")


def _bench_served(
    spec: str, out: Path, lengths: list[int], new_tokens: int, repeats: int, json_out: bool
) -> None:
    from dsarag.base.atomic import atomic_write_json
    from dsarag.evals.bench_served import bench_served
    from dsarag.rag.remote_generator import connect

    generator = connect(spec)
    stderr.print(f"bench {generator.name}: L = {lengths}, {new_tokens} new tokens, {repeats} requests each")
    result = bench_served(generator, lengths, new_tokens, repeats)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", result)
    table = Table(title=f"{result['model']} at {result['endpoint']} (medians of {repeats})")
    for column in ("L", "prompt tokens", "first text s", "decode tok/s", "attention", "dense ÷ sparse FLOPs"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        ratio = row.get("analytic_prefill_flop_ratio")
        table.add_row(
            str(row["length"]),
            str(row["prompt_tokens"]),
            f"{row['first_text_s']:.3f}",
            f"{row['decode_tokens_per_s']:.1f}",
            row["attention"],
            f"{ratio:.2f}×" if ratio else "unknown",
        )
    stderr.print(table)
    stderr.print(f"wrote {out / 'bench.json'}")
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
