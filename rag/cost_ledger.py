"""The cost ledger: one Parquet row per answered question, and the report that sums it.

Each `ask` writes its row as a new part file (temp file + rename), so appends are atomic, concurrent asks never
lose a row, and the ledger is one Parquet dataset (`<data home>/cost-ledger/part-*.parquet`). Once the parts
pile up they are compacted into one merged file (written first; the parts it replaces go after).
"""

import time
import uuid
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dsarag.base.atomic import atomic_write
from dsarag.base.paths import data_home

COMPACT_AFTER_PARTS = 256

LEDGER_SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("s", tz="UTC")),
        ("question", pa.string()),
        ("model", pa.string()),
        ("mode", pa.string()),
        ("topk", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("new_tokens", pa.int64()),
        ("prefill_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("dense_flops", pa.float64()),
        ("sparse_flops", pa.float64()),
        ("dense_dollars", pa.float64()),
        ("sparse_dollars", pa.float64()),
        ("measured_dollars", pa.float64()),
        ("price_per_hour", pa.float64()),
    ]
)


def ledger_dir() -> Path:
    return data_home() / "cost-ledger"


def ledger_row(question: str, model: str, meter: dict) -> dict:
    """The ledger's row for one `meter_answer` result; a served model of unknown architecture has no
    analytic figures (null). `model` names a served model's endpoint too (rag/remote_generator.py)."""
    measured = meter["measured"]
    dense, sparse = meter.get("dense"), meter.get("sparse")
    return {
        "time": int(time.time()),
        "question": question,
        "model": model,
        "mode": meter["mode_ran"],
        "topk": meter.get("topk"),
        "prompt_tokens": meter["prompt_tokens"],
        "new_tokens": meter["new_tokens"],
        "prefill_s": measured.get("prefill_s", 0.0),
        "decode_s": measured.get("decode_s", 0.0),
        "dense_flops": dense["prefill_flops"] + dense["decode_flops"] if dense else None,
        "sparse_flops": sparse["prefill_flops"] + sparse["decode_flops"] if sparse else None,
        "dense_dollars": dense["dollars"] if dense else None,
        "sparse_dollars": sparse["dollars"] if sparse else None,
        "measured_dollars": measured.get("dollars_at_price"),
        "price_per_hour": meter["gpu"]["price_per_hour"] if "gpu" in meter else None,
    }


def append_row(row: dict, folder: Path | None = None) -> Path:
    """Write one row as a new part file; compact when the parts pile up. Returns the part written."""
    folder = folder or ledger_dir()
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    table = pa.Table.from_pylist([row], schema=LEDGER_SCHEMA)
    atomic_write(part, lambda tmp: pq.write_table(table, tmp))
    parts = live_parts(folder)
    if len(parts) > COMPACT_AFTER_PARTS:
        compact(folder, parts)
    return part


def _stamp(part: Path) -> int:
    return int(part.name.split("-")[1])


def live_parts(folder: Path) -> list[Path]:
    """The newest merged file and the parts written after it: a crash between a merge and the removal of
    its inputs therefore never counts a row twice."""
    parts = sorted(folder.glob("part-*.parquet"), key=_stamp) if folder.is_dir() else []
    merged = [p for p in parts if p.name.endswith("-merged.parquet")]
    if not merged:
        return parts
    newest = merged[-1]
    return [newest] + [p for p in parts if _stamp(p) > _stamp(newest)]


def compact(folder: Path, parts: list[Path]) -> None:
    """Merge `parts` into one file stamped with the newest part's time, then remove them."""
    rows = ds.dataset([str(p) for p in parts], schema=LEDGER_SCHEMA).to_table()
    merged = folder / f"part-{max(_stamp(p) for p in parts)}-merged.parquet"
    atomic_write(merged, lambda tmp: pq.write_table(rows, tmp))
    for part in parts:
        if part != merged:
            part.unlink()


def read_ledger(folder: Path | None = None) -> pa.Table:
    parts = live_parts(folder or ledger_dir())
    if not parts:
        return LEDGER_SCHEMA.empty_table()
    return ds.dataset([str(p) for p in parts], schema=LEDGER_SCHEMA).to_table()


def cost_report(table: pa.Table) -> dict:
    """Totals, and groups per day and per mode: answers, tokens, measured time and $, analytic saving."""

    def summarize(rows: list[dict]) -> dict:
        dense = sum(r["dense_flops"] for r in rows)
        sparse = sum(r["sparse_flops"] for r in rows)
        return {
            "answers": len(rows),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "new_tokens": sum(r["new_tokens"] for r in rows),
            "measured_s": round(sum(r["prefill_s"] + r["decode_s"] for r in rows), 3),
            "measured_dollars": sum(r["measured_dollars"] for r in rows),
            "dense_dollars": sum(r["dense_dollars"] for r in rows),
            "sparse_dollars": sum(r["sparse_dollars"] for r in rows),
            "flops_saving": 1.0 - sparse / dense if dense else 0.0,
        }

    rows = table.to_pylist()
    by_day, by_mode = defaultdict(list), defaultdict(list)
    for row in rows:
        by_day[row["time"].strftime("%Y-%m-%d")].append(row)
        by_mode[row["mode"]].append(row)
    return {
        "total": summarize(rows),
        "by_day": {day: summarize(group) for day, group in sorted(by_day.items())},
        "by_mode": {mode: summarize(group) for mode, group in sorted(by_mode.items())},
    }
