"""The chunk store: one Parquet file of chunks (with their embeddings), a FAISS index and a manifest.

Layout of a store folder:
    manifest.json            the commit record: files seen, embedder, generation, checksums
    chunks-<gen>.parquet     every chunk of the committed generation
    index-<gen>.faiss        the FAISS index over those chunks' embeddings (ids = chunk ids)
A commit writes the new generation's files first and replaces manifest.json last (atomic rename), so a crash
at any moment leaves the previous generation intact and readers always see a complete one.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer_model.provision import sha256_file as file_sha256
from rag.atomic import atomic_write, atomic_write_json
from rag.errors import StoreError

STORE_FORMAT = 1
MANIFEST_NAME = "manifest.json"


def chunk_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("chunk_id", pa.int64()),
            ("path", pa.string()),
            ("ordinal", pa.int32()),
            ("text", pa.string()),
            ("char_start", pa.int64()),
            ("char_end", pa.int64()),
            ("line_start", pa.int32()),
            ("line_end", pa.int32()),
            ("date", pa.date32()),
            ("content_hash", pa.string()),
            ("embedding_model", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


def stable_chunk_id(path: str, ordinal: int, text: str) -> int:
    """A 63-bit id derived from the chunk itself, so re-ingesting unchanged content keeps its id."""
    digest = hashlib.blake2b(f"{path}\0{ordinal}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class FileRecord:
    """What the store knows of one source file (relative path → record)."""

    sha256: str
    size: int
    mtime_ns: int
    n_chunks: int
    date: str


@dataclass
class Manifest:
    root: str
    embedding_model: str
    dim: int
    generation: int = 0
    index_factory: str = ""  # the factory of the committed index
    index_override: str = ""  # a factory the user chose (`--index-factory`); empty = chosen by size
    n_chunks: int = 0
    files: dict[str, FileRecord] = field(default_factory=dict)
    checksums: dict[str, dict] = field(default_factory=dict)  # data file name → {"size", "sha256"}

    def to_json(self) -> dict:
        return {
            "format": STORE_FORMAT,
            "root": self.root,
            "embedding_model": self.embedding_model,
            "dim": self.dim,
            "generation": self.generation,
            "index_factory": self.index_factory,
            "index_override": self.index_override,
            "n_chunks": self.n_chunks,
            "files": {path: vars(record) for path, record in sorted(self.files.items())},
            "checksums": self.checksums,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        return cls(
            root=data["root"],
            embedding_model=data["embedding_model"],
            dim=int(data["dim"]),
            generation=int(data["generation"]),
            index_factory=data.get("index_factory", ""),
            index_override=data.get("index_override", ""),
            n_chunks=int(data.get("n_chunks", 0)),
            files={path: FileRecord(**record) for path, record in data["files"].items()},
            checksums=data.get("checksums", {}),
        )


class ChunkStore:
    """A store folder. Reading never modifies it; `commit` publishes a new generation atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def chunks_path(self, generation: int) -> Path:
        return self.folder / f"chunks-{generation}.parquet"

    def index_path(self, generation: int) -> Path:
        return self.folder / f"index-{generation}.faiss"

    def read_manifest(self, check_index: bool = True) -> Manifest:
        if not self.exists():
            raise StoreError(
                f"{self.folder}: no dsarag store here — run `dsarag ingest DIR --store {self.folder}`"
            )
        try:
            data = json.loads(self.manifest_path.read_text())
            if data.get("format") != STORE_FORMAT:
                raise ValueError(f"store format {data.get('format')} (this dsarag reads {STORE_FORMAT})")
            manifest = Manifest.from_json(data)
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(
                f"{self.manifest_path}: unreadable manifest ({error}) — delete {self.folder} and ingest again"
            ) from error
        self._check_file(
            self.chunks_path(manifest.generation), manifest, f"delete {self.folder} and ingest again"
        )
        if check_index:
            self._check_file(
                self.index_path(manifest.generation),
                manifest,
                f"run `dsarag index rebuild --store {self.folder}`",
            )
        return manifest

    def _check_file(self, path: Path, manifest: Manifest, fix: str) -> None:
        """A truncated, garbled or replaced data file no longer matches the size and sha256 of its commit."""
        expected = manifest.checksums.get(path.name)
        if expected is None:
            return
        if (
            not path.is_file()
            or path.stat().st_size != expected["size"]
            or file_sha256(path) != expected["sha256"]
        ):
            raise StoreError(f"{path}: missing or damaged store file (checksum mismatch) — {fix}")

    def read_chunks(self, manifest: Manifest, columns: list[str] | None = None) -> pa.Table:
        path = self.chunks_path(manifest.generation)
        try:
            return pq.read_table(path, columns=columns, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as error:
            raise StoreError(
                f"{path}: corrupt chunk file ({error}) — delete {self.folder} and ingest again"
            ) from error

    def read_index(self, manifest: Manifest) -> faiss.Index:
        path = self.index_path(manifest.generation)
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as error:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
            raise StoreError(
                f"{path}: corrupt index file ({message}) — run `dsarag index rebuild --store {self.folder}`"
            ) from error
        if index.ntotal != manifest.n_chunks:
            raise StoreError(
                f"{path}: index holds {index.ntotal} vectors but the store has {manifest.n_chunks} chunks — "
                f"run `dsarag index rebuild --store {self.folder}`"
            )
        return index

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_json())

    def commit(self, manifest: Manifest, chunks: pa.Table, index: faiss.Index) -> Manifest:
        """Publish chunks + index as the next generation, then drop the previous generation's files."""
        previous = manifest.generation if self.exists() else None
        generation = manifest.generation + 1
        chunks_path, index_path = self.chunks_path(generation), self.index_path(generation)
        atomic_write(
            chunks_path, lambda tmp: pq.write_table(chunks, tmp, compression="zstd", write_page_checksum=True)
        )
        atomic_write(index_path, lambda tmp: faiss.write_index(index, str(tmp)))
        manifest.generation = generation
        manifest.n_chunks = chunks.num_rows
        manifest.checksums = {
            path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
            for path in (chunks_path, index_path)
        }
        self.write_manifest(manifest)
        if previous is not None and previous != generation:
            self.chunks_path(previous).unlink(missing_ok=True)
            self.index_path(previous).unlink(missing_ok=True)
        return manifest


def embeddings_of(chunks: pa.Table) -> np.ndarray:
    """The embedding column as a contiguous (n, dim) float32 array."""
    column = chunks.column("embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, column.type.list_size), dtype=np.float32)
    return (
        column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1).astype(np.float32, copy=False)
    )
