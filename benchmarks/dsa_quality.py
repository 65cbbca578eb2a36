"""DSA quality of the local generator: attention-mass recall, perplexity, multi-key NIAH and CPU prefill time.

Four steps; the GPU machine has no tokenizer, so NIAH prompts are tokenized here and answers decoded here:

    # 1. here: tokenize the NIAH cases (haystacks from held-out text, questions in the chat template)
    .venv/bin/python benchmarks/dsa_quality.py prepare --model default --variants 12 \\
        --heldout heldout.npy --out niah.json
    # 2. on the GPU (with the `gguf` wheel on PYTHONPATH): recall, perplexity, NIAH answers as token ids
    PYTHONPATH=. python3 benchmarks/dsa_quality.py measure --model qwen.gguf \\
        --heldout heldout.npy --niah niah.json --out gpu.json
    # 3. here: CPU prefill time, dense vs DSA
    .venv/bin/python benchmarks/dsa_quality.py measure --cpu-timing --model default \\
        --heldout heldout.npy --out cpu.json
    # 4. here: decode and score the answers, write the Markdown and the merged JSON beside it
    .venv/bin/python benchmarks/dsa_quality.py report --from-json gpu.json cpu.json --md report.md

`report --from-json report.json --md report.md` rewrites the Markdown from the merged JSON alone. `report` writes
only where `--md` names (required): docs/dsa-quality.md, the tables of the shipped checkpoint, is curated by hand
from such reports, and no default overwrites it. The modes, the merge, the scoring, the goals and the Markdown
are evals/dsa_quality_report.py. Held-out text: token ids of the Python 3.11 docs' `whatsnew/` folder (the
indexers were trained on the other parts; docs/benchmarks-pipeline.md, "Indexer training").
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsarag.evals.dsa_quality_report import (
    DEPTHS,
    Mode,
    check_goals,
    merge_results,
    modes_for,
    niah_summary,
    render_markdown,
    score_niah,
)
from dsarag.evals.niah import NiahCase, answer_case, build_case
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.model import ModelArgs, Transformer
from dsarag.indexer_model.oracle import oracle_selection
from dsarag.indexer_model.quality import window_nll
from dsarag.indexer_model.train import (
    RECALL_KS,
    TrainConfig,
    attention_mass_recall,
    make_indexers,
    window_starts,
)
from dsarag.kernels.backend import TORCH, resolve_backend

LENGTHS = (4096, 8192, 16384, 32768)


class Deadline:
    """Wall-clock budget of a run: sections skip the units that would start after it (0 = none)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.perf_counter()

    def passed(self) -> bool:
        return bool(self.seconds) and time.perf_counter() - self.started > self.seconds


