"""The `dsarag` command line: parses options, calls rag/ and indexer_model/, renders with rich."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dsarag.base.errors import DsaragError
from dsarag.cli.cost_cmd import PRICE_ENV, bench, cost_app, gpu_price, render_cost
from dsarag.cli.doctor_cmd import doctor
from dsarag.cli.eval_cmd import eval_app
from dsarag.cli.indexer_cmd import indexer_app
from dsarag.cli.models_cmd import models_app
from dsarag.cli.serve_cmd import serve

app = typer.Typer(
    name="dsarag",
    help="Long-context retrieval-augmented question answering on your own machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Inspect and rebuild a store's FAISS index.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(index_app, name="index")
app.add_typer(indexer_app, name="indexer")
app.add_typer(cost_app, name="cost")
app.add_typer(eval_app, name="eval")
app.command("bench")(bench)
app.command("doctor")(doctor)
app.command("serve")(serve)

stderr = Console(stderr=True)
stdout = Console()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        sys.stdout.write(f"dsarag {version('dsarag')}\n")
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Options before the command (the app's help text is set on `app`)."""


StoreOption = Annotated[
    Path | None,
    typer.Option("--store", help="Store folder (default: one per docs folder under ~/.local/share/dsarag)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
LockTimeoutOption = Annotated[
    float,
    typer.Option("--lock-timeout", min=0, help="Seconds to wait for another writer of the store (exit 8)."),
]


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def ingest(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Folders, files or glob patterns. .jsonl/.ndjson/.parquet/.csv files named here are corpus "
            "files: one document per record.",
            show_default=False,
        ),
    ],
    store: StoreOption = None,
    text_column: Annotated[
        str, typer.Option("--text-column", help="Corpus files: the text column.")
    ] = "text",
    id_column: Annotated[
        str | None, typer.Option("--id-column", help="Corpus files: record ids (default: line/row number).")
    ] = None,
    title_column: Annotated[str | None, typer.Option("--title-column", help="Corpus files: titles.")] = None,
    date_column: Annotated[
        str | None, typer.Option("--date-column", help="Corpus files: dates (default: the file's mtime).")
    ] = None,
    index_factory: Annotated[
        str | None,
        typer.Option("--index-factory", help="FAISS factory string, e.g. HNSW32 (default: by size)."),
    ] = None,
    batch_chunks: Annotated[
        int, typer.Option("--batch-chunks", min=1, help="Chunks per commit (one Parquet shard each).")
    ] = 1024,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=0, help="Read/chunk processes (default: cores - 1; 0 = in-process)."),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local | ray (Ray Data; needs the `ray` extra).")
    ] = "local",
    max_file_mb: Annotated[
        float, typer.Option("--max-file-mb", min=0, help="Skip documents larger than this (with a reason).")
    ] = 20,
    lock_timeout: LockTimeoutOption = 60,
    as_json: JsonOption = False,
) -> None:
    """Read, chunk, embed and index documents and corpus files incrementally and resumably.

    Unchanged sources are skipped; a run that was killed continues where its last batch commit ended."""
    from dsarag.base.errors import EXIT_PARTIAL_INGEST, BadInputError
    from dsarag.corpora.corpus_files import CorpusColumns
    from dsarag.rag.config import resolve_store
    from dsarag.rag.embed import load_embedder
    from dsarag.rag.ingest import IngestOptions
    from dsarag.rag.ingest import ingest as run_ingest
    from dsarag.rag.store import ChunkStore

    if engine not in ("local", "ray"):
        raise BadInputError(f"--engine {engine}: unknown engine — use local or ray")
    if store is None and len(inputs) > 1:
        raise BadInputError("several inputs need one store — pass --store PATH")
    options = IngestOptions(
        columns=CorpusColumns(text_column, id_column, title_column, date_column),
        batch_chunks=batch_chunks,
        workers=workers,
        index_factory=index_factory,
        engine=engine,
        lock_timeout_s=lock_timeout,
        max_file_bytes=int(max_file_mb * 1e6),
    )
    store_path = resolve_store(store, Path(inputs[0]))
    report = run_ingest(inputs, ChunkStore(store_path), load_embedder(), options, console=stderr)
    if as_json:
        _print_json(report.to_json())
    else:
        _render_ingest(report)
    if report.failed:
        raise typer.Exit(EXIT_PARTIAL_INGEST)


