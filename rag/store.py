"""The chunk store: Parquet shards of chunks (with their embeddings), one FAISS index and a manifest.

Layout of a store folder:
    manifest.json              the commit record: sources and their progress, shards, index, checksums
    chunks-<gen>[-<n>].parquet  immutable shards; together they hold every live chunk exactly once
    index-<gen>.faiss          the FAISS index over the chunks of the shards marked `indexed`
Every commit writes its new files first and replaces manifest.json last (atomic rename), so a crash at any
moment leaves the previous commit intact and readers always see a complete one; files no manifest names are
leftovers of a killed writer and are removed by the next one. Ingest commits one shard per batch and updates
the index once per run: a reader between the two adds the not-yet-indexed shards to the index in memory.
Chunks replaced in an indexed shard leave the index at once where FAISS can remove them (Flat, IVF) and are
otherwise tombstones (HNSW), filtered out of searches until the next rebuild.
"""

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dsarag.base.atomic import atomic_write, atomic_write_json
from dsarag.base.errors import StoreError
from dsarag.indexer_model.provision import sha256_file as file_sha256

STORE_FORMAT = 2
MANIFEST_NAME = "manifest.json"
MANIFEST_CHECKSUM_KEY = "manifest_sha256"  # of the manifest's own content: a garbled byte is caught on open
READ_ATTEMPTS = 5
T = TypeVar("T")
_DATA_FILE = re.compile(r"(chunks-\d+(-\d+)?\.parquet|index-\d+\.faiss|\..+\.tmp)")


def chunk_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("chunk_id", pa.int64()),
            ("source", pa.string()),  # the file the chunk came from (manifest key), for replacement
            ("path", pa.string()),  # what a citation names: the file, or `file#record-id` for corpus records
            ("title", pa.string()),
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
    records_done: int = 0  # corpus files: records committed so far, in file order (resume point)
    complete: bool = True  # False while a corpus file is only partly committed
    # corpus files: the columns they were read with (doctor re-reads them)
    columns: dict[str, str] | None = None


@dataclass
class ShardRecord:
    name: str
    rows: int
    indexed: bool  # its chunks are in the index file (else a reader adds them in memory)


@dataclass
class Manifest:
    root: str
    embedding_model: str
    dim: int
    generation: int = 0
    index_factory: str = ""  # the factory of the committed index
    index_override: str = ""  # a factory the user chose (`--index-factory`); empty = chosen by size
    n_chunks: int = 0  # live chunks (rows of all shards)
    files: dict[str, FileRecord] = field(default_factory=dict)
    shards: list[ShardRecord] = field(default_factory=list)
    index_file: str = ""  # empty until the first index is written
    tombstones: list[int] = field(default_factory=list)  # ids still in the index file but no longer live
    checksums: dict[str, dict] = field(default_factory=dict)  # data file name → {"size", "sha256"}

    @property
    def pending_shards(self) -> list[ShardRecord]:
        return [shard for shard in self.shards if not shard.indexed]

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
            "shards": [vars(shard) for shard in self.shards],
            "index_file": self.index_file,
            "tombstones": sorted(self.tombstones),
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
            shards=[ShardRecord(**shard) for shard in data["shards"]],
            index_file=data.get("index_file", ""),
            tombstones=[int(chunk_id) for chunk_id in data.get("tombstones", [])],
            checksums=data.get("checksums", {}),
        )


