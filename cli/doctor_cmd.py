"""`dsarag doctor`: parse the options, run rag/doctor.py, render its checks (stderr table or --json stdout)."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

stderr = Console(stderr=True)
_COLORS = {"ok": "green", "warn": "yellow", "fail": "red"}


def doctor(
    store: Annotated[Path | None, typer.Option("--store", help="Also check this store folder.")] = None,
    docs: Annotated[
        Path | None,
        typer.Option(
            "--docs", help="The store's documents folder: the default store, and the source to rebuild."
        ),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Rehash every model file (sha256; slow).")] = False,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Rebuild the index, drop damaged shards and re-ingest their sources."),
    ] = False,
    min_free_mb: Annotated[
        int, typer.Option("--min-free-mb", min=0, help="Fail below this free disk.")
    ] = 500,
    lock_timeout: Annotated[
        float,
        typer.Option("--lock-timeout", min=0, help="Seconds to wait for a writer of the store (--repair)."),
    ] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Check models, caches, free disk and a store; exit 0 when healthy, else the code of the first failing area
    (5 models, 4 store, 9 disk or caches). --repair fixes the store from its embeddings and its documents."""
    from dsarag.rag.config import resolve_store
    from dsarag.rag.doctor import run_doctor

    store_path = resolve_store(store, docs) if store is not None or docs is not None else None
    report = run_doctor(store_path, docs, full, repair, min_free_mb, lock_timeout, console=stderr)
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        _render(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _render(report) -> None:  # noqa: ANN001 - a DoctorReport
    # The fix goes under its check's detail, not in a column of its own that is empty while all is well; no
    # borders, so the detail keeps more of an 80-column terminal.
    table = Table(title="dsarag doctor", box=None, pad_edge=False)
    for column in ("area", "check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        status = f"[{_COLORS[check.status]}]{check.status}[/]"
        detail = escape(check.detail) + (f"\n[bold]fix:[/] {escape(check.fix)}" if check.fix else "")
        table.add_row(check.area, check.name, status, detail)
    stderr.print(table)
    for line in report.repairs:
        stderr.print(f"[green]repaired[/] {line}", highlight=False, soft_wrap=True)
