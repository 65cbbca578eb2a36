"""A suite's report files: summary.json, report.md (Markdown tables) and the PNG plots."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsarag.base.atomic import atomic_write, atomic_write_json


def write_reports(folder: Path, summary: dict) -> list[Path]:
    """summary.json and report.md in `folder`; the plots are already there (the suite drew them)."""
    atomic_write_json(folder / "summary.json", summary)
    atomic_write(folder / "report.md", lambda tmp: tmp.write_text(markdown(summary)))
    return [folder / "summary.json", folder / "report.md"]


def markdown(summary: dict) -> str:
    options = ", ".join(
        f"{key}={value}" for key, value in summary["options"].items() if value not in ("None", None)
    )
    lines = [
        f"# dsarag eval: {summary['suite']}",
        "",
        f"{summary['created']} · {summary['seconds']} s · {options}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:g} |" for name, value in summary["metrics"].items()),
    ]
    if summary["thresholds"]:
        verdict = "all thresholds met" if summary["passed"] else "**a threshold was missed**"
        lines += ["", f"Thresholds: {verdict}.", "", "| rule | actual | ok |", "|---|---|---|"]
        for row in summary["thresholds"]:
            actual = "no such metric" if row["actual"] is None else f"{row['actual']:g}"
            lines.append(
                f"| `{row['rule']}` ({row['metric']}) | {actual} | {'yes' if row['passed'] else 'NO'} |"
            )
    if summary["table"]:
        lines += ["", markdown_table(summary["table"])]
    lines += [f"\n![{name}]({name})" for name in summary["plots"]]
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    header = f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}"
    body = "\n".join(f"| {' | '.join(_cell(row.get(column, '')) for column in columns)} |" for row in rows)
    return f"{header}\n{body}"


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported lazily with the file-only backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmaps(path: Path, grids: dict[str, np.ndarray], rows: Sequence[int], columns: Sequence[float], title: str) -> str:  # fmt: skip
    """One accuracy heatmap per mode side by side (rows: context length, columns: needle depth)."""
    plt = _pyplot()
    figure, axes = plt.subplots(
        1, len(grids), figsize=(3.6 * len(grids) + 1, 0.45 * len(rows) + 2.2), squeeze=False
    )
    for axis, (mode, grid) in zip(axes[0], grids.items(), strict=True):
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        axis.set(title=mode, xlabel="needle depth", ylabel="context tokens")
        axis.set_xticks(range(len(columns)), [f"{depth:.0%}" for depth in columns])
        axis.set_yticks(range(len(rows)), [str(length) for length in rows])
        for (row, column), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axis.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    figure.suptitle(title)
    return _save(figure, path)


def accuracy_cost_vs_k(path: Path, ks: Sequence[int], accuracy: Sequence[float], cost: Sequence[float],
                       dense_accuracy: float, title: str) -> str:  # fmt: skip
    """Accuracy (left axis) and prefill cost relative to dense (right axis) against top-k."""
    plt = _pyplot()
    figure, left = plt.subplots(figsize=(6.5, 4))
    left.plot(ks, accuracy, marker="o", color="tab:green", label="accuracy (sparse)")
    left.axhline(dense_accuracy, color="tab:green", linestyle="--", label="accuracy (dense)")
    left.set(xlabel="top-k", ylabel="accuracy", xscale="log", ylim=(-0.02, 1.05), title=title)
    left.set_xticks(list(ks), [str(k) for k in ks])
    left.minorticks_off()
    right = left.twinx()
    right.plot(ks, cost, marker="s", color="tab:blue", label="prefill FLOPs / dense")
    right.set(ylabel="prefill FLOPs relative to dense", ylim=(0, max(1.05, *cost)))
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="lower right")
    return _save(figure, path)


def latency_cdf(path: Path, samples: dict[str, Sequence[float]], title: str) -> str:
    """Empirical CDF of ask latency per attention mode."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for mode, values in samples.items():
        ordered = np.sort(np.asarray(values))
        axis.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=mode)
    axis.set(xlabel="seconds per ask", ylabel="share of asks", ylim=(0, 1.02), title=title)
    axis.legend()
    return _save(figure, path)


def _save(figure: object, path: Path) -> str:
    plt = _pyplot()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(figure)
    return path.name