class Recorder:
    """The result dict of a run, rewritten to disk after every unit so a killed run still leaves its data."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.data = path, {"runs": [meta]}
        path.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def run_meta(device: str) -> dict:
    return {
        "command": " ".join(["python", *sys.argv]),
        "device": device_name(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
        platform.processor(),
    )
    return f"{cpu}, {torch.get_num_threads()} threads"


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


# --- loading ---------------------------------------------------------------------------------------------


def load_base_model(spec: str, device: str, state_cache: Path | None) -> Transformer:
    """The frozen bf16 model; with `state_cache`, a .gguf is dequantized once and later runs load the cache."""
    from dsarag.indexer_model.train import load_frozen_model
    from dsarag.indexer_model.weights import build_model

    if state_cache is not None and state_cache.is_file():
        saved = torch.load(state_cache, weights_only=True)
        model = build_model(ModelArgs(**saved["args"]), saved["state"], state_cache)
        return model.to(device).requires_grad_(False)
    model = load_frozen_model(spec, device)
    if state_cache is not None:
        torch.save({"args": dataclasses.asdict(model.args), "state": model.state_dict()}, state_cache)
    return model


def load_trained_indexers(model: Transformer, checkpoint: Path | None) -> tuple[nn.ModuleList, Path]:
    """The trained indexers (fp32) of `checkpoint`, or of the checkpoint made for these exact weights."""
    from dsarag.indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint

    folder = checkpoint or find_checkpoint(weights_fingerprint(model))
    if folder is None:
        raise SystemExit("no trained indexer checkpoint matches these weights; pass --checkpoint")
    return load_checkpoint(folder, model.args.dim, model.args.n_layer), folder


def untrained_indexers(model: Transformer, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return make_indexers(model, TrainConfig())


# --- 1. attention-mass recall ------------------------------------------------------------------------------


def recall_section(
    model: Transformer,
    indexer_sets: dict[str, nn.ModuleList],
    heldout: np.ndarray,
    lengths: list[int],
    ks: tuple[int, ...],
    windows: int,
    deadline: Deadline,
    save: Callable[[dict], None],
) -> dict:
    """Per length: per-layer recall of the trained and untrained indexers, the oracle and sinks+recent,
    averaged over `windows` windows of held-out text (the last 512 queries of each)."""
    device = str(model.output.weight.device)
    trained = indexer_sets["trained"].float().to(device)
    untrained = indexer_sets["untrained"].float().to(device)
    section: dict = {}
    for length in lengths:
        if deadline.passed():
            section[str(length)] = {"skipped": "deadline"}
            continue
        started = time.perf_counter()
        starts = window_starts(len(heldout), length, windows)
        runs = [_recall_one_window(model, trained, untrained, heldout[s : s + length], ks) for s in starts]
        section[str(length)] = {
            "windows": starts,
            "query_rows": runs[0]["query_rows"],
            "layer_topk_scales": [indexer.topk_scale for indexer in indexer_sets["trained"]],
            **{
                name: _mean_per_layer([run[name] for run in runs]) for name in runs[0] if name != "query_rows"
            },
            "seconds": round(time.perf_counter() - started, 1),
        }
        save(section)
    return section


def _recall_one_window(
    model: Transformer,
    trained: nn.ModuleList,
    untrained: nn.ModuleList,
    tokens: np.ndarray,
    ks: tuple[int, ...],
) -> dict:
    result = attention_mass_recall(model, trained, tokens, ks)
    baseline = attention_mass_recall(model, untrained, tokens, ks)
    return {
        "query_rows": result["query_rows"],
        "trained": result["indexer"],
        "oracle": result["oracle"],
        "recent": result["recent"],
        "untrained": baseline["indexer"],
    }


def _mean_per_layer(runs: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    return {k: np.mean([run[k] for run in runs], axis=0).round(4).tolist() for k in runs[0]}


# --- 2. perplexity -----------------------------------------------------------------------------------------


def perplexity_section(
    model: Transformer,
    indexer_sets: dict[str, nn.ModuleList],
    heldout: np.ndarray,
    lengths: list[int],
    windows: int,
    scored: int,
    modes: list[Mode],
    deadline: Deadline,
    save: Callable[[dict], None],
) -> dict:
    """Per length and mode: perplexity of the last `scored` tokens of `windows` held-out windows."""
    section: dict = {}
    for length in lengths:
        starts = window_starts(len(heldout), length + 1, windows)
        entry: dict = {"windows": starts, "scored": scored, "modes": {}}
        section[str(length)] = entry
        for mode in modes:
            if deadline.passed():
                entry["modes"][mode.name] = {"skipped": "deadline"}
                continue
            model.attach_indexers(indexer_sets[mode.indexers])
            runs = [window_nll(model, heldout[s : s + length + 1], scored, mode.dsa()) for s in starts]
            nll = sum(run[0] for run in runs)
            entry["modes"][mode.name] = {
                "nll_per_window": [round(run[0] / scored, 5) for run in runs],
                "ppl": round(float(np.exp(nll / (scored * len(runs)))), 4),
                "seconds": [round(run[1], 2) for run in runs],
            }
            save(section)
    return section


# --- 3. needle in a haystack -------------------------------------------------------------------------------


def niah_section(
    model: Transformer,
    indexer_sets: dict[str, nn.ModuleList],
    spec: dict,
    modes: list[Mode],
    deadline: Deadline,
    save: Callable[[dict], None],
    variants: list[int] | None = None,
) -> dict:
    """Every case (or those of `variants`) under every mode; answers stay token ids, decoded by `report`."""
    # Variant by variant, each over every length: a deadline then cuts trials, not whole lengths.
    cases = sorted(spec["cases"], key=lambda case: (case["meta"].get("variant", 0), case["length"]))
    if variants is not None:
        cases = [case for case in cases if case["meta"].get("variant", 0) in variants]
    section: dict = {"modes": [mode.name for mode in modes], "cases": []}
    stop_ids = set(spec["stop_ids"])
    for data in cases:
        case = NiahCase.from_json(data)
        entry = {
            "length": case.length,
            "needles": [vars(n) for n in case.needles],
            "meta": case.meta,
            "modes": {},
        }
        section["cases"].append(entry)
        for mode in modes:
            if deadline.passed():
                entry["modes"][mode.name] = {"skipped": "deadline"}
                continue
            model.attach_indexers(indexer_sets[mode.indexers])
            with oracle_selection(model, mode.indexers == "oracle"):
                entry["modes"][mode.name] = answer_case(
                    model, case, mode.dsa(), spec["max_new_tokens"], stop_ids
                )
        save(section)
    return section


# --- 4. CPU prefill time -----------------------------------------------------------------------------------


@torch.inference_mode()
def prefill_seconds(model: Transformer, ids: np.ndarray, dsa: DSAConfig | None) -> float:
    model.setup_caches(1, len(ids))
    prompt = torch.from_numpy(ids.astype(np.int64))[None]
    started = time.perf_counter()
    model(prompt, torch.arange(len(ids)), last_logits_only=True, dsa=dsa)
    return time.perf_counter() - started


def load_average() -> float:
    """The 1-minute load average: other processes on a shared CPU slow a timing down."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def cpu_timing_section(
    model: Transformer,
    trained: nn.ModuleList,
    heldout: np.ndarray,
    lengths: list[int],
    topk: int,
    limit_s: float,
    save: Callable[[dict], None],
    log: Callable[[str], None],
    modes: tuple[str, ...] = ("dense", "dsa"),
) -> dict:
    """Prefill seconds per length in the CPU's default dtype, dense (no indexer attached) then DSA at `topk`
    (the compiled CPU kernels where they build) and, among `modes`, DSA on the PyTorch path; one measurement each.
    A length is skipped when even a linear extrapolation of the previous one exceeds `limit_s` (attention and
    the indexer grow quadratically, so the real time would be longer still)."""
    from dsarag.indexer_model.weights import default_dtype

    model.to(default_dtype("cpu"))  # what `dsarag ask` runs on this CPU: fp32 unless it has fast bf16
    dtype = next(model.parameters()).dtype
    backends = {
        "dsa": resolve_backend("cpu", dtype),
        "dsa-torch": TORCH,
    }  # what `ask` runs, and PyTorch beside it
    section: dict = {
        "topk": topk,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "dsa_kernels": backends["dsa"].name,
        "lengths": {},
    }
    for length in lengths:
        section["lengths"][str(length)] = {}
    prefill_seconds(model, heldout[:256], None)  # warm-up: first-call allocations
    for mode in ("dense", "dsa", "dsa-torch"):
        if mode not in modes:
            continue
        dsa = None
        if mode in backends:
            dsa = DSAConfig(topk=topk, dense_threshold=0)
            model.use_backend(backends[mode])
            model.attach_indexers(trained)
        previous: tuple[int, float] | None = None
        for length in lengths:
            entry = section["lengths"][str(length)]
            estimate = previous[1] * length / previous[0] if previous else 0.0
            if estimate > limit_s:
                entry[f"{mode}_skipped"] = f"estimated over {estimate:.0f} s from {previous[0]} tokens"
                log(f"{mode} {length}: skipped ({entry[f'{mode}_skipped']})")
                continue
            load = load_average()
            seconds = prefill_seconds(model, heldout[:length], dsa)
            entry[f"{mode}_s"], entry[f"{mode}_load"] = round(seconds, 2), [load, load_average()]
            log(f"{mode} {length}: {seconds:.1f} s")
            previous = (length, seconds)
            save(section)
    return section


