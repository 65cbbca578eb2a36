"""`niah`: single- and multi-key pass keys over a grid of context lengths × needle depths, dense vs sparse.

Haystack: the text files of `--data DIR`, or the bundled prose generator (corpora/synthetic.py). A single-key
case hides one needle at one depth; a multi-key case hides one needle at every depth and asks for each. Every
case runs under dense attention and, at each `--topks` value below its length, under DSA: `dsa-K`, every prompt
position and decode step selecting (`--attention sparse` runs only these), and `auto-K`, as `ask --attention
auto` runs DSA (the question's last positions and the decode steps attend densely; `--attention auto`, the
default, runs both). `--attention dense` runs dense alone. `lost_vs_dense.<mode>` is the share of the questions
dense answered that the mode got wrong (the DSA quality goal: ≤ 2 points).
"""

from dataclasses import dataclass

import numpy as np

from dsarag.base.errors import BadInputError
from dsarag.evals.datasets import folder_text, synthetic_text
from dsarag.evals.niah import NiahCase, answer_case, build_case, is_correct
from dsarag.evals.report import heatmaps
from dsarag.evals.run import SuiteResult, SuiteRun, timed
from dsarag.indexer_model.attention_policy import auto_dsa
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.generate import Generator
from dsarag.rag.cost import ModelShape, prefill_cost

NAME = "niah"
DESCRIPTION = "needle in a haystack: lengths × depths, single- and multi-key, dense vs sparse"
THRESHOLDS = ["accuracy.dense>=0.8", "lost_vs_dense.*<=0.05"]
LENGTHS = [1024, 2048, 4096]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
TOPKS = [256, 2048]
MAX_NEW_TOKENS = 8  # five digits and a full stop, with room for a space or a separator


@dataclass(frozen=True)
class CaseSpec:
    variant: str  # "single" (one needle) or "multi" (one needle per depth)
    length: int
    depths: tuple[float, ...]
    trial: int = 0

    @property
    def key(self) -> str:
        depths = ",".join(f"{depth:g}" for depth in self.depths)
        return f"{self.variant}/L{self.length}/d{depths}/t{self.trial}"


