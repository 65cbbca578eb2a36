"""`topk-sweep`: NIAH accuracy and prefill cost against the DSA top-k at one context length.

Multi-key cases (a needle at every depth; `--limit` trials, default 3) at the longest `--lengths` value run
dense and at every k of `--topks` below it. Cost: the analytic prefill FLOPs relative to dense (rag/cost.py)
and the measured prefill time relative to dense. `smallest_k_share` is the smallest k whose accuracy is
within 2 points of dense, as a share of the context (1.0 when none is).
"""

import numpy as np

from dsarag.evals.report import accuracy_cost_vs_k
from dsarag.evals.run import SuiteResult, SuiteRun
from dsarag.evals.suites.niah import DEPTHS, CaseSpec, accuracy, lost_vs_dense, run_cases

NAME = "topk-sweep"
DESCRIPTION = "NIAH accuracy and prefill cost against the DSA top-k at one context length"
THRESHOLDS = ["smallest_k_share<=0.25"]
LENGTH = 4096
TOPKS = [64, 128, 256, 512, 1024, 2048]
TRIALS = 3


def run(run: SuiteRun) -> SuiteResult:
    options = run.options
    length = max(options.lengths or [LENGTH])
    topks = sorted(k for k in (options.topks or TOPKS) if k < length)
    trials = options.limit or TRIALS
    specs = [CaseSpec("multi", length, tuple(options.depths or DEPTHS), trial) for trial in range(trials)]
    rows = run_cases(run, specs, topks)
    dense = [row for row in rows if row["mode"] == "dense"]
    dense_accuracy = accuracy(dense)
    dense_tflop = float(np.mean([row["prefill_tflop"] for row in dense]))
    dense_s = float(np.mean([row["prefill_s"] for row in dense]))

    metrics = {"accuracy.dense": dense_accuracy}
    table = [
        {
            "k": "dense",
            "accuracy": dense_accuracy,
            "flops_vs_dense": 1.0,
            "prefill_s": dense_s,
            "lost_vs_dense": 0.0,
        }
    ]
    accuracies, costs = [], []
    for k in topks:
        group = [row for row in rows if row["topk"] == k]
        accuracies.append(accuracy(group))
        costs.append(float(np.mean([row["prefill_tflop"] for row in group])) / dense_tflop)
        prefill_s = float(np.mean([row["prefill_s"] for row in group]))
        metrics |= {
            f"accuracy.k{k}": accuracies[-1],
            f"flops_vs_dense.k{k}": costs[-1],
            f"prefill_speedup.k{k}": dense_s / prefill_s,
            f"lost_vs_dense.k{k}": lost_vs_dense(rows, f"dsa-{k}"),
        }
        table.append({
            "k": k, "accuracy": accuracies[-1], "flops_vs_dense": costs[-1], "prefill_s": prefill_s,
            "lost_vs_dense": metrics[f"lost_vs_dense.k{k}"],
        })  # fmt: skip
    good = [k for k, value in zip(topks, accuracies, strict=True) if value >= dense_accuracy - 0.02]
    metrics["smallest_k_share"] = min(good) / length if good else 1.0
    plot = accuracy_cost_vs_k(
        run.folder / "accuracy_cost_vs_k.png", topks, accuracies, costs, dense_accuracy,
        f"{run.generator().name} · {length} tokens · {trials} multi-key haystacks",
    )  # fmt: skip
    return SuiteResult(metrics, table, [plot], {"model": run.generator().name, "length": length})
