"""`dsarag eval list | run SUITE`: the eval suites (evals/), their reports and thresholds."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dsarag.base.errors import BadInputError

eval_app = typer.Typer(help="Eval suites: NIAH, doc QA, retrieval, routing, temporal, top-k sweep, latency.", no_args_is_help=True)  # fmt: skip
stderr = Console(stderr=True)


def _numbers(text: str | None, option: str, kind: type) -> list | None:
    """ "1024,4096" → [1024, 4096]; None when the option is not given; "" → [] (e.g. no sparse modes)."""
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInputError(f"{option} {text!r}: give comma-separated numbers, e.g. 1024,4096") from None


@eval_app.command("list")
def list_suites(json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False) -> None:  # fmt: skip
    """The suites, with what each measures and its default thresholds."""
    from dsarag.evals.suites import SUITES

    rows = {
        name: {"description": suite.DESCRIPTION, "thresholds": suite.THRESHOLDS}
        for name, suite in SUITES.items()
    }
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="eval suites (dsarag eval run SUITE)")
    for column in ("suite", "measures", "default thresholds"):
        table.add_column(column)
    for name, row in rows.items():
        table.add_row(name, row["description"], ", ".join(row["thresholds"]))
    stderr.print(table)


@eval_app.command("prepare")
def prepare(
    dataset: Annotated[
        str,
        typer.Argument(
            help="squad (SQuAD 2.0 JSON) | hotpot (HotpotQA distractor JSON) | musique (MuSiQue-Ans JSON) | qa "
            "(a JSONL QA file with docs/ beside it, e.g. corpora/demo/qa.jsonl)"
        ),
    ],
    source: Annotated[
        Path, typer.Argument(help="The dataset file (use a train split, e.g. train-v2.0.json).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for docs/, qa.jsonl and source.json.")],
    split: Annotated[
        str, typer.Option("--split", help="fit | report: two disjoint halves of the questions.")
    ] = "fit",
    articles: Annotated[
        int | None, typer.Option("--articles", help="squad: the first N articles (default all).", min=1)
    ] = None,
    per_article: Annotated[
        int, typer.Option("--per-article", help="squad: answerable questions per article.", min=1)
    ] = 4,
    unanswerable: Annotated[
        int, typer.Option("--unanswerable", help="squad: unanswerable questions in all.", min=0)
    ] = 20,
    questions: Annotated[
        int, typer.Option("--questions", help="hotpot, musique: questions drawn.", min=1)
    ] = 24,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draw.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the counts as JSON on stdout.")] = False,
) -> None:
    """Build a development set from public QA data: a folder of documents and qa.jsonl for `eval run docqa`."""
    from dsarag.evals.devsets import prepare_hotpot, prepare_musique, prepare_qa, prepare_squad

    if dataset == "squad":
        devset = prepare_squad(source, out, articles, per_article, unanswerable, seed=seed, split=split)
    elif dataset == "hotpot":
        devset = prepare_hotpot(source, out, questions, seed=seed, split=split)
    elif dataset == "musique":
        devset = prepare_musique(source, out, questions, seed=seed, split=split)
    elif dataset == "qa":
        devset = prepare_qa(source, out, seed=seed, split=split)
    else:
        raise BadInputError(f"dataset {dataset!r}: use squad, hotpot, musique or qa")
    if json_out:
        sys.stdout.write(json.dumps(devset.to_json(), indent=2) + "\n")
    stderr.print(
        f"{devset.counts} → {devset.folder}; run: dsarag eval run docqa --data {devset.questions} "
        f"--corpus {devset.docs}",
        highlight=False,
    )


@eval_app.command("run")
def run(
    suite: Annotated[
        str, typer.Argument(help="niah | docqa | retrieval | routing | temporal | topk-sweep | latency | all")
    ],  # fmt: skip
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="External data: QA JSONL, SQuAD .json, BEIR folder, or a text folder (niah haystack).",
        ),
    ] = None,  # fmt: skip
    corpus: Annotated[
        Path | None,
        typer.Option("--corpus", help="Documents the questions are about, when --data holds no contexts."),
    ] = None,  # fmt: skip
    out: Annotated[
        Path,
        typer.Option("--out", help="Reports go to OUT/SUITE/ (JSON, Markdown, PNG); a rerun resumes there."),
    ] = Path("dsarag-evals"),  # fmt: skip
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Generator, as `dsarag ask --model` (default, tiny, a path, openai:URL#MODEL)."
        ),
    ] = None,  # fmt: skip
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most N items (questions, cases, settings).")
    ] = None,  # fmt: skip
    seed: Annotated[int, typer.Option("--seed", help="Seed of generated haystacks and needles.")] = 0,
    lengths: Annotated[
        str | None, typer.Option("--lengths", help="niah/topk-sweep context lengths, e.g. 1024,4096.")
    ] = None,  # fmt: skip
    depths: Annotated[
        str | None, typer.Option("--depths", help="niah needle depths, e.g. 0.1,0.5,0.9.")
    ] = None,  # fmt: skip
    topks: Annotated[
        str | None, typer.Option("--topks", help="DSA top-k values of the sparse modes ('' = dense only).")
    ] = None,  # fmt: skip
    indexes: Annotated[
        list[str] | None,
        typer.Option(
            "--index",
            help="retrieval: an index setting, repeatable: Flat, HNSW32:efSearch=128, IVF64,Flat:nprobe=8, bm25, hybrid.",
        ),
    ] = None,  # fmt: skip
    attention: Annotated[
        str,
        typer.Option(
            "--attention",
            help="docqa: dense | sparse | auto; niah: which DSA modes run beside dense (auto: both kinds).",
        ),
    ] = "auto",
    reader: Annotated[
        str, typer.Option("--reader", help="docqa: auto | span | free, as `dsarag ask --reader`.")
    ] = "auto",
    abstain: Annotated[
        bool, typer.Option("--abstain/--no-abstain", help="docqa: as `dsarag ask --abstain`.")
    ] = True,
    context_tokens: Annotated[
        int,
        typer.Option("--context-tokens", help="docqa/temporal/latency: token budget of the packed sources."),
    ] = 3072,  # fmt: skip
    repeats: Annotated[int, typer.Option("--repeats", help="latency: asks per question and mode.")] = 1,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda for the generator.")] = "cpu",
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold",
            help="METRIC>=VALUE or METRIC<=VALUE (glob names), replacing the suite's rule on that metric; 'none' drops them.",
        ),
    ] = None,  # fmt: skip
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over instead of resuming OUT/SUITE/.")
    ] = False,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            help="docqa/routing/temporal: questions asked at once; default 4 for a served model (openai:…), 1 here.",
        ),
    ] = None,  # fmt: skip
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary JSON on stdout.")] = False,
) -> None:
    """Run a suite; exit 7 when a metric misses its threshold (the reports are written either way)."""
    from dsarag.evals.run import EXIT_THRESHOLD, EvalOptions
    from dsarag.evals.runner import run_suites

    options = EvalOptions(
        suite=suite,
        out=out,
        data=data,
        corpus=corpus,
        model=model,
        limit=limit,
        seed=seed,
        lengths=_numbers(lengths, "--lengths", int),
        depths=_numbers(depths, "--depths", float),
        topks=_numbers(topks, "--topks", int),
        indexes=indexes or None,
        attention=attention,
        reader=reader,
        abstain=abstain,
        context_tokens=context_tokens,
        repeats=repeats,
        device=device,
        thresholds=threshold or [],
        fresh=fresh,
        concurrency=concurrency,
    )
    summaries = run_suites(options, stderr)
    for summary in summaries:
        render(summary)
    if json_out:
        sys.stdout.write(
            json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2, default=str) + "\n"
        )
    if not all(summary["passed"] for summary in summaries):
        raise SystemExit(EXIT_THRESHOLD)


def render(summary: dict) -> None:
    table = Table(title=f"eval {summary['suite']} · {summary['seconds']} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("threshold")
    rules: dict[str, list[dict]] = {}
    for row in summary["thresholds"]:
        rules.setdefault(row["metric"], []).append(row)
    for name, value in summary["metrics"].items():
        verdicts = [
            f"{'[green]ok[/]' if r['passed'] else '[bold red]MISSED[/]'} {r['rule']}"
            for r in rules.get(name, [])
        ]
        table.add_row(name, f"{value:.4g}", "; ".join(verdicts))
    for row in summary["thresholds"]:
        if row["actual"] is None:
            table.add_row(row["metric"], "—", f"[bold red]MISSED[/] {row['rule']} (no such metric)")
    stderr.print(table)
    stderr.print("reports: " + ", ".join(summary["files"]))