# --- measure: run the sections -----------------------------------------------------------------------------


def measure(options: argparse.Namespace) -> None:
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    recorder = Recorder(options.out, run_meta(device))
    deadline = Deadline(options.deadline_s)
    started = time.perf_counter()
    model = load_base_model(options.model, device, options.state_cache)
    trained, folder = load_trained_indexers(model, options.checkpoint)
    recorder.data["runs"][0].update(
        model=options.model, checkpoint=str(folder), load_s=time.perf_counter() - started
    )
    heldout = np.load(options.heldout).astype(np.int64)
    recorder.data["runs"][0]["heldout"] = {"path": str(options.heldout), "tokens": len(heldout)}
    run_sections(model, trained, heldout, options, deadline, recorder)
    recorder.data["runs"][0]["seconds"] = round(time.perf_counter() - started, 1)
    recorder.save()


def run_sections(
    model: Transformer,
    trained: nn.ModuleList,
    heldout: np.ndarray,
    options: argparse.Namespace,
    deadline: Deadline,
    recorder: Recorder,
) -> None:
    """The sections named in --sections (or --cpu-timing), each saved as it goes under its own key."""

    def saver(key: str) -> Callable[[dict], None]:
        def save(section: dict) -> None:
            recorder.data[key] = section
            recorder.save()

        return save

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # The oracle keeps the trained indexers attached: their key caches stay written, so dense steps and
    # CUDA-graph decode steps run as in the trained modes.
    indexer_sets = {"trained": trained, "untrained": untrained_indexers(model), "oracle": trained}
    max_len = model.args.max_seq_len
    if options.cpu_timing:
        cpu_timing_section(
            model,
            trained,
            heldout,
            options.timing_lengths,
            options.timing_topk,
            options.limit_s,
            saver("cpu_timing"),
            log,
            tuple(options.timing_modes.split(",")),
        )
        return
    sections = options.sections.split(",")
    if "recall" in sections:
        lengths = [n for n in options.recall_lengths if n <= max_len]
        recall_section(
            model,
            indexer_sets,
            heldout,
            lengths,
            tuple(options.ks),
            options.recall_windows,
            deadline,
            saver("recall"),
        )
        log(f"recall done at {deadline_elapsed(deadline):.0f} s")
    # Attaching casts the indexers to the model's dtype in place: later sections get their own copies.
    indexer_sets = {name: copy.deepcopy(indexers) for name, indexers in indexer_sets.items()}
    if "ppl" in sections:
        lengths = [n for n in options.ppl_lengths if n <= max_len]
        modes = modes_for(options.ppl_topks, None, tuple(options.dense_layers), options.uniform_too)
        perplexity_section(
            model,
            indexer_sets,
            heldout,
            lengths,
            options.ppl_windows,
            options.ppl_scored,
            modes,
            deadline,
            saver("perplexity"),
        )
        log(f"perplexity done at {deadline_elapsed(deadline):.0f} s")
    if "niah" in sections:
        spec = json.loads(options.niah.read_text())
        modes = modes_for(
            options.niah_topks,
            options.untrained_topk,
            tuple(options.dense_layers),
            options.uniform_too,
            options.dense_decode,
            tuple(options.dense_tails),
            options.oracle,
        )
        if options.only_modes:  # the rest measured before on the same haystacks: `report` joins the runs
            modes = [mode for mode in modes if mode.name in options.only_modes]
        recorder.data["niah_spec"] = {key: value for key, value in spec.items() if key != "cases"}
        niah_section(model, indexer_sets, spec, modes, deadline, saver("niah"), options.niah_variants)
        log(f"niah done at {deadline_elapsed(deadline):.0f} s")


