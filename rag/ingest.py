"""Batch ingest of folders, globs and corpus files into a chunk store: streaming, parallel, resumable.

Sources are document files (found by walking folders, or named) and corpus files (JSONL, Parquet, CSV named
on the command line, one document per record). Work items — one document, or one block of records — are
read and chunked by a pool of processes while the main process embeds; every ~`batch_chunks` chunks are
committed as one Parquet shard together with the manifest's progress (which sources are done, how many
records of a corpus file), so memory stays bounded and a run killed at any moment resumes where its last
commit ended. The index is brought up to date once at the end (rag/store_index.py).

Unchanged sources (same size and mtime, or same sha256) are skipped; changed ones replace their chunks in the
same commit that adds the new ones; sources gone from a scanned folder lose their chunks. A document that
fails to read keeps what the store had of it; a corpus record that fails is skipped; both are reported.
"""

import glob
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsarag.base.errors import DsaragError, MissingInputError, StoreError
from dsarag.corpora.chunking import chunk_text
from dsarag.corpora.corpus_files import (
    BLOCK_RECORDS,
    BadRecord,
    CorpusColumns,
    CorpusRecord,
    check_columns,
    corpus_kind,
    iter_record_blocks,
)
from dsarag.corpora.dates import document_date
from dsarag.corpora.readers import read_document
from dsarag.corpora.tokens import token_spans_from_tokenizer_json
from dsarag.corpora.walk import MAX_FILE_BYTES, walk_folder
from dsarag.rag.embed import Embedder
from dsarag.rag.lock import DEFAULT_LOCK_TIMEOUT_S, store_write_lock
from dsarag.rag.parent_death import exit_with_parent
from dsarag.rag.store import ChunkStore, FileRecord, Manifest, chunk_schema, file_sha256, stable_chunk_id
from dsarag.rag.store_index import update_index

CHUNK_TOKENS = 200  # the embedder reads 256 tokens; leave room for special tokens and boundary snapping
CHUNK_OVERLAP_TOKENS = 40
BATCH_CHUNKS = 1024  # chunks per commit: one shard; minutes of CPU embedding, a second or two on a GPU
GLOB_CHARACTERS = set("*?[")


@dataclass
class IngestOptions:
    columns: CorpusColumns = field(default_factory=CorpusColumns)
    batch_chunks: int = BATCH_CHUNKS
    workers: int | None = (
        None  # read/chunk processes; None = one per core but the one that embeds; 0 = inline
    )
    index_factory: str | None = None
    engine: str = "local"  # or "ray" (rag/ingest_ray.py)
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S  # wait this long for another writer of the store
    take_lock: bool = True  # False only for a caller that holds the store's lock already (doctor --repair)
    max_file_bytes: int = MAX_FILE_BYTES  # documents above this size are skipped with a reason


@dataclass
class FileFailure:
    path: str
    reason: str


@dataclass
class IngestReport:
    store: str
    files_seen: int = 0
    unchanged: int = 0
    added: int = 0
    changed: int = 0
    deleted: int = 0
    resumed: int = 0
    records_read: int = 0
    chunks_total: int = 0
    chunks_embedded: int = 0
    tokens_embedded: int = 0
    batches_committed: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    index_seconds: float = 0.0
    index_factory: str = ""
    index_action: str = ""
    leftovers_removed: int = 0
    committed: bool = False
    failed: list[FileFailure] = field(default_factory=list)
    skipped: list[FileFailure] = field(default_factory=list)

    def to_json(self) -> dict:
        data = dict(vars(self))
        data["failed"] = [vars(item) for item in self.failed]
        data["skipped"] = [vars(item) for item in self.skipped]
        data["chunks_per_s"] = self.chunks_embedded / self.seconds if self.seconds else 0.0
        data["tokens_per_s"] = self.tokens_embedded / self.seconds if self.seconds else 0.0
        return data


