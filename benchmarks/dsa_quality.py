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

`report --from-json report.json` rewrites the Markdown from the merged JSON alone; docs/dsa-quality.md keeps the
tables of the shipped checkpoint. Held-out text: token ids of the Python 3.11 docs' `whatsnew/` folder (the
indexers were trained on the other parts; docs/benchmarks.md, "Indexer training").
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

from evals.niah import NiahCase, answer_case, build_case, is_correct
from indexer_model.dsa import DSAConfig
from indexer_model.layer_budget import budget_recall
from indexer_model.model import ModelArgs, Transformer
from indexer_model.oracle import oracle_selection
from indexer_model.quality import window_nll
from indexer_model.train import (
    RECALL_KS,
    TrainConfig,
    attention_mass_recall,
    make_indexers,
    window_starts,
)

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (0.1, 0.5, 0.9)
LENGTHS = (4096, 8192, 16384, 32768)
GOALS = {
    "recall_2048": 0.95,
    "recall_2048_of_oracle": 0.98,
    "recall_512": 0.87,
    "niah_points": 2.0,
    "ppl_16k": 0.02,
}


@dataclasses.dataclass(frozen=True)
class Mode:
    """One attention setting: dense (topk None), or DSA at `topk` with the trained or an untrained indexer, or
    with the oracle's selection (indexer_model/oracle.py: the top-k of the layer's own dense attention)."""

    name: str
    topk: int | None
    indexers: str = "trained"
    dense_layers: tuple[int, ...] = ()
    per_layer_topk: bool = True  # the checkpoint's per-layer scales of k, if it has any
    # False: a sparse prefill, then dense decode steps (what `--attention auto` runs)
    sparse_decode: bool = True
    dense_tail: int = 0  # the prompt's last positions attending densely (what `--attention auto` runs)

    def dsa(self) -> DSAConfig | None:
        if self.topk is None:
            return None
        return DSAConfig(
            topk=self.topk,
            dense_threshold=0,
            dense_layers=self.dense_layers,
            per_layer_topk=self.per_layer_topk,
            sparse_decode=self.sparse_decode,
            dense_tail=self.dense_tail,
        )


def modes_for(
    topks: list[int],
    untrained_topk: int | None,
    dense_layers: tuple[int, ...] = (),
    uniform_too: bool = False,
    dense_decode: bool = False,
    dense_tails: tuple[int, ...] = (0,),
    oracle: bool = False,
) -> list[Mode]:
    """Dense, DSA at each k, and with `dense_layers` the same DSA modes with those layers kept dense beside them
    (named e.g. dsa-2048-dense0, or dsa-512-dense-decode-tail32-dense0+23); with `uniform_too` the DSA modes with
    one k for every layer (dsa-2048-uniform, beside the checkpoint's per-layer k); then the untrained floor. With `dense_decode` the trained DSA modes
    prefill sparsely and decode densely, as `--attention auto` answers (named e.g. dsa-2048-dense-decode), and
    each of `dense_tails` gives them that many last prompt positions attending densely (e.g. dsa-2048-tail64).
    With `oracle` each of those DSA modes also runs with the oracle's selection (oracle-2048-dense-decode-tail32)."""
    decode = "-dense-decode" if dense_decode else ""
    modes = [Mode("dense", None)] + [
        Mode(
            f"dsa-{k}{decode}{f'-tail{tail}' if tail else ''}",
            k,
            sparse_decode=not dense_decode,
            dense_tail=tail,
        )
        for tail in dense_tails
        for k in topks
    ]
    if oracle:
        modes += [
            dataclasses.replace(mode, name=mode.name.replace("dsa-", "oracle-", 1), indexers="oracle")
            for mode in modes[1:]
        ]
    if uniform_too:
        modes += [Mode(f"dsa-{k}-uniform", k, per_layer_topk=False) for k in topks]
    if dense_layers:
        suffix = "dense" + "+".join(map(str, dense_layers))
        modes += [
            Mode(
                f"dsa-{k}{decode}{f'-tail{tail}' if tail else ''}-{suffix}",
                k,
                dense_layers=dense_layers,
                sparse_decode=not dense_decode,
                dense_tail=tail,
            )
            for tail in dense_tails
            for k in topks
        ]
    if untrained_topk:
        modes.append(Mode(f"dsa-{untrained_topk}-untrained", untrained_topk, "untrained"))
    return modes


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
    from indexer_model.train import load_frozen_model
    from indexer_model.weights import build_model

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
    from indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint

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
            with oracle_selection(mode.indexers == "oracle"):
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
    from indexer_model.weights import default_dtype

    model.to(default_dtype("cpu"))  # what `dsarag ask` runs on this CPU: fp32 unless it has fast bf16
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    from dsarag_kernels.cpu_dsa import native_library

    dsa_kernels = "native" if native_library() is not None else "torch"  # what DSAConfig's "auto" runs here
    section: dict = {
        "topk": topk,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "dsa_kernels": dsa_kernels,
        "lengths": {},
    }
    for length in lengths:
        section["lengths"][str(length)] = {}
    prefill_seconds(model, heldout[:256], None)  # warm-up: first-call allocations
    configs = (  # dsa: DSAConfig's "auto" path; dsa-torch: the PyTorch path beside it
        ("dense", None),
        ("dsa", DSAConfig(topk=topk, dense_threshold=0)),
        ("dsa-torch", DSAConfig(topk=topk, dense_threshold=0, kernels="torch")),
    )
    for mode, dsa in configs:
        if mode not in modes:
            continue
        if dsa is not None:
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
    from indexer_model.generate import stop_token_ids
    from indexer_model.resolve import resolve_model
    from indexer_model.tokenizer import ChatTokenizer
    from indexer_model.weights import load_config

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