def deadline_elapsed(deadline: Deadline) -> float:
    return time.perf_counter() - deadline.started


# --- prepare: tokenize the NIAH cases ----------------------------------------------------------------------


def prepare(options: argparse.Namespace) -> None:
    from dsarag.indexer_model.generate import stop_token_ids
    from dsarag.indexer_model.resolve import resolve_model
    from dsarag.indexer_model.tokenizer import ChatTokenizer
    from dsarag.indexer_model.weights import load_config

    folder = resolve_model(options.model)
    tokenizer = ChatTokenizer(folder)
    max_seq_len = load_config(folder)[1].max_seq_len
    heldout = np.load(options.heldout).astype(np.int64)
    line_ends = {int(i) for i in np.unique(heldout) if "\n" in tokenizer.decode([int(i)])}
    rng = np.random.default_rng(options.seed)
    cases = []
    for length in options.niah_lengths:
        length = min(length, max_seq_len - options.max_new_tokens)
        for variant in range(options.variants):
            start = int(rng.integers(0, len(heldout) - length))
            case = build_case(tokenizer, heldout[start : start + length], length, DEPTHS, rng, line_ends)
            case.meta = {"variant": variant, "filler_start": start, "requested_length": length}
            cases.append(case.to_json())
    spec = {
        "model": options.model,
        "heldout": str(options.heldout),
        "depths": list(DEPTHS),
        "max_new_tokens": options.max_new_tokens,
        "stop_ids": sorted(stop_token_ids(folder, tokenizer)),
        "cases": cases,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(spec) + "\n")
    print(f"{len(cases)} cases, {sum(len(c['question_ids']) for c in cases)} questions -> {options.out}")


# --- report: score and write Markdown ----------------------------------------------------------------------


def report(options: argparse.Namespace) -> None:
    data = merge_results(options.from_json, options.niah_modes)
    if "niah" in data:
        from dsarag.indexer_model.resolve import resolve_model
        from dsarag.indexer_model.tokenizer import ChatTokenizer

        tokenizer = ChatTokenizer(resolve_model(data.get("niah_spec", {}).get("model", "default")))
        rows = score_niah(data["niah"], tokenizer.decode)
        data["niah_scored"] = {"rows": rows, "summary": niah_summary(rows)}
    data["goals"] = check_goals(data)
    data["notes"] = options.note if options.note is not None else data.get("notes", [])
    options.md.parent.mkdir(parents=True, exist_ok=True)
    options.md.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    options.md.write_text(render_markdown(data))
    print(f"wrote {options.md} and {options.md.with_suffix('.json')}")