class Haystacks:
    """Filler token ids (the user's text or generated prose) and the cases built on them."""

    def __init__(self, run: SuiteRun, longest: int) -> None:
        self.generator = run.generator()
        tokenizer = self.generator.tokenizer
        text = (
            folder_text(run.options.data)
            if run.options.data
            else synthetic_text(longest * 6, run.options.seed)
        )
        ids = tokenizer.encode(text)
        if len(ids) < longest:
            run.console.log(f"haystack text has {len(ids)} tokens: repeated to reach {longest}")
            ids = ids * -(-longest // len(ids))
        self.filler = np.asarray(ids)
        self.line_ends = {int(i) for i in np.unique(self.filler) if "\n" in tokenizer.decode([int(i)])}
        self.seed = run.options.seed

    def case(self, spec: CaseSpec) -> NiahCase:
        rng = np.random.default_rng(
            [self.seed, spec.length, spec.trial, len(spec.depths), int(spec.depths[0] * 100)]
        )
        start = int(rng.integers(0, len(self.filler) - spec.length + 1))
        window = self.filler[start : start + spec.length]
        return build_case(self.generator.tokenizer, window, spec.length, spec.depths, rng, self.line_ends)


def modes_for(length: int, topks: list[int], attention: str = "auto") -> list[tuple[str, DSAConfig | None]]:
    """dense, then at every k below the length DSA (dsa-K) and, under `auto`, DSA as `ask` runs it (auto-K)."""
    ks = [k for k in sorted(topks) if k < length] if attention != "dense" else []
    modes: list[tuple[str, DSAConfig | None]] = [("dense", None)]
    modes += [(f"dsa-{k}", DSAConfig(topk=k, dense_threshold=0)) for k in ks]
    if attention == "auto":
        modes += [(f"auto-{k}", auto_dsa(k, dense_threshold=0)) for k in ks]
    return modes


def answer(generator: Generator, case: NiahCase, dsa: DSAConfig | None) -> dict:
    """One case under one mode: per question, the reply and whether it holds the needle's value."""
    result = answer_case(generator.model, case, dsa, MAX_NEW_TOKENS, generator.stop_ids)
    replies = [generator.tokenizer.decode(ids) for ids in result["answers"]]
    shape = ModelShape.of(generator.model)
    return {
        "prompt_tokens": case.length,
        "depths": [needle.depth for needle in case.needles],
        "correct": [
            is_correct(reply, needle.value) for reply, needle in zip(replies, case.needles, strict=True)
        ],
        "replies": replies,
        "prefill_s": result["prefill_s"],
        "prefill_tflop": prefill_cost(shape, len(case.prefix_ids), dsa and dsa.topk).flops / 1e12,
    }


def run_cases(run: SuiteRun, specs: list[CaseSpec], topks: list[int]) -> list[dict]:
    """Every case under every mode, resumable: rows with variant, length, mode and the answer fields."""
    generator = run.generator()
    if topks and not generator.model.has_indexers:
        raise BadInputError(
            f"model {generator.name} has no trained lightning indexer, so the sparse modes cannot run — "
            "pass --topks '' for dense only, or train one with `dsarag indexer train`"
        )
    haystacks = Haystacks(run, max(spec.length for spec in specs))
    rows = []
    for number, spec in enumerate(specs, start=1):
        run.progress(number, len(specs), spec.key)
        case: NiahCase | None = None
        for mode, dsa in modes_for(spec.length, topks, run.options.attention):
            key = f"{spec.key}/{mode}"
            if run.log.get(key) is None:
                case = case or haystacks.case(spec)
                fields = {
                    "variant": spec.variant,
                    "length": spec.length,
                    "mode": mode,
                    "topk": dsa and dsa.topk,
                }
                run.log.record(key, timed(lambda: fields | answer(generator, case, dsa)))  # noqa: B023
            rows.append(run.log.get(key))
    return rows


def accuracy(rows: list[dict]) -> float:
    answers = [correct for row in rows for correct in row["correct"]]
    return sum(answers) / len(answers) if answers else 0.0


def lost_vs_dense(rows: list[dict], mode: str) -> float:
    """Of the questions dense answered right, the share `mode` got wrong (cases matched by key)."""
    dense = {row["key"].rsplit("/", 1)[0]: row["correct"] for row in rows if row["mode"] == "dense"}
    solved = lost = 0
    for row in rows:
        if row["mode"] == mode:
            for dense_ok, ok in zip(
                dense.get(row["key"].rsplit("/", 1)[0], []), row["correct"], strict=False
            ):
                solved += dense_ok
                lost += dense_ok and not ok
    return lost / solved if solved else 0.0


def run(run: SuiteRun) -> SuiteResult:
    options = run.options
    lengths = options.lengths or LENGTHS
    depths = options.depths or DEPTHS
    topks = TOPKS if options.topks is None else options.topks
    specs = [CaseSpec("single", length, (depth,)) for length in lengths for depth in depths]
    specs += [CaseSpec("multi", length, tuple(depths)) for length in lengths]
    rows = run_cases(run, run.limited(specs), topks)
    modes = list(dict.fromkeys(row["mode"] for row in rows))

    metrics = {f"accuracy.{mode}": accuracy([r for r in rows if r["mode"] == mode]) for mode in modes}
    for variant in ("single", "multi"):
        for mode in modes:
            group = [r for r in rows if r["mode"] == mode and r["variant"] == variant]
            if group:
                metrics[f"accuracy.{variant}.{mode}"] = accuracy(group)
    for mode in modes[1:]:
        metrics[f"lost_vs_dense.{mode}"] = lost_vs_dense(rows, mode)

    table = []
    for length in lengths:
        for mode in modes:
            group = [r for r in rows if r["length"] == length and r["mode"] == mode]
            if group:
                table.append({
                    "length": length,
                    "mode": mode,
                    **{variant: variant_accuracy(group, variant) for variant in ("single", "multi")},
                    "prefill_s": float(np.mean([r["prefill_s"] for r in group])),
                })  # fmt: skip
    grids = {mode: depth_grid(rows, mode, lengths, depths) for mode in modes}
    plot = heatmaps(
        run.folder / "niah_heatmap.png", grids, lengths, depths, f"NIAH accuracy · {run.generator().name}"
    )
    return SuiteResult(metrics, table, [plot], {"model": run.generator().name})


def variant_accuracy(group: list[dict], variant: str) -> float | str:
    """Accuracy over the group's cases of one variant; "not run" where it has none (a --limit cut them)."""
    cases = [row for row in group if row["variant"] == variant]
    return accuracy(cases) if cases else "not run"


def depth_grid(rows: list[dict], mode: str, lengths: list[int], depths: list[float]) -> np.ndarray:
    """Accuracy per (length, depth) over single- and multi-key questions; NaN where nothing ran."""
    hits = np.zeros((len(lengths), len(depths)))
    counts = np.zeros_like(hits)
    for row in rows:
        if row["mode"] != mode or row["length"] not in lengths:
            continue
        for depth, ok in zip(row["depths"], row["correct"], strict=True):
            column = int(np.argmin([abs(depth - d) for d in depths]))
            hits[lengths.index(row["length"]), column] += ok
            counts[lengths.index(row["length"]), column] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
