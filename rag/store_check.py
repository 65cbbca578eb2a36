"""A full consistency check of one store, finding every problem rather than stopping at the first.

Used by `dsarag doctor` (rag/doctor.py) and the crash harness (rag/crash_harness.py): the manifest parses and
matches its own checksum; every shard and the index match their size + sha256 and can be read; no chunk id
appears twice; shard rows, per-source counts and the manifest's total agree; the index holds exactly the live
ids (plus tombstones). Files no manifest names and unfinished work are notes, not problems: a killed writer
leaves them and the next one clears them.
"""

from collections import Counter
from dataclasses import dataclass, field

import faiss
import pyarrow as pa
import pyarrow.compute as pc

from dsarag.base.errors import StoreError
from dsarag.rag.store import ChunkStore, Manifest


@dataclass
class StoreProblem:
    part: str  # "manifest", "shard", "index", "chunks", "embedder"
    file: str
    message: str


@dataclass
class StoreHealth:
    store: str
    manifest: Manifest | None = None
    problems: list[StoreProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged_shards: list[str] = field(default_factory=list)
    index_ok: bool = False
    live_ids: set[int] = field(default_factory=set)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        manifest = self.manifest
        return {
            "store": self.store,
            "ok": self.ok,
            "generation": manifest.generation if manifest else None,
            "chunks": manifest.n_chunks if manifest else None,
            "embedding_model": manifest.embedding_model if manifest else None,
            "problems": [vars(problem) for problem in self.problems],
            "notes": self.notes,
            "damaged_shards": self.damaged_shards,
            "index_ok": self.index_ok,
            "leftovers": self.leftovers,
        }


def check_store(
    store: ChunkStore, embedder_name: str | None = None, embedder_dim: int | None = None
) -> StoreHealth:
    """Every problem of the store's last commit (reads only; safe while a writer runs)."""
    health = StoreHealth(str(store.folder))
    try:
        manifest = store.parse_manifest()
    except StoreError as error:
        health.problems.append(StoreProblem("manifest", store.manifest_path.name, str(error)))
        return health
    health.manifest = manifest
    if embedder_name is not None and (manifest.embedding_model, manifest.dim) != (
        embedder_name,
        embedder_dim,
    ):
        health.problems.append(
            StoreProblem(
                "embedder",
                store.manifest_path.name,
                f"built with embedder {manifest.embedding_model!r} (dim {manifest.dim}), not {embedder_name!r} "
                f"(dim {embedder_dim}) — ingest into a new --store",
            )
        )
    chunks = _check_shards(store, manifest, health)
    if chunks is not None:
        _check_counts(manifest, chunks, health)
    _check_index(store, manifest, health)
    health.leftovers = sorted(
        path.name
        for path in store.folder.iterdir()
        if path.name not in manifest.checksums and store.is_data_file(path.name)
    )
    if health.leftovers:
        health.notes.append(
            f"{len(health.leftovers)} file(s) left by an interrupted writer (removed by the next)"
        )
    unfinished = sorted(key for key, record in manifest.files.items() if not record.complete)
    if unfinished:
        health.notes.append(
            f"partly ingested (a run was interrupted; ingest again to resume): {unfinished[0]}"
        )
    if manifest.pending_shards:
        health.notes.append(
            f"{len(manifest.pending_shards)} shard(s) not in the index file yet (searched anyway)"
        )
    return health


def _check_shards(store: ChunkStore, manifest: Manifest, health: StoreHealth) -> pa.Table | None:
    """The chunk_id and source columns of every intact shard (None if a shard is damaged)."""
    tables = []
    for shard in manifest.shards:
        problem = None
        if not store.file_intact(shard.name, manifest):
            problem = "missing or damaged (size or sha256 differ from the manifest)"
        else:
            try:
                table = store.read_shard(shard.name, ["chunk_id", "source"])
                if table.num_rows != shard.rows:
                    problem = f"{table.num_rows} rows, the manifest says {shard.rows}"
                tables.append(table)
            except StoreError as error:
                problem = str(error)
        if problem:
            health.damaged_shards.append(shard.name)
            health.problems.append(StoreProblem("shard", shard.name, problem))
    if health.damaged_shards:
        return None
    if not tables:
        return pa.table({"chunk_id": pa.array([], pa.int64()), "source": pa.array([], pa.string())})
    return pa.concat_tables(tables)


def _check_counts(manifest: Manifest, chunks: pa.Table, health: StoreHealth) -> None:
    ids = chunks.column("chunk_id").to_pylist()
    health.live_ids = set(ids)
    duplicates = [chunk_id for chunk_id, count in Counter(ids).items() if count > 1]
    if duplicates:
        health.problems.append(
            StoreProblem("chunks", "", f"{len(duplicates)} chunk id(s) stored twice, e.g. {duplicates[0]}")
        )
    if len(ids) != manifest.n_chunks:
        health.problems.append(
            StoreProblem(
                "chunks", "", f"shards hold {len(ids)} chunks, the manifest says {manifest.n_chunks}"
            )
        )
    per_source = Counter(dict(zip(*_value_counts(chunks.column("source")), strict=True)))
    for key, record in sorted(manifest.files.items()):
        if per_source.get(key, 0) != record.n_chunks:
            health.problems.append(
                StoreProblem(
                    "chunks",
                    key,
                    f"{per_source.get(key, 0)} chunks stored, the manifest says {record.n_chunks}",
                )
            )
    unknown = sorted(set(per_source) - set(manifest.files))
    if unknown:
        health.problems.append(
            StoreProblem("chunks", unknown[0], "chunks of a source the manifest does not list")
        )


def _value_counts(column: pa.ChunkedArray) -> tuple[list, list]:
    counts = pc.value_counts(column.combine_chunks() if column.num_chunks else pa.array([], pa.string()))
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def _check_index(store: ChunkStore, manifest: Manifest, health: StoreHealth) -> None:
    if manifest.index_file and not store.file_intact(manifest.index_file, manifest):
        health.problems.append(
            StoreProblem(
                "index", manifest.index_file, "missing or damaged (size or sha256 differ from the manifest)"
            )
        )
        return
    if health.damaged_shards:
        return  # the index cannot be checked against shards that cannot be read
    try:
        index = store.read_index(manifest)
    except StoreError as error:
        health.problems.append(StoreProblem("index", manifest.index_file, str(error)))
        return
    id_map = getattr(index, "id_map", None)
    if id_map is not None and health.live_ids:
        indexed = set(faiss.vector_to_array(id_map).tolist())
        if indexed != health.live_ids | set(manifest.tombstones):
            health.problems.append(
                StoreProblem(
                    "index", manifest.index_file, "the index's ids differ from the stored chunks' ids"
                )
            )
            return
    health.index_ok = True
