"""`latency`: p50 / p95 / p99 seconds of a whole `ask` (agent, retrieval, generation), dense vs sparse.

Questions: `--data` (a QA JSONL or SQuAD file, with `--corpus` when it holds no contexts) or the demo
questions; the first 20 unless `--limit`. Each question is asked `--repeats` times per attention mode, the
model loaded once (loading is not part of a question's latency). Sparse runs DSA at the agent's top-k budget
(or the first `--topks` value). `agreement` is the share of questions whose sparse answer equals the dense one.
"""

from dsarag.evals.datasets import DEMO_QA, load_qa
from dsarag.evals.metrics import percentiles
from dsarag.evals.qa_corpus import agent_answer, qa_retriever
from dsarag.evals.report import latency_cdf
from dsarag.evals.run import SuiteResult, SuiteRun

NAME = "latency"
DESCRIPTION = "p50/p95/p99 latency of ask, dense vs sparse"
THRESHOLDS = ["p95_s.*<=60"]
QUESTIONS = 20
MODES = ("dense", "sparse")
MAX_NEW_TOKENS = 48


def run(run: SuiteRun) -> SuiteResult:
    options = run.options
    items = load_qa(options.data or DEMO_QA)[: options.limit or QUESTIONS]
    retriever = qa_retriever(run, items)
    topk = options.topks[0] if options.topks else None
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    answers: dict[str, dict[str, str]] = {mode: {} for mode in MODES}
    total = len(items) * len(MODES) * options.repeats
    done = 0
    for item in items:
        for mode in MODES:
            for repeat in range(options.repeats):
                done += 1
                run.progress(done, total, f"{mode} · {item.question[:60]}")

                def ask(item=item, mode=mode) -> dict:  # noqa: ANN001 - bound per question and mode
                    reply = agent_answer(run, retriever, item.question, max_new_tokens=MAX_NEW_TOKENS,
                                         attention=mode, attention_topk=topk)  # fmt: skip
                    keep = ("answer", "attention", "topk", "prompt_tokens", "timings", "seconds", "strategy")
                    return {key: reply[key] for key in keep}

                row = run.log.run(f"{item.id}/{mode}/{repeat}", ask)
                samples[mode].append(row["seconds"])
                answers[mode].setdefault(item.id, row["answer"])
    metrics: dict[str, float] = {}
    table = []
    for mode in MODES:
        points = percentiles(samples[mode])
        metrics |= {f"{name}_s.{mode}": value for name, value in points.items()}
        table.append(
            {"mode": mode, "asks": len(samples[mode]), **{f"{name}_s": v for name, v in points.items()}}
        )
    metrics["p50_speedup_sparse_vs_dense"] = metrics["p50_s.dense"] / metrics["p50_s.sparse"]
    same = [answers["sparse"][key] == answers["dense"][key] for key in answers["dense"]]
    metrics["agreement"] = sum(same) / len(same)
    plot = latency_cdf(run.folder / "latency_cdf.png", samples, f"ask latency · {run.generator().name}")
    return SuiteResult(metrics, table, [plot], {"model": run.generator().name})