def merge_results(paths: list[Path], niah_modes: list[str] | None = None) -> dict:
    """One dict of several measure outputs: runs concatenated (each once), the modes of a NIAH case run in
    several files joined (other cases appended), other sections merged key by key (nested dicts too, later files
    winning); a CPU timing measured later replaces an earlier skip. `niah_modes`: keep only these NIAH modes."""
    merged: dict = {"runs": []}
    for path in paths:
        data = json.loads(path.read_text())
        # a run already listed (the report's own JSON fed back with the files it merged) is listed once
        merged["runs"] += [run for run in data.pop("runs", []) if run not in merged["runs"]]
        if "niah" in data and "niah" in merged:
            niah = data.pop("niah")
            _merge_cases(merged["niah"]["cases"], niah["cases"])
            merged["niah"]["modes"] += [mode for mode in niah["modes"] if mode not in merged["niah"]["modes"]]
        _merge_into(merged, data)
    if niah_modes and "niah" in merged:
        merged["niah"]["modes"] = [mode for mode in niah_modes if mode in merged["niah"]["modes"]]
        for case in merged["niah"]["cases"]:
            case["modes"] = {mode: case["modes"][mode] for mode in niah_modes if mode in case["modes"]}
    for entry in merged.get("cpu_timing", {}).get("lengths", {}).values():
        for mode in ("dense", "dsa", "dsa-torch"):
            if f"{mode}_s" in entry:
                entry.pop(f"{mode}_skipped", None)
    return merged


def _merge_cases(cases: list[dict], new_cases: list[dict]) -> None:
    """Add each new case's modes to the same haystack's entry (same length, filler and needles), else append it."""

    def identity(case: dict) -> str:
        return json.dumps([case["length"], case["meta"], case["needles"]], sort_keys=True)

    known = {identity(case): case for case in cases}
    for case in new_cases:
        if identity(case) in known:
            known[identity(case)]["modes"].update(case["modes"])
        else:
            cases.append(case)


def _merge_into(target: dict, source: dict) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def score_niah(niah: dict, decode: Callable[[list[int]], str]) -> list[dict]:
    """One row per (case, question, mode): the decoded answer and whether it names the right value."""
    rows = []
    for case_index, case in enumerate(niah["cases"]):
        for mode, result in case["modes"].items():
            if "answers" not in result:
                continue
            for needle, answer_ids in zip(case["needles"], result["answers"], strict=True):
                answer = decode(answer_ids)
                rows.append(
                    {
                        "case": case_index,
                        "length": case["length"],
                        "depth": needle["depth"],
                        "mode": mode,
                        "value": needle["value"],
                        "answer": answer,
                        "correct": is_correct(answer, needle["value"]),
                    }
                )
    return rows


