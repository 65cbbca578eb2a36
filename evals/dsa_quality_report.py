"""The DSA quality report of benchmarks/dsa_quality.py: the attention modes a run compares (`Mode`, named as the
report tables show them), the merge of several runs' JSON into one, NIAH answers scored per mode, length and
depth, the quality goals checked, and the Markdown of it all.

The benchmark measures (model, device, tokenizer); everything here reads only the JSON it wrote, so the tests
check it without a model.
"""

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dsarag.evals.niah import is_correct
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.layer_budget import budget_recall

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (0.1, 0.5, 0.9)
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


# --- merging runs and scoring NIAH ------------------------------------------------------------------------


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


# --- goals and Markdown -----------------------------------------------------------------------------------


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


def _by_length_table(counts: dict, modes: list[str], lengths: list[str]) -> list[str]:
    """Markdown rows: one per mode, its correct / asked at each length and in all."""
    rows = ["| mode | " + " | ".join(lengths) + " | all |", "|---" * (2 + len(lengths)) + "|"]
    for mode in modes:
        cells = counts.get(mode, {})
        rows.append(
            f"| {mode} | " + " | ".join(_cell(cells.get(n)) for n in lengths) + f" | {_cell(_total(cells))} |"
        )
    return rows


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
        *_by_length_table(summary["by_length"], modes, lengths),
        "",
        "On the questions dense answered correctly:",
        "",
        *_by_length_table(summary["on_dense_solved"], modes, lengths),
    ]
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
