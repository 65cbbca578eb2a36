"""`dsarag bench`: dense against sparse attention across context length and top-k, measured and analytic.

For each context length L (filled with the demo corpus' text, repeated) the dense prefill is timed, then
`decode_steps` decode steps whose greedy tokens become the reference; for each k < L the sparse prefill and the
same decode steps (teacher-forced on the dense tokens) are timed, and accuracy is the share of steps whose
greedy token equals dense's. Beside each measured time ratio sits the analytic FLOP ratio of `rag.cost`.
Writes bench.json and two plots: the cost per million tokens against token position (prefill and decode,
dense vs sparse: DeepSeek-V3.2's Figure 3 axes) and latency / accuracy against k.
"""

import json
import time
from pathlib import Path

import torch

from dsarag.base.errors import BadInputError
from dsarag.corpora.demo_corpus import DEMO_DOCS
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.generate import Generator
from dsarag.rag.cost import GpuSpec, ModelShape, dollars_per_million_tokens, peak_memory_mb, prefill_cost


def context_ids(generator: Generator, length: int) -> torch.Tensor:
    """`length` token ids of real text: the demo documents, repeated as often as needed."""
    text = "\n\n".join(path.read_text() for path in sorted(DEMO_DOCS.glob("*.md")))
    ids = generator.tokenizer.encode(text)
    repeats = -(-length // len(ids))
    return torch.tensor((ids * repeats)[:length]).unsqueeze(0)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def run_mode(generator: Generator, ids: torch.Tensor, dsa: DSAConfig | None, reference: list[int] | None,
             decode_steps: int, device: str) -> dict:  # fmt: skip
    """Prefill + decode steps; greedy tokens (teacher-forced on `reference` when given), times, peak memory."""
    model = generator.model
    length = ids.shape[1]
    model.setup_caches(1, length + decode_steps + 1)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _synchronize(device)
    started = time.perf_counter()
    logits = model(ids, torch.arange(length, device=device), dsa=dsa)[:, -1]
    _synchronize(device)
    prefill_s = time.perf_counter() - started
    tokens = [int(logits.argmax(-1))]
    started = time.perf_counter()
    for step in range(decode_steps):
        feed = reference[step] if reference is not None else tokens[-1]
        position = torch.tensor([length + step], device=device)
        logits = model(torch.tensor([[feed]], device=device), position, dsa=dsa)[:, -1]
        tokens.append(int(logits.argmax(-1)))
    _synchronize(device)
    decode_s = time.perf_counter() - started
    return {
        "prefill_s": prefill_s,
        "decode_ms_per_token": 1e3 * decode_s / max(1, decode_steps),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "tokens": tokens,
    }


def bench(generator: Generator, lengths: list[int], topks: list[int], device: str, decode_steps: int,
          gpu: GpuSpec) -> dict:  # fmt: skip
    """The sweep; rows per (L, mode, k) with measured and analytic figures."""
    if not generator.model.has_indexers:
        raise BadInputError(
            f"model {generator.name} has no trained lightning indexer, so sparse attention cannot run — "
            "train one with `dsarag indexer train` or pick a model that ships one (default, tiny)"
        )
    shape = ModelShape.of(generator.model)
    warmup = context_ids(generator, min(lengths)).to(device)  # kernel compilation stays out of the timings
    for topk in topks:
        if topk < warmup.shape[1]:
            run_mode(generator, warmup, DSAConfig(topk=topk, dense_threshold=0), None, 1, device)
    run_mode(generator, warmup, None, None, 1, device)
    rows = []
    for length in lengths:
        ids = context_ids(generator, length).to(device)
        if device.startswith("cuda"):  # each length compiles its own kernel variants: run once untimed
            run_mode(generator, ids, None, None, decode_steps, device)
        dense = run_mode(generator, ids, None, None, decode_steps, device)
        reference = dense["tokens"]
        rows.append({"length": length, "mode": "dense", "topk": None, "accuracy": 1.0, **dense})
        for topk in topks:
            if topk >= length:
                continue  # k covers every key: sparse would be dense
            dsa = DSAConfig(topk=topk, dense_threshold=0)
            if device.startswith("cuda"):
                run_mode(generator, ids, dsa, reference, decode_steps, device)
            sparse = run_mode(generator, ids, dsa, reference, decode_steps, device)
            agree = sum(a == b for a, b in zip(sparse["tokens"], reference, strict=True)) / len(reference)
            analytic = prefill_cost(shape, length, None).flops / prefill_cost(shape, length, topk).flops
            rows.append({
                "length": length, "mode": "sparse", "topk": topk, "accuracy": agree, **sparse,
                "measured_prefill_speedup": dense["prefill_s"] / sparse["prefill_s"],
                "measured_decode_speedup": dense["decode_ms_per_token"] / sparse["decode_ms_per_token"],
                "analytic_prefill_flop_ratio": analytic,
            })  # fmt: skip
    positions = sorted({1024 * 2**i for i in range(8)} | set(lengths))
    curve_k = max(topks)  # DeepSeek's curve is drawn at k = 2048
    curves = {
        phase: {
            mode: [dollars_per_million_tokens(shape, p, phase, k, gpu) for p in positions]
            for mode, k in (("dense", None), ("sparse", curve_k))
        }
        for phase in ("prefill", "decode")
    }
    return {
        "model": generator.name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "gpu_assumed": vars(gpu),
        "decode_steps": decode_steps,
        "rows": [{key: value for key, value in row.items() if key != "tokens"} for row in rows],
        "cost_curves": {"positions": positions, "topk": curve_k, **curves},
    }


def write_report(result: dict, out: Path) -> list[Path]:
    """bench.json, cost_per_million.png and latency_accuracy_vs_k.png under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json"]
    written[0].write_text(json.dumps(result, indent=1))

    curves = result["cost_curves"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, phase in zip(axes, ("prefill", "decode"), strict=True):
        for mode in ("dense", "sparse"):
            label = mode if mode == "dense" else f"sparse (k = {curves['topk']})"
            axis.plot([p / 1024 for p in curves["positions"]], curves[phase][mode], marker="o", label=label)
        axis.set(title=f"{phase}", xlabel="token position (K)", ylabel="$ per million tokens")
        axis.legend()
    figure.suptitle(
        f"{result['model']}: cost at ${result['gpu_assumed']['price_per_hour']}/GPU-hour (analytic)"
    )
    figure.tight_layout()
    written.append(out / "cost_per_million.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    figure, (latency, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for length in sorted({row["length"] for row in result["rows"]}):
        dense = next(r for r in result["rows"] if r["length"] == length and r["mode"] == "dense")
        sparse = sorted((r for r in result["rows"] if r["length"] == length and r["mode"] == "sparse"),
                        key=lambda r: r["topk"])  # fmt: skip
        if not sparse:
            continue
        ks = [r["topk"] for r in sparse]
        line = latency.plot(ks, [r["prefill_s"] for r in sparse], marker="o", label=f"L = {length}")[0]
        latency.axhline(dense["prefill_s"], color=line.get_color(), linestyle="--")
        accuracy.plot(ks, [r["accuracy"] for r in sparse], marker="o", label=f"L = {length}")
    latency.set(title="prefill latency (dashed: dense)", xlabel="top-k", ylabel="seconds", xscale="log")
    accuracy.set(title="greedy-token agreement with dense", xlabel="top-k", ylabel="share", xscale="log",
                 ylim=(0, 1.05))  # fmt: skip
    latency.legend()
    accuracy.legend()
    figure.tight_layout()
    written.append(out / "latency_accuracy_vs_k.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    return written