@dataclass(frozen=True)
class Source:
    key: str  # path relative to the store root (posix): the manifest key and the `source` column
    path: Path
    corpus: bool  # records in a JSONL/Parquet/CSV file, or one document


@dataclass
class WorkItem:
    """One unit for the read/chunk pool: a whole document, or a block of corpus records."""

    source: Source
    sha256: str
    records: list[CorpusRecord | BadRecord] | None = None


@dataclass
class WorkResult:
    key: str
    rows: list[dict]
    failures: list[FileFailure]
    records_through: int = 0  # corpus: number of the last record in the block + 1
    n_records: int = 0
    text_bytes: int = 0
    record: FileRecord | None = None  # documents: the record to store once the rows are committed
    vectors: np.ndarray | None = None  # embeddings, when an engine embedded the rows already (Ray)


@dataclass
class SourceEnd:
    """Marks that every block of a corpus file has been handed out (it is complete once committed)."""

    key: str
    failure: FileFailure | None = None


def ingest(
    inputs: Sequence[Path | str],
    store: ChunkStore,
    embedder: Embedder,
    options: IngestOptions | None = None,
    console: Console | None = None,
) -> IngestReport:
    """Bring `store` up to date with `inputs` (folders, files, glob patterns); return what happened."""
    options = options or IngestOptions()
    started = time.perf_counter()
    paths = expand_inputs(inputs)
    report = IngestReport(store=str(store.folder))
    sources, folders = _collect_sources(paths, report, options.max_file_bytes)
    for source in sources:
        if source.corpus:
            check_columns(source.path, options.columns)
    # One writer at a time: the plan, the leftovers sweep and every commit need the store to stand still.
    if options.take_lock:
        with store_write_lock(store.folder, options.lock_timeout_s):
            _ingest_locked(paths, sources, folders, store, embedder, options, report, console)
    else:
        _ingest_locked(paths, sources, folders, store, embedder, options, report, console)
    report.seconds = time.perf_counter() - started
    return report


def _ingest_locked(
    paths: list[Path],
    sources: list[Source],
    folders: list[Path],
    store: ChunkStore,
    embedder: Embedder,
    options: IngestOptions,
    report: IngestReport,
    console: Console | None,
) -> None:
    manifest = _open_or_create_manifest(store, paths, embedder)
    base = Path(manifest.root)
    sources = [Source(_key(source.path, base), source.path, source.corpus) for source in sources]
    report.files_seen = len(sources)
    report.leftovers_removed = len(store.remove_leftovers(manifest if store.exists() else None))

    plan = _plan(sources, folders, manifest, base, report)
    if options.index_factory:
        manifest.index_override = options.index_factory
    writer = _BatchWriter(store, manifest, embedder, options, report, plan, console)
    if options.engine == "ray":
        from dsarag.rag.ingest_ray import run_ray_pipeline

        writer.consume(run_ray_pipeline(plan.to_read, plan.resume_from, embedder, options))
    else:
        work = work_items(plan.to_read, plan.resume_from, options.columns, block_records(options))
        writer.consume(_run_pool(work, embedder, options))
    writer.finish()

    if store.exists():
        manifest = writer.manifest
        fill = None
        if options.engine == "ray":  # IVF shards are added on the cluster and merged
            from dsarag.rag.ingest_ray import fill_on_ray as fill
        with (console or Console(stderr=True, quiet=True)).status(f"indexing {manifest.n_chunks} chunks"):
            update = update_index(store, manifest, options.index_factory, fill=fill)
        report.index_factory, report.index_action, report.index_seconds = (
            update.factory,
            update.action,
            update.seconds,
        )
        report.committed = report.committed or update.action != "unchanged"
        report.chunks_total = manifest.n_chunks


