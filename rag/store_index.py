"""Keeping a store's FAISS index in step with its shards: incremental update, full rebuild, info.

An update adds the shards committed since the index was written and removes tombstoned ids where FAISS can
(Flat, IVF). It rebuilds instead when the factory chosen by size changes (Flat below 50K chunks, HNSW32
below 2M, OPQ+IVF+PQ above), when HNSW tombstones pass `TOMBSTONE_REBUILD_FRACTION`, or when an id comes
back that is still a tombstone in the graph. A rebuild trains on a sample drawn across shards and adds the
shards one at a time, so memory holds one shard of embeddings besides the index itself.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from dsarag.rag.index import (
    TOMBSTONE_REBUILD_FRACTION,
    add_vectors,
    can_remove,
    choose_factory,
    index_params,
    new_index,
    normalize_factory,
    remove_ids,
    train,
    training_sample_size,
)
from dsarag.rag.lock import DEFAULT_LOCK_TIMEOUT_S, store_write_lock
from dsarag.rag.store import ChunkStore, Manifest, embeddings_of

# Adds a store's shards (names) to a trained, empty index and returns the filled index.
ShardFiller = Callable[[ChunkStore, faiss.Index, list[str]], faiss.Index]


@dataclass
class IndexUpdate:
    factory: str
    action: str  # "unchanged", "updated" or "rebuilt"
    ntotal: int
    tombstones: int
    seconds: float


def target_factory(manifest: Manifest, factory: str | None = None) -> str:
    return normalize_factory(
        factory or manifest.index_override or choose_factory(manifest.n_chunks, manifest.dim)
    )


def update_index(
    store: ChunkStore,
    manifest: Manifest,
    factory: str | None = None,
    rebuild: bool = False,
    fill: ShardFiller | None = None,
) -> IndexUpdate:
    """Bring the index file up to date with the manifest's shards and commit it; return what was done.
    A rebuild adds the shards with `fill` (default: one after another, here)."""
    started = time.perf_counter()
    if factory:
        manifest.index_override = normalize_factory(factory)
    target = target_factory(manifest)
    pending_ids = {
        int(chunk_id)
        for shard in manifest.pending_shards
        for chunk_id in store.read_shard(shard.name, ["chunk_id"]).column("chunk_id").to_pylist()
    }
    tombstones = set(manifest.tombstones)
    if not rebuild and manifest.index_file and target == manifest.index_factory:
        if not pending_ids and not tombstones:
            return IndexUpdate(target, "unchanged", manifest.n_chunks, 0, time.perf_counter() - started)
        index = faiss.read_index(str(store.folder / manifest.index_file))
        if can_remove(index):
            remove_ids(index, tombstones)
            tombstones = set()
        too_many = len(tombstones) > TOMBSTONE_REBUILD_FRACTION * max(1, index.ntotal)
        rebuild = too_many or bool(tombstones & pending_ids)
        if not rebuild:
            add_shards(store, index, [shard.name for shard in manifest.pending_shards])
    else:
        rebuild = True
    if rebuild:
        index, tombstones = _build_from_shards(store, manifest, target, fill or add_shards), set()
    store.commit_index(manifest, index, target, sorted(tombstones))
    return IndexUpdate(
        target,
        "rebuilt" if rebuild else "updated",
        int(index.ntotal),
        len(tombstones),
        time.perf_counter() - started,
    )


def update_store_index(
    store: ChunkStore,
    factory: str | None = None,
    rebuild: bool = False,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> IndexUpdate:
    """`update_index` on the store's current commit, holding its write lock (`dsarag index build|rebuild`)."""
    with store_write_lock(store.folder, lock_timeout_s):
        return update_index(store, store.read_manifest(check_index=False), factory, rebuild=rebuild)


def _build_from_shards(store: ChunkStore, manifest: Manifest, factory: str, fill: ShardFiller) -> faiss.Index:
    index = new_index(manifest.dim, factory)
    if not index.is_trained:
        train(index, _training_sample(store, manifest, training_sample_size(index, manifest.n_chunks)))
    return fill(store, index, [shard.name for shard in manifest.shards])


def add_shards(store: ChunkStore, index: faiss.Index, shard_names: list[str]) -> faiss.Index:
    """Add the shards one at a time, so memory holds one shard of embeddings besides the index."""
    for name in shard_names:
        table = store.read_shard(name, ["chunk_id", "embedding"])
        add_vectors(index, embeddings_of(table), table.column("chunk_id").to_numpy())
    return index


def _training_sample(store: ChunkStore, manifest: Manifest, size: int) -> np.ndarray:
    """`size` embeddings drawn uniformly from all shards (fixed seed), read one shard at a time."""
    rows = np.sort(np.random.default_rng(0).choice(manifest.n_chunks, size=size, replace=False))
    parts, first = [], 0
    for shard in manifest.shards:
        inside = rows[(rows >= first) & (rows < first + shard.rows)] - first
        if len(inside):
            parts.append(embeddings_of(store.read_shard(shard.name, ["embedding"]).take(inside)))
        first += shard.rows
    return np.concatenate(parts) if parts else np.zeros((0, manifest.dim), dtype=np.float32)


def index_info(store: ChunkStore, manifest: Manifest) -> dict:
    """What `dsarag index info` shows: the index, its parameters, shards, tombstones and file sizes."""
    index = store.read_index(manifest)
    sizes = store.file_sizes(manifest)
    return {
        "store": str(store.folder),
        "root": manifest.root,
        "chunks": manifest.n_chunks,
        "vectors": int(index.ntotal),
        "tombstones": len(manifest.tombstones),
        "files": len(manifest.files),
        "embedding_model": manifest.embedding_model,
        "dim": manifest.dim,
        "index_factory": manifest.index_factory or "(none yet)",
        "index_factory_by_size": target_factory(manifest),
        "index_params": index_params(index),
        "index_file": manifest.index_file,
        "index_bytes": sizes.get(manifest.index_file, 0),
        "memory_mapped": bool(manifest.index_file) and not manifest.pending_shards,
        "shards": len(manifest.shards),
        "shards_pending_index": len(manifest.pending_shards),
        "shard_bytes": sum(size for name, size in sizes.items() if name != manifest.index_file),
        "generation": manifest.generation,
    }