def niah_summary(rows: list[dict]) -> dict:
    """Accuracy per mode and length, per mode/length/depth, and on the questions dense answered correctly."""
    solved = {(r["case"], r["depth"]) for r in rows if r["mode"] == "dense" and r["correct"]}
    summary: dict = {"by_length": {}, "by_depth": {}, "on_dense_solved": {}}
    for row in rows:
        mode, length, depth = row["mode"], str(row["length"]), str(row["depth"])
        _tally(summary["by_length"].setdefault(mode, {}).setdefault(length, [0, 0]), row["correct"])
        _tally(
            summary["by_depth"].setdefault(mode, {}).setdefault(f"{length}@{depth}", [0, 0]), row["correct"]
        )
        if (row["case"], row["depth"]) in solved:
            _tally(summary["on_dense_solved"].setdefault(mode, {}).setdefault(length, [0, 0]), row["correct"])
    return summary


def _tally(cell: list[int], correct: bool) -> None:
    cell[0] += int(correct)
    cell[1] += 1


def report(options: argparse.Namespace) -> None:
    data = merge_results(options.from_json, options.niah_modes)
    if "niah" in data:
        from indexer_model.resolve import resolve_model
        from indexer_model.tokenizer import ChatTokenizer

        tokenizer = ChatTokenizer(resolve_model(data.get("niah_spec", {}).get("model", "default")))
        rows = score_niah(data["niah"], tokenizer.decode)
        data["niah_scored"] = {"rows": rows, "summary": niah_summary(rows)}
    data["goals"] = check_goals(data)
    data["notes"] = options.note if options.note is not None else data.get("notes", [])
    options.md.parent.mkdir(parents=True, exist_ok=True)
    options.md.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    options.md.write_text(render_markdown(data))
    print(f"wrote {options.md} and {options.md.with_suffix('.json')}")


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def check_goals(data: dict) -> list[dict]:
    """Each quality goal with the measured value and whether it is met."""
    goals = []
    for length, entry in data.get("recall", {}).items():
        if "trained" not in entry:
            continue
        recall = {k: _mean(v) for k, v in entry["trained"].items()}
        oracle = {k: _mean(v) for k, v in entry["oracle"].items()}
        if "2048" in recall:
            goals.append(_goal(f"mean recall @k=2048, {length} tokens", recall["2048"], GOALS["recall_2048"]))
            ratio = recall["2048"] / oracle["2048"]
            goals.append(
                _goal(f"recall/oracle @k=2048, {length} tokens", ratio, GOALS["recall_2048_of_oracle"])
            )
        if "512" in recall:
            goals.append(_goal(f"mean recall @k=512, {length} tokens", recall["512"], GOALS["recall_512"]))
        scales = entry.get("layer_topk_scales") or []
        per_layer = {int(k): values for k, values in entry["trained"].items()}
        for k, target in ((2048, GOALS["recall_2048"]), (512, GOALS["recall_512"])):
            if any(scale != 1.0 for scale in scales) and all(k * s in per_layer for s in (0.5, 1, 2)):
                value = budget_recall(per_layer, k, scales)
                goals.append(_goal(f"mean recall @k={k} spread per layer, {length} tokens", value, target))
    for mode, by_length in data.get("niah_scored", {}).get("summary", {}).get("on_dense_solved", {}).items():
        if mode == "dense" or mode.endswith("untrained") or mode.startswith("oracle"):  # baselines
            continue
        correct, total = (sum(cell[i] for cell in by_length.values()) for i in (0, 1))
        points = 100.0 * (total - correct) / total if total else float("nan")  # exact at whole questions
        goals.append(
            {
                "goal": f"NIAH {mode}: points lost on what dense solves ({correct}/{total} kept)",
                "value": round(points, 1),
                "target": f"<= {GOALS['niah_points']}",
                "met": points <= GOALS["niah_points"],
            }
        )
    ppl16 = data.get("perplexity", {}).get("16384", {}).get("modes", {})
    for mode, entry in ppl16.items():
        if mode != "dense" and "ppl" in entry and "ppl" in ppl16.get("dense", {}):
            increase = entry["ppl"] / ppl16["dense"]["ppl"] - 1
            goals.append(
                {
                    "goal": f"perplexity increase at 16K, {mode}",
                    "value": round(100 * increase, 2),
                    "target": f"<= {100 * GOALS['ppl_16k']:.0f} %",
                    "met": increase <= GOALS["ppl_16k"],
                }
            )
    for length, entry in data.get("cpu_timing", {}).get("lengths", {}).items():
        if int(length) >= 8192 and "dense_s" in entry:
            met = "dsa_s" in entry and entry["dsa_s"] < entry["dense_s"]
            goals.append(
                {
                    "goal": f"CPU DSA prefill faster than dense at {length} tokens (s)",
                    "value": entry.get("dsa_s", entry.get("dsa_skipped")),
                    "target": f"< {entry['dense_s']}",
                    "met": met,
                }
            )
    return goals