# --- command line ------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prepare", help="tokenize the NIAH cases (needs the tokenizer)")
    prep.add_argument("--model", default="default")
    prep.add_argument("--heldout", type=Path, required=True)
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--niah-lengths", type=_ints, default=list(LENGTHS))
    prep.add_argument("--variants", type=int, default=3, help="haystacks per length (each asks every needle)")
    prep.add_argument("--max-new-tokens", type=int, default=10)
    prep.add_argument("--seed", type=int, default=0)

    run = commands.add_parser("measure", help="recall, perplexity, NIAH answers; or --cpu-timing")
    run.add_argument("--model", default="default", help="default, tiny, a model folder or a .gguf path")
    run.add_argument(
        "--checkpoint", type=Path, default=None, help="indexer checkpoint (default: by fingerprint)"
    )
    run.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--device", default=None)
    run.add_argument(
        "--state-cache", type=Path, default=None, help="bf16 weights cache (skips GGUF dequantizing)"
    )
    run.add_argument("--sections", default="recall,ppl,niah")
    run.add_argument("--deadline-s", type=float, default=0.0, help="start no new unit after this (0 = none)")
    run.add_argument("--recall-lengths", type=_ints, default=[8192, 16384])
    run.add_argument("--ks", type=_ints, default=list(RECALL_KS))
    run.add_argument("--recall-windows", type=int, default=2)
    run.add_argument("--ppl-lengths", type=_ints, default=list(LENGTHS))
    run.add_argument("--ppl-windows", type=int, default=2)
    run.add_argument("--ppl-scored", type=int, default=1024)
    run.add_argument("--ppl-topks", type=_ints, default=[2048, 512])
    run.add_argument("--niah", type=Path, default=None, help="cases written by `prepare`")
    run.add_argument("--niah-topks", type=_ints, default=[2048, 512])
    run.add_argument("--untrained-topk", type=int, default=2048)
    run.add_argument(
        "--dense-layers",
        type=_ints,
        default=[],
        help="also run each DSA mode with these layers dense (perplexity and NIAH), e.g. 0",
    )
    run.add_argument("--niah-variants", type=_ints, default=None, help="run only these haystack variants")
    run.add_argument(
        "--only-modes", type=lambda text: text.split(","), default=None, help="NIAH: run only these modes"
    )
    run.add_argument(
        "--uniform-too", action="store_true", help="also run each DSA mode with one k for every layer"
    )
    run.add_argument(
        "--dense-decode",
        action="store_true",
        help="NIAH: the DSA modes prefill sparsely and decode densely, as --attention auto answers",
    )
    run.add_argument(
        "--dense-tails",
        type=_ints,
        default=[0],
        help="NIAH: run the DSA modes with each of these many last prompt positions attending densely, e.g. 0,64",
    )
    run.add_argument(
        "--oracle",
        action="store_true",
        help="NIAH: also run each DSA mode with the top-k of the true attention (oracle-K...), a perfect indexer",
    )
    run.add_argument("--cpu-timing", action="store_true", help="only time CPU prefill, dense vs DSA")
    run.add_argument("--timing-lengths", type=_ints, default=[4096, 8192, 16384])
    run.add_argument("--timing-topk", type=int, default=2048)
    run.add_argument(
        "--timing-modes", default="dense,dsa", help="which prefills to time: dense, dsa, dsa-torch"
    )
    run.add_argument(
        "--limit-s", type=float, default=300.0, help="skip a DSA timing estimated longer than this"
    )

    rep = commands.add_parser("report", help="score NIAH answers, write Markdown + JSON where --md names")
    rep.add_argument("--from-json", type=Path, nargs="+", required=True)
    rep.add_argument(
        "--md",
        type=Path,
        required=True,
        help="the Markdown to write, the merged JSON beside it (.json); no default: docs/dsa-quality.md is "
        "curated by hand",
    )
    rep.add_argument("--note", action="append", help="a line for the Notes section (repeatable)")
    rep.add_argument(
        "--niah-modes", type=lambda text: text.split(","), default=None, help="report only these NIAH modes"
    )
    return parser.parse_args(argv)


def main() -> None:
    options = parse_args()
    if options.command == "prepare":
        prepare(options)
    elif options.command == "measure":
        if options.cpu_timing:
            torch.set_num_threads(os.cpu_count() or 1)
        measure(options)
    else:
        report(options)


if __name__ == "__main__":
    main()
