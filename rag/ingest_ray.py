"""`dsarag ingest --engine ray`: the same read → chunk → embed pipeline on Ray Data.

Each source (a document, or a corpus file from its resume point) becomes one row of a Ray dataset. A pool of
CPU actors reads and chunks it, yielding one result per block of records; a pool of embedding actors (one
GPU each when the cluster has GPUs) embeds them. Order is preserved, so the driver commits the results in
batches exactly as the local engine does: same shards, same manifest progress, same resumability. The driver
then updates the index from the shards. Workers read the sources by path: on a cluster the input files and
the store must be on a filesystem every node sees.
"""

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from dsarag.base.errors import BadInputError
from dsarag.rag.embed import Embedder
from dsarag.rag.index import merge_into
from dsarag.rag.ingest import (
    IngestOptions,
    Source,
    SourceEnd,
    WorkResult,
    block_records,
    chunk_work_item,
    default_workers,
    init_worker,
    work_items,
)
from dsarag.rag.store import ChunkStore
from dsarag.rag.store_index import add_shards


class _ReadAndChunk:
    """Ray actor: reads one source and yields its chunked blocks (pickled), in order."""

    def __init__(self, tokenizer_json: Path, embedding_model: str, options: IngestOptions) -> None:
        init_worker(tokenizer_json, embedding_model)
        self.options = options

    def __call__(self, batch: dict) -> Iterator[dict]:
        for blob in batch["source"]:
            source, sha, start = pickle.loads(blob)
            items = work_items(
                [(source, sha)], {source.key: start}, self.options.columns, block_records(self.options)
            )
            for item in items:
                result = item if isinstance(item, SourceEnd) else chunk_work_item(item)
                yield {"result": [pickle.dumps(result)]}


class _Embed:
    """Ray actor: embeds the rows of each result on the actor's device (its GPU when it has one)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.embedder = Embedder(folder, name)

    def __call__(self, batch: dict) -> dict:
        out = []
        for blob in batch["result"]:
            result = pickle.loads(blob)
            if isinstance(result, WorkResult) and result.rows:
                texts = [row["text"] for row in result.rows]
                result.vectors = self.embedder.encode(texts, batch_size=256 if self.embedder.on_gpu else 64)
            out.append(pickle.dumps(result))
        return {"result": out}


def run_ray_pipeline(
    to_read: list[tuple[Source, str]], resume_from: dict[str, int], embedder: Embedder, options: IngestOptions
) -> Iterator[WorkResult | SourceEnd]:
    """Results of the Ray pipeline in source order, embeddings attached."""
    try:
        import ray
    except ImportError:
        raise BadInputError(
            "--engine ray needs Ray Data — install it with `pip install 'dsarag[ray]'`, or use --engine local"
        ) from None
    if not to_read:
        return
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the manifest records progress in source order
    context.enable_progress_bars = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    sources = [
        {"source": pickle.dumps((source, sha, resume_from.get(source.key, 0)))} for source, sha in to_read
    ]
    dataset = (
        ray.data.from_items(sources, override_num_blocks=len(sources))
        .map_batches(
            _ReadAndChunk,
            fn_constructor_args=(embedder.tokenizer_json, embedder.name, options),
            batch_size=1,
            concurrency=options.workers or default_workers(),
        )
        .map_batches(
            _Embed,
            fn_constructor_args=(embedder.folder, embedder.name),
            batch_size=4,
            concurrency=max(1, gpus),
            num_gpus=1 if gpus else 0,
        )
    )
    for row in dataset.iter_rows():
        yield pickle.loads(row["result"])


def _add_shard_remote(index_bytes: np.ndarray, store_folder: str, shard_name: str) -> np.ndarray:
    """Ray task: the trained, empty index with one shard's vectors added, serialized."""
    index = add_shards(ChunkStore(Path(store_folder)), faiss.deserialize_index(index_bytes), [shard_name])
    return faiss.serialize_index(index)


def fill_on_ray(store: ChunkStore, index: faiss.Index, shard_names: list[str]) -> faiss.Index:
    """IVF indexes: Ray tasks add the shards to copies of the trained index (one task per shard, on the
    cluster's CPUs) and the driver merges their inverted lists. Other indexes (Flat below the IVF threshold,
    HNSW graphs, which cannot be merged) are filled here, one shard at a time."""
    import ray

    if faiss.try_extract_index_ivf(index) is None or len(shard_names) < 2:
        return add_shards(store, index, shard_names)
    trained = ray.put(faiss.serialize_index(index))
    task = ray.remote(_add_shard_remote)
    parts = [task.remote(trained, str(store.folder), name) for name in shard_names]
    # FAISS merges inverted lists only without an id -> list map: drop it, merge, and build it again.
    map_type = faiss.extract_index_ivf(index).direct_map.type
    faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.NoMap)
    for part in parts:  # in shard order, so the lists come out as a local build orders them
        shard_index = faiss.deserialize_index(ray.get(part))
        faiss.extract_index_ivf(shard_index).set_direct_map_type(faiss.DirectMap.NoMap)
        merge_into(index, shard_index)
    faiss.extract_index_ivf(index).set_direct_map_type(map_type)
    return index