def _goal(name: str, value: float, target: float) -> dict:
    return {"goal": name, "value": round(value, 4), "target": f">= {target}", "met": value >= target}


def render_markdown(data: dict) -> str:
    lines = ["# DSA quality: trained lightning indexers vs dense attention", ""]
    lines += _runs_markdown(data["runs"])
    if data.get("goals"):
        lines += ["## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
        lines += [
            f"| {g['goal']} | {g['value']} | {g['target']} | {'yes' if g['met'] else '**no**'} |"
            for g in data["goals"]
        ]
        lines.append("")
    for key, render in (
        ("recall", _recall_markdown),
        ("perplexity", _perplexity_markdown),
        ("niah_scored", _niah_markdown),
        ("cpu_timing", _cpu_markdown),
    ):
        if key in data:
            lines += render(data[key], data)
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in data["notes"]] + [""]
    return "\n".join(lines)


def _repo_relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def _runs_markdown(runs: list[dict]) -> list[str]:
    lines = ["## Runs", "", "| date (UTC) | device | command |", "|---|---|---|"]
    lines += [f"| {run['date']} | {run['device']} | `{run['command']}` |" for run in runs]
    # As each run was given it: a device run names the folder its checkpoint travelled to (see the notes).
    checkpoints = sorted({_repo_relative(run["checkpoint"]) for run in runs if "checkpoint" in run})
    lines += (
        ["", "Indexer checkpoint: " + ", ".join(f"`{c}`" for c in checkpoints) + "."] if checkpoints else []
    )
    lines += ["", f"Report: `{report_command()}`", ""]
    return lines


def report_command() -> str:
    """This command line, with the text of --note options left out."""
    words, skip = ["python"], False
    for word in sys.argv:
        words.append("…" if skip else word)
        skip = word == "--note"
    return " ".join(words)