def ingest_folder(
    root: Path,
    store: ChunkStore,
    embedder: Embedder,
    index_factory: str | None = None,
    console: Console | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> IngestReport:
    """Bring `store` up to date with the documents under `root` (a folder or one file)."""
    options = IngestOptions(index_factory=index_factory, lock_timeout_s=lock_timeout_s)
    return ingest([root], store, embedder, options, console)


def expand_inputs(inputs: Sequence[Path | str]) -> list[Path]:
    """Paths as given; a pattern with * ? [ that is not an existing path is expanded (** spans folders)."""
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        if GLOB_CHARACTERS & set(text) and not Path(text).expanduser().exists():
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise MissingInputError(f"{text}: no file matches this pattern — check it, or quote it", text)
            paths.extend(Path(match) for match in matches)
        else:
            paths.append(Path(text).expanduser())
    return list(dict.fromkeys(paths))


def _collect_sources(
    paths: list[Path], report: IngestReport, max_file_bytes: int = MAX_FILE_BYTES
) -> tuple[list[Source], list[Path]]:
    """Documents of every folder, plus named files (corpus files by extension); and the folders scanned."""
    sources: list[Source] = []
    folders: list[Path] = []
    for path in paths:
        if path.is_file() and corpus_kind(path):
            sources.append(Source("", path, corpus=True))
            continue
        walk = walk_folder(path, max_file_bytes=max_file_bytes)
        if path.is_dir():
            folders.append(path.resolve())
            if not walk.files:
                detail = f"(first: {walk.skipped[0].path}: {walk.skipped[0].reason})" if walk.skipped else ""
                if len(paths) == 1:
                    raise MissingInputError(
                        f"{path}: no documents found — add .txt/.md/.html/.pdf/code files or pick another folder "
                        f"{detail}".strip(),
                        path,
                    )
        report.skipped.extend(FileFailure(str(item.path), item.reason) for item in walk.skipped)
        sources.extend(Source("", file, corpus=False) for file in walk.files)
    if not sources:
        first = f" (first: {report.skipped[0].path}: {report.skipped[0].reason})" if report.skipped else ""
        raise MissingInputError(f"{paths[0]}: none of the inputs is a readable document{first}", paths[0])
    return list({source.path.resolve(): source for source in sources}.values()), folders


def _open_or_create_manifest(store: ChunkStore, paths: list[Path], embedder: Embedder) -> Manifest:
    tops = [path.resolve() if path.is_dir() else path.resolve().parent for path in paths]
    if not store.exists():
        return Manifest(root=os.path.commonpath(tops), embedding_model=embedder.name, dim=embedder.dim)
    manifest = store.read_manifest(check_index=False)
    if manifest.embedding_model != embedder.name or manifest.dim != embedder.dim:
        raise StoreError(
            f"{store.folder}: built with embedder {manifest.embedding_model!r}, not {embedder.name!r} — "
            f"use a new --store or delete {store.folder} to rebuild"
        )
    outside = [top for top in tops if not top.is_relative_to(manifest.root)]
    if outside:
        raise StoreError(
            f"{store.folder}: holds documents of {manifest.root}, not {outside[0]} — pass another --store for it"
        )
    return manifest


def _key(path: Path, base: Path) -> str:
    return path.resolve().relative_to(base).as_posix()


@dataclass
class _Plan:
    to_read: list[tuple[Source, str]]  # (source, sha256) to read, in order
    deleted: list[str]
    changed: set[str]  # known sources whose old chunks go when their first new chunks are committed
    resume_from: dict[str, int]  # corpus files to continue: key → first record not yet committed
    touched: dict[str, int]  # unchanged content, new mtime: key → mtime_ns
    total_bytes: int


def _plan(
    sources: list[Source],
    folders: list[Path],
    manifest: Manifest,
    base: Path,
    report: IngestReport,
) -> _Plan:
    seen: set[str] = set()
    to_read: list[tuple[Source, str]] = []
    changed: set[str] = set()
    resume_from: dict[str, int] = {}
    touched: dict[str, int] = {}
    for source in sources:
        seen.add(source.key)
        known = manifest.files.get(source.key)
        stat = source.path.stat()
        same_stat = known and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns
        if same_stat and known.complete:
            report.unchanged += 1
            continue
        sha = file_sha256(source.path)
        if known and known.sha256 == sha:
            if known.complete:
                touched[source.key] = stat.st_mtime_ns  # touched, not changed: remember the new mtime only
                report.unchanged += 1
                continue
            resume_from[source.key] = known.records_done
            report.resumed += 1
        elif known:
            changed.add(source.key)
            report.changed += 1
        else:
            report.added += 1
        to_read.append((source, sha))

    folder_keys = [_key(folder, base) for folder in folders]
    deleted = sorted(
        key
        for key in set(manifest.files) - seen
        if any(folder == "." or key.startswith(folder + "/") for folder in folder_keys)
    )
    report.deleted = len(deleted)
    total = sum(source.path.stat().st_size for source, _ in to_read)
    return _Plan(to_read, deleted, changed, resume_from, touched, total)


def block_records(options: IngestOptions) -> int:
    return min(BLOCK_RECORDS, options.batch_chunks)


def work_items(
    to_read: list[tuple[Source, str]], resume_from: dict[str, int], columns: CorpusColumns, block_records: int
) -> Iterator[WorkItem | SourceEnd]:
    """Documents whole, corpus files as blocks of records from their resume point, each file closed by a
    SourceEnd."""
    for source, sha in to_read:
        if not source.corpus:
            yield WorkItem(source, sha)
            continue
        failure = None
        try:
            for block in iter_record_blocks(
                source.path, columns, resume_from.get(source.key, 0), block_records
            ):
                yield WorkItem(source, sha, block)
        except (OSError, ValueError, pa.ArrowException) as error:
            failure = FileFailure(
                source.key, f"read failed ({str(error).splitlines()[0]}) — fix the file and run again"
            )
        yield SourceEnd(source.key, failure)


# Read/chunk workers: module-level so a process pool can run them; the tokenizer is loaded once per process.
_worker_state: dict = {}


def init_worker(tokenizer_json: Path, embedding_model: str) -> None:
    _worker_state["spans"] = token_spans_from_tokenizer_json(tokenizer_json)
    _worker_state["model"] = embedding_model


def init_pool_worker(parent_pid: int, tokenizer_json: Path, embedding_model: str) -> None:
    # a killed ingest must not leave its workers (and through them the resource tracker) running
    exit_with_parent(parent_pid)
    init_worker(tokenizer_json, embedding_model)


def chunk_work_item(item: WorkItem) -> WorkResult:
    """Read (documents) and chunk one work item into store rows (without embeddings)."""
    source = item.source
    if item.records is None:
        try:
            text = read_document(source.path)
            doc_date = document_date(source.path, text)
        except DsaragError as error:  # the failure's path names the file: keep only the reason
            reason = getattr(error, "reason", None) or str(error)
            return WorkResult(source.key, [], [FileFailure(source.key, reason)])
        rows = _chunk_rows(text, source.key, source.key, source.key, None, doc_date, item.sha256)
        stat = source.path.stat()
        record = FileRecord(item.sha256, stat.st_size, stat.st_mtime_ns, len(rows), str(doc_date))
        return WorkResult(source.key, rows, [], text_bytes=stat.st_size, record=record)
    rows, failures, text_bytes = [], [], 0
    fallback_date = _mtime_date(source.path)
    for record in item.records:
        if isinstance(record, BadRecord):
            failures.append(FileFailure(source.key, record.reason))
            continue
        text_bytes += len(record.text)
        rows += _chunk_rows(
            record.text,
            source.key,
            f"{source.key}#{record.record_id}",
            f"{source.key}#{record.number}",  # the position, not the id: ids may repeat, positions cannot
            record.title,
            record.date or fallback_date,
            item.sha256,
        )
    return WorkResult(source.key, rows, failures, item.records[-1].number + 1, len(item.records), text_bytes)


def _chunk_rows(
    text: str, source: str, cite_path: str, id_path: str, title: str | None, row_date: date, sha: str
) -> list[dict]:
    token_spans = _worker_state["spans"](text)
    chunks = chunk_text(text, lambda _text: token_spans, CHUNK_TOKENS, CHUNK_OVERLAP_TOKENS)
    starts = np.array([start for start, _ in token_spans], dtype=np.int64)
    return [
        {
            "chunk_id": stable_chunk_id(id_path, ordinal, chunk.text),
            "source": source,
            "path": cite_path,
            "title": title,
            "ordinal": ordinal,
            "text": chunk.text,
            "char_start": chunk.char_start,
            "char_end": chunk.char_end,
            "line_start": chunk.line_start,
            "line_end": chunk.line_end,
            "date": row_date,
            "content_hash": sha,
            "embedding_model": _worker_state["model"],
            "n_tokens": int(
                np.searchsorted(starts, chunk.char_end) - np.searchsorted(starts, chunk.char_start)
            ),
        }
        for ordinal, chunk in enumerate(chunks)
    ]


def _mtime_date(path: Path) -> date:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC).date()


