"""Corpus files: many records (one document each) in one JSONL, Parquet or CSV file, read as a stream.

Records come out in blocks, so a file of any size is read with bounded memory: JSONL a line at a time,
Parquet a record batch at a time (whole row groups skipped on resume), CSV through Arrow's streaming reader.
A record is numbered by its position in the file (0-based line or row); ingest resumes from such a number.
"""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from dsarag.base.errors import BadInputError, MissingInputError
from dsarag.corpora.dates import parse_date_phrase

CORPUS_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
BLOCK_RECORDS = 256
CSV_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class CorpusColumns:
    """Which column holds what; only `text` is required."""

    text: str = "text"
    id: str | None = None
    title: str | None = None
    date: str | None = None

    def named(self) -> list[tuple[str, str]]:
        options = [("--text-column", self.text), ("--id-column", self.id)]
        options += [("--title-column", self.title), ("--date-column", self.date)]
        return [(option, name) for option, name in options if name]

    def as_record(self) -> dict[str, str]:
        """The columns set, as the store's manifest keeps them: {"text": …, "id": …}."""
        return {role: name for role, name in vars(self).items() if name}


@dataclass(frozen=True)
class CorpusRecord:
    number: int  # position in the file, 0-based
    record_id: str  # the id column's value, else the 1-based line or row number
    text: str
    title: str | None
    date: date | None


@dataclass(frozen=True)
class BadRecord:
    number: int
    reason: str


def corpus_kind(path: Path) -> str | None:
    return CORPUS_KINDS.get(Path(path).suffix.lower())


def available_columns(path: Path) -> list[str]:
    kind = corpus_kind(path)
    try:
        if kind == "parquet":
            return list(pq.ParquetFile(path).schema_arrow.names)
        if kind == "csv":
            with open(path, newline="", encoding="utf-8-sig") as handle:
                return next(csv.reader(handle), [])
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    return list(record) if isinstance(record, dict) else []
        return []
    except FileNotFoundError:
        raise MissingInputError(f"{path}: corpus file not found — check the path", path) from None
    except (OSError, ValueError, pa.ArrowException) as error:
        raise BadInputError(
            f"{path}: not a readable {kind} file ({str(error).splitlines()[0]}) — fix or remove it", path
        ) from None


def check_columns(path: Path, columns: CorpusColumns) -> None:
    """Fail before anything is read or written if a named column is not in the file."""
    found = available_columns(path)
    for option, name in columns.named():
        if name not in found:
            raise BadInputError(
                f"{path}: no column {name!r} — available columns: {', '.join(found) or '(none)'}; "
                f"pass {option} NAME",
                path,
            )


def iter_record_blocks(
    path: Path, columns: CorpusColumns, start: int = 0, block_records: int = BLOCK_RECORDS
) -> Iterator[list[CorpusRecord | BadRecord]]:
    """Blocks of records from record number `start` on, each record parsed or a BadRecord saying why not."""
    unit = "line" if corpus_kind(path) == "jsonl" else "row"
    for block in _iter_rows(Path(path), start, block_records):
        yield [_record(number, row, columns, unit) for number, row in block]


def _iter_rows(path: Path, start: int, block_records: int) -> Iterator[list[tuple[int, dict | BadRecord]]]:
    kind = corpus_kind(path)
    if kind == "jsonl":
        yield from _jsonl_rows(path, start, block_records)
    elif kind == "parquet":
        yield from _arrow_rows(_parquet_batches(path, start, block_records), start)
    else:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            convert_options=pa_csv.ConvertOptions(
                strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
        yield from _arrow_rows(_numbered(reader), start)


def _jsonl_rows(path: Path, start: int, block_records: int) -> Iterator[list[tuple[int, dict | BadRecord]]]:
    block: list[tuple[int, dict | BadRecord]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            if number < start or not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    row = BadRecord(number, f"line {number + 1}: a JSON {type(row).__name__}, not an object")
            except ValueError as error:
                row = BadRecord(number, f"line {number + 1}: invalid JSON ({error})")
            block.append((number, row))
            if len(block) == block_records:
                yield block
                block = []
    if block:
        yield block


def _parquet_batches(path: Path, start: int, block_records: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(number of the batch's first row, batch), skipping whole row groups that lie before `start`."""
    parquet = pq.ParquetFile(path)
    first_row, groups = 0, []
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first_row + rows > start:
            groups.append(group)
        elif not groups:
            first_row += rows
    for batch in parquet.iter_batches(batch_size=block_records, row_groups=groups):
        yield first_row, batch
        first_row += batch.num_rows


def _numbered(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[int, pa.RecordBatch]]:
    first_row = 0
    for batch in batches:
        yield first_row, batch
        first_row += batch.num_rows


def _arrow_rows(
    batches: Iterator[tuple[int, pa.RecordBatch]], start: int
) -> Iterator[list[tuple[int, dict | BadRecord]]]:
    for first_row, batch in batches:
        block = [(first_row + i, row) for i, row in enumerate(batch.to_pylist()) if first_row + i >= start]
        if block:
            yield block


def _record(
    number: int, row: dict | BadRecord, columns: CorpusColumns, unit: str
) -> CorpusRecord | BadRecord:
    if isinstance(row, BadRecord):
        return row
    where = f"{unit} {number + 1}"
    text = row.get(columns.text)
    if text is None or not str(text).strip():
        return BadRecord(number, f"{where}: empty or missing {columns.text!r}")
    record_id = str(number + 1)
    if columns.id:
        value = row.get(columns.id)
        if value is None or str(value) == "":
            return BadRecord(number, f"{where}: empty or missing id column {columns.id!r}")
        record_id = str(value)
    title = row.get(columns.title) if columns.title else None
    return CorpusRecord(
        number=number,
        record_id=record_id,
        text=str(text),
        title=None if title is None else str(title),
        date=_as_date(row.get(columns.date)) if columns.date else None,
    )


def _as_date(value: object) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if value is None:
        return None
    text = str(value).strip()
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        return parse_date_phrase(text)