def _recall_markdown(recall: dict, data: dict) -> list[str]:
    lines = [
        "## 1. Attention-mass recall",
        "",
        "Share of each layer's dense attention mass (summed over heads) that the selected top-k keys hold, over "
        "the last 512 queries of each held-out window; sinks (4) and the local window (64) are always selected. "
        "Oracle: top-k of the true attention. Recent: the 4 sinks plus the k - 4 most recent keys. "
        "Untrained: a randomly initialised indexer of the same shape.",
        "",
        "| tokens | k | trained | oracle | trained / oracle | sinks + recent | untrained |",
        "|---|---|---|---|---|---|---|",
    ]
    for length, entry in recall.items():
        if "trained" not in entry:
            lines.append(f"| {length} | skipped ({entry.get('skipped')}) | | | | | |")
            continue
        for k in entry["trained"]:
            trained, oracle = _mean(entry["trained"][k]), _mean(entry["oracle"][k])
            lines.append(
                f"| {length} | {k} | {trained:.3f} | {oracle:.3f} | {trained / oracle:.3f} | "
                f"{_mean(entry['recent'][k]):.3f} | {_mean(entry['untrained'][k]):.3f} |"
            )
    lines.append("")
    for length, entry in recall.items():
        scales = entry.get("layer_topk_scales") or []
        if "trained" not in entry or all(scale == 1.0 for scale in scales):
            continue
        per_layer = {int(k): values for k, values in entry["trained"].items()}
        spread = [
            f"k = {k}: {budget_recall(per_layer, k, scales):.3f} (one k for all: {_mean(per_layer[k]):.3f})"
            for k in per_layer
            if all(k * s in per_layer for s in (0.5, 1, 2))
        ]
        lines += [
            f"Per-layer k, {length} tokens: the checkpoint gives layer i scales[i] x k keys (scales "
            f"{' '.join(f'{s:g}' for s in scales)}; same keys in all); mean recall {'; '.join(spread)}.",
            "",
        ]
    for length, entry in recall.items():
        if "trained" not in entry:
            continue
        ks = [k for k in ("512", "2048") if k in entry["trained"]] or list(entry["trained"])[-2:]
        lines += [f"Per layer, {length} tokens (windows at {entry['windows']}):", ""]
        header = " | ".join(
            f"{name} @{k}" for k in ks for name in ("trained", "oracle", "recent", "untrained")
        )
        lines += [f"| layer | {header} |", "|---" * (1 + 4 * len(ks)) + "|"]
        for layer in range(len(entry["trained"][ks[0]])):
            cells = " | ".join(
                f"{entry[name][k][layer]:.3f}"
                for k in ks
                for name in ("trained", "oracle", "recent", "untrained")
            )
            lines.append(f"| {layer} | {cells} |")
        lines.append("")
    return lines


def _perplexity_markdown(perplexity: dict, data: dict) -> list[str]:
    first = next(iter(perplexity.values()))
    modes = list(first["modes"])
    lines = [
        "## 2. Perplexity",
        "",
        f"Perplexity of the last {first['scored']} tokens of each held-out window, the whole window (prefix and "
        "scored part) run with the attention named; DSA with `dense_threshold=0`. Change against dense in brackets.",
        "",
        "| tokens | windows | " + " | ".join(modes) + " |",
        "|---" * (2 + len(modes)) + "|",
    ]
    for length, entry in perplexity.items():
        dense = entry["modes"].get("dense", {}).get("ppl")
        cells = []
        for mode in modes:
            result = entry["modes"].get(mode, {})
            if "ppl" not in result:
                cells.append(f"skipped ({result.get('skipped', 'missing')})")
            elif mode == "dense" or dense is None:
                cells.append(f"{result['ppl']:.3f}")
            else:
                cells.append(f"{result['ppl']:.3f} ({100 * (result['ppl'] / dense - 1):+.2f} %)")
        lines.append(f"| {length} | {len(entry['windows'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Seconds per window (prefill + scored part; PyTorch reference DSA path; device under Runs):",
        "",
    ]
    lines += ["| tokens | " + " | ".join(modes) + " |", "|---" * (1 + len(modes)) + "|"]
    for length, entry in perplexity.items():
        cells = [str(entry["modes"].get(mode, {}).get("seconds", "-")) for mode in modes]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _niah_markdown(scored: dict, data: dict) -> list[str]:
    summary = scored["summary"]
    spec = data.get("niah_spec", {})
    modes = data["niah"]["modes"]
    lengths = sorted({length for by_length in summary["by_length"].values() for length in by_length}, key=int)
    lines = [
        "## 3. Multi-key needle in a haystack",
        "",
        f'Each haystack is held-out text with {len(spec.get("depths", DEPTHS))} needles ("The pass key for <name> '
        'is <5 digits>.") at depths '
        + ", ".join(f"{round(100 * d)} %" for d in spec.get("depths", DEPTHS))
        + "; each needle is asked for in turn through the chat template, greedy decoding of up to "
        f"{spec.get('max_new_tokens', '?')} tokens, scored by exact match of the first number in the answer. "
        "Tokens = the longest prompt of the case (the 32K cases stop short of the model's 32,768 positions to "
        "leave room for the answer).",
        "",
        "Accuracy (correct / asked):",
        "",
        "| mode | " + " | ".join(lengths) + " | all |",
        "|---" * (2 + len(lengths)) + "|",
    ]
    for mode in modes:
        cells = summary["by_length"].get(mode, {})
        lines.append(
            f"| {mode} | " + " | ".join(_cell(cells.get(n)) for n in lengths) + f" | {_cell(_total(cells))} |"
        )
    lines += ["", "On the questions dense answered correctly:", ""]
    lines += ["| mode | " + " | ".join(lengths) + " | all |", "|---" * (2 + len(lengths)) + "|"]
    for mode in modes:
        cells = summary["on_dense_solved"].get(mode, {})
        lines.append(
            f"| {mode} | " + " | ".join(_cell(cells.get(n)) for n in lengths) + f" | {_cell(_total(cells))} |"
        )
    depth_keys = sorted(
        {key for by_depth in summary["by_depth"].values() for key in by_depth}, key=_depth_order
    )
    lines += [
        "",
        "By length and depth:",
        "",
        "| tokens @ depth | " + " | ".join(modes) + " |",
        "|---" * (1 + len(modes)) + "|",
    ]
    for key in depth_keys:
        cells = [_cell(summary["by_depth"].get(mode, {}).get(key)) for mode in modes]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _depth_order(key: str) -> tuple[int, float]:
    length, depth = key.split("@")
    return int(length), float(depth)