def default_workers() -> int:
    """One reader/chunker per usable core but one (the embedder's): taskset and container limits count."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, usable - 1)


def _run_pool(
    work: Iterator[WorkItem | SourceEnd], embedder: Embedder, options: IngestOptions
) -> Iterator[WorkResult | SourceEnd]:
    """Results in work order; at most a few items per worker in flight, so memory stays bounded."""
    workers = default_workers() if options.workers is None else options.workers
    if workers == 0:
        init_worker(embedder.tokenizer_json, embedder.name)
        for item in work:
            yield item if isinstance(item, SourceEnd) else chunk_work_item(item)
        return
    # spawn, not fork: the parent may already run torch threads, which do not survive a fork
    # workers start (on submit) and stop (leaving the with) in this thread, as exit_with_parent needs
    with ProcessPoolExecutor(
        workers,
        get_context("spawn"),
        initializer=init_pool_worker,
        initargs=(os.getpid(), embedder.tokenizer_json, embedder.name),
    ) as pool:
        in_flight: deque[Future | SourceEnd] = deque()
        for item in work:
            in_flight.append(item if isinstance(item, SourceEnd) else pool.submit(chunk_work_item, item))
            while len(in_flight) > 4 * workers:
                yield _result(in_flight.popleft())
        while in_flight:
            yield _result(in_flight.popleft())


def _result(entry: Future | SourceEnd) -> WorkResult | SourceEnd:
    return entry if isinstance(entry, SourceEnd) else entry.result()


class _BatchWriter:
    """Collects chunk rows into batches; embeds and commits each with the sources' progress."""

    def __init__(
        self,
        store: ChunkStore,
        manifest: Manifest,
        embedder: Embedder,
        options: IngestOptions,
        report: IngestReport,
        plan: _Plan,
        console: Console | None,
    ) -> None:
        self.store, self.manifest, self.embedder = store, manifest, embedder
        self.options, self.report, self.plan = options, report, plan
        self.rows: list[dict] = []
        self.vectors: list[np.ndarray] = []
        self.drop: set[str] = set(plan.deleted)
        self.records: dict[str, FileRecord] = {}  # manifest updates that take effect with the next commit
        self.to_drop_first = set(plan.changed)
        self.shas = {source.key: sha for source, sha in plan.to_read}
        self.begun: set[str] = set()
        self.progress = _progress(console)
        self.progress.start()
        self.task = self.progress.add_task("ingest", total=plan.total_bytes or None, chunks="0", rate="")
        self.started = time.perf_counter()

    def consume(self, results: Iterator[WorkResult | SourceEnd]) -> None:
        for result in results:
            self.add(result)

    def add(self, result: WorkResult | SourceEnd) -> None:
        if self.to_drop_first and result.key in self.to_drop_first and not self._failed_document(result):
            self.to_drop_first.discard(result.key)
            self.drop.add(result.key)  # the old chunks go in the commit that brings the first new ones
        if self._failed_document(result):  # counted as added or changed when planned; it keeps what it had
            if result.key in self.plan.changed:
                self.report.changed -= 1
            else:
                self.report.added -= 1
        if isinstance(result, SourceEnd):
            self._end_corpus(result)
        else:
            self.report.failed.extend(result.failures)
            if result.record is not None:
                self.records[result.key] = result.record
            elif result.records_through:
                self._advance_corpus(result)
            self.rows.extend(result.rows)
            if result.vectors is not None:
                self.vectors.append(result.vectors)
            self.progress.advance(self.task, result.text_bytes)
        if len(self.rows) >= self.options.batch_chunks:
            self.commit()

    def _failed_document(self, result: WorkResult | SourceEnd) -> bool:
        return isinstance(result, WorkResult) and result.record is None and not result.records_through

    def _corpus_record(self, key: str) -> FileRecord:
        """The record a corpus file gets at the next commit: continued from the manifest once its first
        blocks are committed (in this run or a killed one), else a fresh one."""
        if key not in self.records:
            known = self.manifest.files.get(key)
            columns = self.options.columns.as_record()
            if known is not None and (key in self.plan.resume_from or key in self.begun):
                self.records[key] = replace(known, complete=False, columns=columns)
            else:
                stat = (Path(self.manifest.root) / key).stat()
                date_text = str(datetime.fromtimestamp(stat.st_mtime, tz=UTC).date())
                self.records[key] = FileRecord(
                    self.shas[key], stat.st_size, stat.st_mtime_ns, 0, date_text, 0, False, columns
                )
            self.begun.add(key)
        return self.records[key]

    def _advance_corpus(self, result: WorkResult) -> None:
        record = self._corpus_record(result.key)
        record.records_done = result.records_through
        record.n_chunks += len(result.rows)
        self.report.records_read += result.n_records

    def _end_corpus(self, end: SourceEnd) -> None:
        if end.failure is not None:
            self.report.failed.append(end.failure)
            return
        self._corpus_record(end.key).complete = True

    def commit(self) -> None:
        if not (self.rows or self.drop or self.records):
            return
        new_chunks = None
        if self.rows:
            if self.vectors:
                vectors = np.concatenate(self.vectors)
            else:
                texts = [row["text"] for row in self.rows]
                embed_started = time.perf_counter()
                vectors = self.embedder.encode(texts, batch_size=256 if self.embedder.on_gpu else 64)
                self.report.embed_seconds += time.perf_counter() - embed_started
            self.report.chunks_embedded += len(self.rows)
            self.report.tokens_embedded += sum(row.pop("n_tokens") for row in self.rows)
            new_chunks = _table(self.rows, vectors, self.manifest.dim)
        for key in self.drop:
            self.manifest.files.pop(key, None)
        self.manifest.files.update(self.records)
        self.manifest = self.store.commit_batch(self.manifest, new_chunks, self.drop)
        self.report.batches_committed += 1
        self.report.committed = True
        self.rows, self.vectors, self.drop, self.records = [], [], set(), {}
        elapsed = time.perf_counter() - self.started
        rate = f"{self.report.chunks_embedded / elapsed:.1f} chunks/s · {self.report.tokens_embedded / elapsed:.0f} tok/s"
        self.progress.update(self.task, chunks=str(self.report.chunks_embedded), rate=rate)

    def finish(self) -> None:
        try:
            self.commit()
            if self.plan.touched:
                for key, mtime_ns in self.plan.touched.items():
                    self.manifest.files[key].mtime_ns = mtime_ns
                self.store.write_manifest(self.manifest)
        finally:
            self.progress.stop()


def _table(rows: list[dict], vectors: np.ndarray, dim: int) -> pa.Table:
    schema = chunk_schema(dim)
    columns = {name: [row[name] for row in rows] for name in schema.names if name != "embedding"}
    arrays = [pa.array(columns[name], type=schema.field(name).type) for name in columns]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    return pa.Table.from_arrays([*arrays, embedding], schema=schema)


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[chunks]} chunks"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=console is None,
        transient=True,
    )
