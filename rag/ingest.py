"""Incremental ingest of a document folder into a chunk store.

Unchanged files (same size and mtime, or same sha256) keep their chunks and ids; changed files are re-read,
re-chunked and re-embedded; deleted files lose their chunks. A file that fails to read keeps whatever the
store already had of it and is reported. Nothing is published unless something changed.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from corpora.chunking import chunk_text
from corpora.dates import document_date
from corpora.readers import read_document
from corpora.tokens import token_spans_from_tokenizer_json
from corpora.walk import walk_folder
from rag.embed import Embedder
from rag.errors import DsaragError, MissingInputError, StoreError
from rag.index import build_index
from rag.store import (
    ChunkStore,
    FileRecord,
    Manifest,
    chunk_schema,
    embeddings_of,
    file_sha256,
    stable_chunk_id,
)

CHUNK_TOKENS = 200  # the embedder reads 256 tokens; leave room for special tokens and boundary snapping
CHUNK_OVERLAP_TOKENS = 40


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
    chunks_total: int = 0
    chunks_embedded: int = 0
    tokens_embedded: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    index_factory: str = ""
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


@dataclass
class _NewDocument:
    rel_path: str
    record: FileRecord
    rows: list[dict]


def ingest_folder(
    root: Path,
    store: ChunkStore,
    embedder: Embedder,
    index_factory: str | None = None,
    console: Console | None = None,
) -> IngestReport:
    """Bring `store` up to date with the documents under `root`; return what happened."""
    started = time.perf_counter()
    root = Path(root).expanduser()
    walk = walk_folder(root)
    base = root.resolve() if root.is_dir() else root.resolve().parent
    if not walk.files and not walk.skipped:
        raise MissingInputError(
            f"{root}: no documents found — add .txt/.md/.html/.pdf/code files or pick another folder"
        )
    if not walk.files:
        raise MissingInputError(
            f"{root}: none of its {len(walk.skipped)} files is a readable document "
            f"(first: {walk.skipped[0].path}: {walk.skipped[0].reason})"
        )

    manifest = _open_or_create_manifest(store, base, embedder)
    report = IngestReport(store=str(store.folder), files_seen=len(walk.files))
    report.skipped = [FileFailure(str(item.path), item.reason) for item in walk.skipped]

    seen: set[str] = set()
    touched = False
    to_read: list[tuple[str, Path, str]] = []
    for path in walk.files:
        rel_path = path.resolve().relative_to(base).as_posix()
        seen.add(rel_path)
        known = manifest.files.get(rel_path)
        stat = path.stat()
        if known and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
            report.unchanged += 1
            continue
        sha = file_sha256(path)
        if known and known.sha256 == sha:
            known.mtime_ns = stat.st_mtime_ns  # touched, not changed: remember the new mtime only
            touched = True
            report.unchanged += 1
            continue
        to_read.append((rel_path, path, sha))

    deleted = sorted(set(manifest.files) - seen)
    report.deleted = len(deleted)

    spans = token_spans_from_tokenizer_json(embedder.tokenizer_json)
    new_documents: list[_NewDocument] = []
    for rel_path, path, sha in to_read:
        try:
            new_documents.append(_read_and_chunk(rel_path, path, sha, spans, embedder.name))
        except DsaragError as error:
            report.failed.append(FileFailure(rel_path, str(error)))
            continue
        if rel_path in manifest.files:
            report.changed += 1
        else:
            report.added += 1

    if not new_documents and not deleted:
        report.chunks_total = manifest.n_chunks
        report.index_factory = manifest.index_factory
        if touched:
            store.write_manifest(manifest)
        report.seconds = time.perf_counter() - started
        return report

    new_rows = [row for document in new_documents for row in document.rows]
    embed_started = time.perf_counter()
    vectors = _embed_rows(new_rows, embedder, console)
    report.embed_seconds = time.perf_counter() - embed_started
    report.chunks_embedded = len(new_rows)
    report.tokens_embedded = sum(row.pop("n_tokens") for row in new_rows)
    for row, vector in zip(new_rows, vectors, strict=True):
        row["embedding"] = vector

    replaced = {document.rel_path for document in new_documents} | set(deleted)
    kept = _kept_rows(store, manifest, replaced)
    new_table = pa.Table.from_pylist(new_rows, schema=chunk_schema(manifest.dim))
    chunks = pa.concat_tables([kept, new_table]).sort_by([("path", "ascending"), ("ordinal", "ascending")])

    for rel_path in deleted:
        del manifest.files[rel_path]
    for document in new_documents:
        manifest.files[document.rel_path] = document.record

    ids = chunks.column("chunk_id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise StoreError(f"{store.folder}: duplicate chunk ids in this ingest — report this as a bug")
    if index_factory:
        manifest.index_override = index_factory
    index, manifest.index_factory = build_index(embeddings_of(chunks), ids, manifest.index_override or None)
    store.commit(manifest, chunks, index)
    report.committed = True
    report.chunks_total = chunks.num_rows
    report.index_factory = manifest.index_factory
    report.seconds = time.perf_counter() - started
    return report


def _open_or_create_manifest(store: ChunkStore, base: Path, embedder: Embedder) -> Manifest:
    if not store.exists():
        return Manifest(root=str(base), embedding_model=embedder.name, dim=embedder.dim)
    manifest = store.read_manifest()
    if manifest.embedding_model != embedder.name or manifest.dim != embedder.dim:
        raise StoreError(
            f"{store.folder}: built with embedder {manifest.embedding_model!r}, not {embedder.name!r} — "
            f"use a new --store or delete {store.folder} to rebuild"
        )
    if Path(manifest.root) != base:
        raise StoreError(
            f"{store.folder}: holds documents of {manifest.root}, not {base} — pass another --store for this folder"
        )
    return manifest


def _read_and_chunk(rel_path: str, path: Path, sha: str, spans, embedding_model: str) -> _NewDocument:  # noqa: ANN001
    text = read_document(path)
    date = document_date(path, text)
    token_spans = spans(text)
    chunks = chunk_text(text, lambda _text: token_spans, CHUNK_TOKENS, CHUNK_OVERLAP_TOKENS)
    starts = np.array([start for start, _ in token_spans], dtype=np.int64)
    rows = []
    for ordinal, chunk in enumerate(chunks):
        n_tokens = int(np.searchsorted(starts, chunk.char_end) - np.searchsorted(starts, chunk.char_start))
        rows.append(
            {
                "chunk_id": stable_chunk_id(rel_path, ordinal, chunk.text),
                "path": rel_path,
                "ordinal": ordinal,
                "text": chunk.text,
                "char_start": chunk.char_start,
                "char_end": chunk.char_end,
                "line_start": chunk.line_start,
                "line_end": chunk.line_end,
                "date": date,
                "content_hash": sha,
                "embedding_model": embedding_model,
                "n_tokens": n_tokens,
            }
        )
    stat = path.stat()
    record = FileRecord(
        sha256=sha, size=stat.st_size, mtime_ns=stat.st_mtime_ns, n_chunks=len(rows), date=str(date)
    )
    return _NewDocument(rel_path, record, rows)


def _embed_rows(rows: list[dict], embedder: Embedder, console: Console | None) -> np.ndarray:
    batch_size = 64
    texts = [row["text"] for row in rows]
    parts = []
    with Progress(
        TextColumn("[bold]embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=console is None,
        transient=True,
    ) as progress:
        task = progress.add_task("embed", total=len(texts))
        for start in range(0, len(texts), batch_size * 4):
            batch = texts[start : start + batch_size * 4]
            parts.append(embedder.encode(batch, batch_size=batch_size))
            progress.advance(task, len(batch))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)


def _kept_rows(store: ChunkStore, manifest: Manifest, replaced: set[str]) -> pa.Table:
    if not store.exists() or manifest.n_chunks == 0:
        return chunk_schema(manifest.dim).empty_table()
    chunks = store.read_chunks(manifest)
    keep = np.array([path not in replaced for path in chunks.column("path").to_pylist()], dtype=bool)
    return chunks.filter(pa.array(keep))