def _total(cells: dict) -> list[int] | None:
    return [sum(c[0] for c in cells.values()), sum(c[1] for c in cells.values())] if cells else None


def _cell(cell: list[int] | None) -> str:
    return "-" if not cell else f"{cell[0]}/{cell[1]} ({100 * cell[0] / cell[1]:.0f} %)"


def _load(loads: list[float] | None) -> str:
    return " / ".join(map(str, loads)) if loads else "-"


def _cpu_markdown(timing: dict, data: dict) -> list[str]:
    lines = [
        "## 4. CPU prefill time",
        "",
        f"One prefill per length, {timing['dtype']}, {timing['threads']} threads, last logits only; dense without "
        f"indexers, DSA with k = {timing['topk']}: through the compiled CPU kernels (`dsarag_kernels/cpu_dsa.cpp`: each "
        "query scores every earlier key in one fused pass, takes its exact top-k and attends to those keys only) "
        'and, where run, through the PyTorch path (`DSAConfig(kernels="torch")`: blockwise top-k; each block of '
        "queries gathers the union of its selections once). The first k queries, which select every earlier "
        f"key, run dense in both. This run's DSA path: {timing.get('dsa_kernels', 'torch')}. One measurement each. "
        "Where the time goes per layer: `benchmarks/dsa_cpu_layer.py` (docs/benchmarks.md).",
        "",
        "Load: the machine's 1-minute load average before / after each timing (other work shared its cores).",
        "",
        "| tokens | dense (s) | load | DSA (s) | load | DSA / dense | DSA, PyTorch path (s) | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, entry in timing["lengths"].items():
        cells = [_timing_cell(entry, mode) for mode in ("dense", "dsa", "dsa-torch")]
        ratio = f"{entry['dsa_s'] / entry['dense_s']:.2f}" if "dsa_s" in entry and "dense_s" in entry else ""
        lines.append(f"| {length} | {cells[0]} | {cells[1]} | {ratio} | {cells[2]} |")
    lines.append("")
    return lines


def _timing_cell(entry: dict, mode: str) -> str:
    if f"{mode}_s" in entry:
        return f"{entry[f'{mode}_s']} | {_load(entry.get(f'{mode}_load'))}"
    reason = entry.get(f"{mode}_skipped")
    return f"not run: {reason} | " if reason else "not run | "


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

    rep = commands.add_parser("report", help="score NIAH answers, write Markdown + JSON")
    rep.add_argument("--from-json", type=Path, nargs="+", required=True)
    rep.add_argument("--md", type=Path, default=Path("docs/dsa-quality.md"))
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