def _render_ingest(report) -> None:  # noqa: ANN001
    table = Table(title=f"ingest → {report.store}", show_header=False)
    names = ("files_seen", "unchanged", "added", "changed", "deleted", "resumed", "records_read")
    for name in (*names, "chunks_total", "chunks_embedded", "tokens_embedded", "batches_committed"):
        table.add_row(name.replace("_", " "), f"{getattr(report, name):,}")
    seconds = report.seconds or float("nan")
    table.add_row(
        "time",
        f"{report.seconds:.2f} s ({report.chunks_embedded / seconds:.1f} chunks/s, "
        f"{report.tokens_embedded / seconds:.0f} tokens/s; embedding {report.embed_seconds:.2f} s)",
    )
    table.add_row(
        "index", f"{report.index_factory or '-'} ({report.index_action}, {report.index_seconds:.2f} s)"
    )
    table.add_row("failed", str(len(report.failed)))
    stderr.print(table)
    for item in report.skipped:
        stderr.print(f"[yellow]skipped[/] {item.path}: {item.reason}", highlight=False, soft_wrap=True)
    for item in report.failed:
        stderr.print(f"[red]failed[/] {item.path}: {item.reason}", highlight=False, soft_wrap=True)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    docs: Annotated[
        Path | None, typer.Option("--docs", help="Documents folder; ingested first when new or changed.")
    ] = None,
    store: StoreOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="default | tiny | registry name | HF model dir | HF id in the local cache | .gguf | "
            "openai:http://HOST:PORT/v1[#MODEL] (a served model; key in $DSARAG_OPENAI_API_KEY)",
        ),
    ] = None,
    chunks: Annotated[int, typer.Option("--chunks", help="Chunks to retrieve.", min=1)] = 6,
    old_chunks: Annotated[
        int | None,
        typer.Option("--top-k", hidden=True, min=1, help="Old name of --chunks, kept for a release."),
    ] = None,
    context_tokens: Annotated[
        int, typer.Option("--context-tokens", help="Token budget for sources.", min=64)
    ] = 3072,
    reader: Annotated[
        str,
        typer.Option(
            "--reader",
            help="auto: yes/no questions get yes or no, others a free answer; span: factoid questions get a "
            "short answer copied from a source, with its sentence; free: every question a free answer. Each "
            "declines a question naming a number the sources lack.",
        ),
    ] = "auto",
    abstain: Annotated[
        bool,
        typer.Option(
            "--abstain/--no-abstain",
            help="Decline when the model's answerability probe judges that the sources do not answer (local "
            "models with a probe beside their indexer checkpoint).",
        ),
    ] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    attention: Annotated[
        str,
        typer.Option(
            "--attention",
            help="dense | sparse (DSA even on short contexts) | auto (DSA where it is measured faster than "
            "dense on this device; `dsarag doctor` says from how many tokens and up to which k).",
        ),
    ] = "auto",
    topk: Annotated[
        int | None,
        typer.Option(
            "--topk",
            help="DSA top-k tokens per query (default: from the task's complexity, 1-9 % of the prompt within "
            "512-2048; at least the sink and recent-window tokens every query keeps: 4 + 64).",
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="Force semantic | multi-query | temporal | hybrid | none (default: the agent decides).",
        ),
    ] = None,
    critical: Annotated[
        bool,
        typer.Option(
            "--critical", help="Always use exact dense attention (wins over --attention and --topk)."
        ),
    ] = False,
    show_trace: Annotated[
        bool,
        typer.Option("--trace", help="Print the path through the agent graph and every decision (stderr)."),
    ] = False,
    compare_dense: Annotated[
        bool,
        typer.Option(
            "--compare-dense", help="Also answer in the other attention mode; report speedup and agreement."
        ),
    ] = False,
    price_per_hour: Annotated[
        float | None,
        typer.Option("--price-per-hour", help=f"GPU $/hour of the cost meter (env {PRICE_ENV}, default 2)."),
    ] = None,
    no_server: Annotated[
        bool,
        typer.Option(
            "--no-server", help="Answer in this process even when a `dsarag serve` with the model runs."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Answer QUESTION from your documents, with numbered citations (the agent decides whether and how to
    retrieve; see `dsarag graph`). A running `dsarag serve` with the same model answers it, warm."""
    from dsarag.rag.ask_options import AskOptions
    from dsarag.rag.config import resolve_store
    from dsarag.rag.server_client import ask_anywhere

    # Without --store and --docs only --strategy none can answer; rag/ask.py says so otherwise.
    store_folder = None if store is None and docs is None else resolve_store(store, docs)
    options = AskOptions(
        question=question,
        store=store_folder,
        docs=docs,
        model=model,
        chunks=old_chunks or chunks,
        context_tokens=context_tokens,
        max_new_tokens=max_new_tokens,
        reader=reader,
        abstain=abstain,
        temperature=temperature,
        attention=attention,
        attention_topk=topk,
        strategy=strategy,
        critical=critical,
        compare_dense=compare_dense,
        price_per_hour=gpu_price(price_per_hour),
    )
    if as_json:
        result, server = ask_anywhere(options, not no_server, stderr)
        if show_trace:
            _render_trace(result.trace)
        _print_json(result.to_json() | {"server": server})
        return

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def retrying(reason: str) -> None:
        sys.stdout.write("\n")
        stderr.print(
            f"[dim]↻ the answer's terms are not in its sources; retrying: {reason}[/]", highlight=False
        )

    # A terminal sees the answer as it is written; a pipe gets only the final answer.
    result, server = ask_anywhere(
        options, not no_server, stderr, on_text=write, stream=sys.stdout.isatty(), on_retry=retrying
    )
    if show_trace:
        _render_trace(result.trace)
    sys.stdout.write("\n\n")
    for source in result.sources:
        stdout.print(f"[{source['number']}] {source['citation']}  ({source['date']})", highlight=False)
    timing = ", ".join(f"{name.removesuffix('_s')} {value:.2f}s" for name, value in result.timings.items())
    mode = (
        result.attention if result.attention_topk is None else f"{result.attention} k={result.attention_topk}"
    )
    if result.attention_dense_tail:
        mode += f", last {result.attention_dense_tail} prompt tokens dense"
    if result.attention_decode != result.attention:
        mode += f", decode {result.attention_decode}"
    served = f" · server {server}" if server else ""
    stderr.print(f"[dim]{result.model} · {mode} · {timing}{served}[/]", highlight=False)
    render_cost(result.cost)


def _render_trace(trace: list[dict]) -> None:
    nodes = [entry["node"] for entry in trace]
    path = [
        node for i, node in enumerate(nodes) if i == 0 or node != nodes[i - 1]
    ]  # a node's entries in a row
    stderr.print(f"[bold]agent path:[/] {' → '.join(path)}", highlight=False)
    for entry in trace:
        details = {key: value for key, value in entry.items() if key != "node"}
        stderr.print(
            f"[cyan]{entry['node']:>8}[/] {json.dumps(details, default=str)}", highlight=False, soft_wrap=True
        )


@app.command()
def graph() -> None:
    """Print the agent graph (decide → plan → retrieve → … → check) as a mermaid diagram."""
    from dsarag.rag.agent import graph_mermaid

    sys.stdout.write(graph_mermaid() + "\n")


@index_app.command("info")
def index_info(
    store: StoreOption = None,
    docs: Annotated[Path | None, typer.Option("--docs")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show what a store holds: chunks, vectors, tombstones, index type and parameters, shards, file sizes."""
    from dsarag.rag.config import resolve_store
    from dsarag.rag.store import ChunkStore
    from dsarag.rag.store_index import index_info as store_index_info

    chunk_store = ChunkStore(resolve_store(store, docs))
    info = store_index_info(chunk_store, chunk_store.read_manifest())
    if as_json:
        _print_json(info)
        return
    table = Table(show_header=False, title="dsarag index info")
    for name, value in info.items():
        table.add_row(
            name, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        )
    stdout.print(table)


FactoryOption = Annotated[
    str | None,
    typer.Option(
        "--factory", help="FAISS factory string, e.g. HNSW32 or OPQ48_192,IVF4096,PQ48 (default: by size)."
    ),
]


@index_app.command("build")
def index_build(
    store: StoreOption = None,
    docs: Annotated[Path | None, typer.Option("--docs")] = None,
    factory: FactoryOption = None,
    lock_timeout: LockTimeoutOption = 60,
) -> None:
    """Bring the index up to date: add shards committed since it was written, apply deletions."""
    _update_index(store, docs, factory, rebuild=False, lock_timeout=lock_timeout)


@index_app.command("rebuild")
def index_rebuild(
    store: StoreOption = None,
    docs: Annotated[Path | None, typer.Option("--docs")] = None,
    factory: FactoryOption = None,
    lock_timeout: LockTimeoutOption = 60,
) -> None:
    """Rebuild the FAISS index from the embeddings kept in the chunk shards (no re-embedding)."""
    _update_index(store, docs, factory, rebuild=True, lock_timeout=lock_timeout)


def _update_index(
    store: Path | None, docs: Path | None, factory: str | None, rebuild: bool, lock_timeout: float
) -> None:
    from dsarag.rag.config import resolve_store
    from dsarag.rag.store import ChunkStore
    from dsarag.rag.store_index import update_store_index

    chunk_store = ChunkStore(resolve_store(store, docs))
    chunk_store.read_manifest(check_index=False)  # a missing or damaged store fails before any lock
    with stderr.status("indexing"):
        update = update_store_index(chunk_store, factory, rebuild=rebuild, lock_timeout_s=lock_timeout)
    stderr.print(
        f"{update.action} {update.factory} over {update.ntotal} vectors ({update.tombstones} tombstones) "
        f"in {update.seconds:.2f} s — {chunk_store.folder}"
    )


def main() -> None:
    try:
        app()
    except DsaragError as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