class ChunkStore:
    """A store folder. Reading never modifies it; the commit methods publish a new manifest atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def parse_manifest(self) -> Manifest:
        """The manifest alone: readable, of this format, matching its own checksum (data files unchecked)."""
        if not self.exists():
            raise StoreError(
                f"{self.folder}: no dsarag store here — run `dsarag ingest DIR --store {self.folder}`"
            )
        try:
            data = json.loads(self.manifest_path.read_text())
            if data.get("format") != STORE_FORMAT:
                raise ValueError(f"store format {data.get('format')} (this dsarag reads {STORE_FORMAT})")
            expected = data.pop(MANIFEST_CHECKSUM_KEY, None)  # absent in stores written before it existed
            if expected is not None and expected != manifest_checksum(data):
                raise ValueError("its content does not match its checksum: the file was altered or damaged")
            manifest = Manifest.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise StoreError(
                f"{self.manifest_path}: unreadable manifest ({error}) — run `dsarag doctor --store "
                f"{self.folder} --repair --docs DIR`, or delete {self.folder} and ingest again"
            ) from error
        return manifest

    def read_manifest(self, check_index: bool = True) -> Manifest:
        manifest = self.parse_manifest()
        for shard in manifest.shards:
            self._check_file(
                self.folder / shard.name, manifest, f"run `dsarag doctor --store {self.folder} --repair`"
            )
        if check_index and manifest.index_file:
            self._check_file(
                self.folder / manifest.index_file,
                manifest,
                f"run `dsarag index rebuild --store {self.folder}`",
            )
        return manifest

    def read_committed(self, read: Callable[[Manifest], T], attempts: int = READ_ATTEMPTS) -> T:
        """`read(manifest)` against the last committed state, without the write lock. A writer that commits
        meanwhile may delete files the old manifest named (rewritten shards, the replaced index): the read is
        then retried on the new commit; a failure on an unchanged manifest is real damage and is raised."""
        for attempt in range(attempts):
            before = self._manifest_bytes()
            try:
                return read(self.read_manifest())
            except StoreError:
                if attempt + 1 == attempts or self._manifest_bytes() == before:
                    raise
        raise AssertionError("unreachable")

    def _manifest_bytes(self) -> bytes:
        try:
            return self.manifest_path.read_bytes()
        except OSError:
            return b""

    def _check_file(self, path: Path, manifest: Manifest, fix: str) -> None:
        if not self.file_intact(path.name, manifest):
            raise StoreError(f"{path}: missing or damaged store file (checksum mismatch) — {fix}")

    def file_intact(self, name: str, manifest: Manifest) -> bool:
        """A truncated, garbled or replaced data file no longer matches the size and sha256 of its commit."""
        expected = manifest.checksums.get(name)
        path = self.folder / name
        return (
            expected is not None
            and path.is_file()
            and path.stat().st_size == expected["size"]
            and file_sha256(path) == expected["sha256"]
        )

    def read_shard(self, name: str, columns: list[str] | None = None) -> pa.Table:
        path = self.folder / name
        try:
            return pq.read_table(path, columns=columns, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as error:
            raise StoreError(
                f"{path}: corrupt chunk file ({error}) — run `dsarag doctor --store {self.folder} --repair`"
            ) from error

    def read_chunks(self, manifest: Manifest, columns: list[str] | None = None) -> pa.Table:
        """Every live chunk of the commit, as one table (shards in commit order)."""
        tables = [self.read_shard(shard.name, columns) for shard in manifest.shards]
        if not tables:
            schema = chunk_schema(manifest.dim)
            return (
                schema.empty_table()
                if columns is None
                else pa.schema([schema.field(c) for c in columns]).empty_table()
            )
        return pa.concat_tables(tables)

    def read_index(self, manifest: Manifest) -> faiss.Index:
        """The committed index (its vectors memory-mapped) plus the chunks committed since it was written.

        Search it with `rag.index.search(index, queries, k, exclude_ids=manifest.tombstones)`."""
        from dsarag.rag.index import add_vectors, build_index

        if manifest.index_file:
            path = self.folder / manifest.index_file
            try:
                # Zero-copy mmap of the vectors, unless shards must be added: FAISS cannot grow a mapped index.
                flags = 0 if manifest.pending_shards else faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
                index = faiss.read_index(str(path), flags)
            except RuntimeError as error:
                message = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
                raise StoreError(
                    f"{path}: corrupt index file ({message}) — run `dsarag index rebuild --store {self.folder}`"
                ) from error
        else:  # nothing indexed yet (a first ingest still running or killed): exact search over what is there
            index, _ = build_index(
                np.zeros((0, manifest.dim), dtype=np.float32), np.zeros(0, np.int64), "Flat"
            )
        for shard in manifest.pending_shards:
            table = self.read_shard(shard.name, ["chunk_id", "embedding"])
            add_vectors(index, embeddings_of(table), table.column("chunk_id").to_numpy())
        if index.ntotal != manifest.n_chunks + len(manifest.tombstones):
            raise StoreError(
                f"{self.folder / manifest.index_file}: index holds {index.ntotal} vectors but the store has "
                f"{manifest.n_chunks} chunks and {len(manifest.tombstones)} tombstones — "
                f"run `dsarag index rebuild --store {self.folder}`"
            )
        return index

    def write_manifest(self, manifest: Manifest) -> None:
        data = manifest.to_json()
        atomic_write_json(self.manifest_path, data | {MANIFEST_CHECKSUM_KEY: manifest_checksum(data)})

    def commit_batch(
        self, manifest: Manifest, new_chunks: pa.Table | None, drop_sources: set[str]
    ) -> Manifest:
        """Publish one ingest batch: drop every chunk of `drop_sources`, append `new_chunks` as a new shard.

        Shards that lose chunks are rewritten without them. Dropped chunks that the index file holds become
        tombstones; the next index update removes them where FAISS can (rag/store_index.py)."""
        generation = manifest.generation + 1
        shards: list[ShardRecord] = []
        obsolete: list[str] = []
        written: list[str] = []
        for shard in manifest.shards:
            dropped = None
            if drop_sources:
                sources = self.read_shard(shard.name, ["source"]).column("source")
                dropped = pc.is_in(sources, value_set=pa.array(sorted(drop_sources), pa.string()))
            if dropped is None or not pc.any(dropped).as_py():
                shards.append(shard)
                continue
            table = self.read_shard(shard.name)
            kept = table.filter(pc.invert(dropped))
            if shard.indexed:
                manifest.tombstones.extend(table.filter(dropped).column("chunk_id").to_pylist())
            obsolete.append(shard.name)
            if kept.num_rows:
                name = f"chunks-{generation:06d}-{len(written) + 1}.parquet"
                self._write_shard(name, kept)
                written.append(name)
                shards.append(ShardRecord(name, kept.num_rows, shard.indexed))
        if new_chunks is not None and new_chunks.num_rows:
            name = f"chunks-{generation:06d}.parquet"
            self._write_shard(name, new_chunks)
            written.append(name)
            shards.append(ShardRecord(name, new_chunks.num_rows, indexed=False))
        manifest.shards = shards
        for name in written:
            manifest.checksums[name] = _checksum(self.folder / name)
        return self._publish(manifest, generation, obsolete)

    def commit_index(
        self, manifest: Manifest, index: faiss.Index, factory: str, tombstones: list[int]
    ) -> Manifest:
        """Publish `index`, which covers every shard of `manifest` (minus `tombstones` still inside it)."""
        generation = manifest.generation + 1
        name = f"index-{generation:06d}.faiss"
        atomic_write(self.folder / name, lambda tmp: faiss.write_index(index, str(tmp)))
        manifest.checksums[name] = _checksum(self.folder / name)
        obsolete = [manifest.index_file] if manifest.index_file else []
        manifest.index_file, manifest.index_factory, manifest.tombstones = name, factory, list(tombstones)
        for shard in manifest.shards:
            shard.indexed = True
        return self._publish(manifest, generation, obsolete)

    def _write_shard(self, name: str, table: pa.Table) -> None:
        atomic_write(
            self.folder / name,
            lambda tmp: pq.write_table(table, tmp, compression="zstd", write_page_checksum=True),
        )

    def _publish(self, manifest: Manifest, generation: int, obsolete: list[str]) -> Manifest:
        manifest.generation = generation
        manifest.n_chunks = sum(shard.rows for shard in manifest.shards)
        live = {shard.name for shard in manifest.shards} | ({manifest.index_file} - {""})
        manifest.checksums = {name: value for name, value in manifest.checksums.items() if name in live}
        self.write_manifest(manifest)
        for name in obsolete:
            (self.folder / name).unlink(missing_ok=True)
        return manifest

    @staticmethod
    def is_data_file(name: str) -> bool:
        """A shard, index or temp file: what a writer creates (other files in the folder are left alone)."""
        return bool(_DATA_FILE.fullmatch(name))

    def remove_leftovers(self, manifest: Manifest | None) -> list[str]:
        """Delete data and temp files no manifest names: what a killed writer left behind."""
        live = set(manifest.checksums) if manifest else set()
        removed = []
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                if _DATA_FILE.fullmatch(path.name) and path.name not in live:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return sorted(removed)

    def file_sizes(self, manifest: Manifest) -> dict[str, int]:
        return {name: (self.folder / name).stat().st_size for name in sorted(manifest.checksums)}


def manifest_checksum(data: dict) -> str:
    """sha256 of the manifest's content in a canonical form (sorted keys, no whitespace)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _checksum(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def embeddings_of(chunks: pa.Table) -> np.ndarray:
    """The embedding column as a contiguous (n, dim) float32 array."""
    column = chunks.column("embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, column.type.list_size), dtype=np.float32)
    return (
        column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1).astype(np.float32, copy=False)
    )
