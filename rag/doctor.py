"""`dsarag doctor`: is this installation and this store healthy, and if not, what to do (or `--repair` it).

Checks, in order: models (present; size + mtime + ctime stamps by default, every sha256 with `full`), caches
(writable, no half-finished pulls), free disk, and a store when one is given (rag/store_check.py: manifest and
its checksum, format, every shard and the index by size + sha256, ids and counts, embedder compatibility).
Repair holds the store's write lock and only ever publishes through atomic commits: a damaged or missing index
is rebuilt from the embeddings in the shards; damaged shards are dropped from the manifest together with every
chunk of the sources they held, and those sources are ingested again from the documents folder; an unreadable
manifest is rebuilt by ingesting the documents folder (`docs`) again; files of interrupted writers go.
"""

import os
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from dsarag.base.errors import EXIT_ENVIRONMENT, EXIT_MODEL, EXIT_STORE
from dsarag.base.paths import cache_dir, data_home
from dsarag.rag.lock import DEFAULT_LOCK_TIMEOUT_S, lock_holder, store_write_lock
from dsarag.rag.store import ChunkStore
from dsarag.rag.store_check import StoreHealth, check_store

MIN_FREE_MB = 500  # below this a doctor check fails: an ingest or a model pull may run out of space
LOW_FREE_MB = 2000  # below this it warns
# The order of areas decides the exit code when several fail (documented in the README).
AREA_EXIT_CODES = {
    "models": EXIT_MODEL,
    "store": EXIT_STORE,
    "disk": EXIT_ENVIRONMENT,
    "caches": EXIT_ENVIRONMENT,
}


@dataclass
class Check:
    area: str  # models | caches | disk | store
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        for area, code in AREA_EXIT_CODES.items():
            if any(check.area == area and check.status == "fail" for check in self.checks):
                return code
        return 0

    def add(self, area: str, name: str, status: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(area, name, status, detail, fix))

    def to_json(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "checks": [asdict(check) for check in self.checks],
            "repairs": self.repairs,
        }


def run_doctor(
    store: Path | None = None,
    docs: Path | None = None,
    full: bool = False,
    repair: bool = False,
    min_free_mb: int = MIN_FREE_MB,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    console: Console | None = None,
) -> DoctorReport:
    report = DoctorReport()
    _check_models(report, full)
    _check_caches(report, repair)
    _check_cpu_kernels(report)
    _check_answerability_probes(report)
    _check_disk(report, [path for path in (store, cache_dir(), data_home()) if path is not None], min_free_mb)
    if store is not None:
        chunk_store = ChunkStore(store)
        health = _check_store(report, chunk_store)
        if repair and health is not None and (health.problems or health.leftovers):
            with store_write_lock(chunk_store.folder, lock_timeout_s, command="dsarag doctor --repair"):
                report.repairs += repair_store(chunk_store, docs, console)
            report.checks = [check for check in report.checks if check.area != "store"]
            _check_store(report, chunk_store)
    return report


# ---- models


def _check_models(report: DoctorReport, full: bool) -> None:
    from dsarag.indexer_model.provision import DEFAULT_GENERATOR, EMBEDDER, list_models, verify

    statuses = {status.name: status for status in list_models()}
    needed = {EMBEDDER: "fail", DEFAULT_GENERATOR: "warn"}  # the tiny model and converted GGUFs are optional
    for name, status in statuses.items():
        if status.state == "not pulled":
            level = needed.get(name, "ok")
            detail = "not pulled" + ("" if level != "ok" else " (optional)")
            report.add("models", name, level, detail, f"dsarag models pull {name}" if level != "ok" else "")
            continue
        if full or status.state == "changed":  # changed stamps: rehash now, as the next use would
            (result,) = verify([name]) if name in _registry_names() else [_verify_converted(status.path)]
            if not result.ok:
                fix = f"dsarag models pull {name}" if name in _registry_names() else "convert the GGUF again"
                report.add("models", name, "fail", "; ".join(result.problems[:2]), fix)
                continue
            detail = f"sha256 of {result.files_checked} files verified"
        else:
            detail = "present, stamps match the verified files (--full rehashes)"
        report.add("models", name, "ok", f"{detail} — {status.size_bytes / 1e6:,.0f} MB")


def _check_cpu_kernels(report: DoctorReport) -> None:
    """DSA on the CPU is fast only through the compiled kernels; without a compiler it still works, slower."""
    from dsarag.indexer_model.attention_policy import sparse_faster_range
    from dsarag.indexer_model.weights import default_dtype
    from dsarag.kernels.backend import resolve_backend

    backend = resolve_backend("cpu", default_dtype("cpu"))
    if backend.name == "torch":
        report.add(
            "caches",
            "cpu-dsa-kernels",
            "warn",
            "the compiled CPU kernels cannot be built (no C++ compiler, or its build failed: see the warning above);"
            " sparse attention on the CPU runs its slower PyTorch path, --attention auto stays dense",
            "install g++ with OpenMP (apt install g++), or point $CXX at a C++ compiler",
        )
        return
    flavour = {"cpu-amx": "bf16 on AMX", "cpu-bf16": "bf16 on AVX512-BF16"}.get(backend.name, "float32")
    if backend.int8_decode:
        flavour += (
            ", and decode steps' weight products on int8 copies (DSARAG_DECODE_WEIGHTS=model: the model's)"
        )
    elif backend.name != "cpu-fp32":
        flavour += ", and bf16 decode steps' weight products"
    where = sparse_faster_range(backend.name)
    auto = (
        f"--attention auto runs DSA from {where[0]:,} tokens with k up to {where[1]:.1%} of the prompt"
        if where
        else "--attention auto stays dense (DSA measured slower on such CPUs)"
    )
    report.add(
        "caches",
        "cpu-dsa-kernels",
        "ok",
        f"compiled CPU kernels for sparse attention build and load (backend {backend.name}: {flavour}); {auto}",
    )


def _check_answerability_probes(report: DoctorReport) -> None:
    """Each shipped or trained answerability probe loads: a broken one would stop every `ask` of its model."""
    from dsarag.base.errors import ModelError
    from dsarag.indexer_model.checkpoint import checkpoint_folders
    from dsarag.rag.answerability import PROBE_FILE, find_probe

    for folder in checkpoint_folders():
        try:
            probe = find_probe(folder)
        except ModelError as error:
            fix = (
                f"delete {folder / PROBE_FILE} (ask --no-abstain also skips it), or refit it: "
                "python -m dsarag.evals.answerability_fit"
            )
            report.add("models", f"answerability probe {folder.name}", "fail", str(error), fix)
            continue
        if probe is not None:
            layers = ", ".join(map(str, probe.layers))
            detail = f"layers {layers}, declines below {probe.threshold:.2f}; ask --no-abstain turns it off"
            report.add("models", f"answerability probe {folder.name}", "ok", detail)


def _registry_names() -> set[str]:
    from dsarag.indexer_model.provision import REGISTRY

    return {model.name for model in REGISTRY}


def _verify_converted(path: Path):  # noqa: ANN202 - a VerifyResult
    from dsarag.indexer_model.provision import verify

    return next(result for result in verify() if result.path == path)


# ---- caches and disk


def _check_caches(report: DoctorReport, repair: bool) -> None:
    for name, folder in (("model cache", cache_dir()), ("data home", data_home())):
        existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
        if existing is None or not os.access(existing, os.W_OK):
            report.add(
                "caches", name, "fail", f"{folder} cannot be written", f"check the permissions of {existing}"
            )
        else:
            report.add("caches", name, "ok", str(folder))
    stale = sorted(
        path
        for sub in ("models", "converted")
        if (cache_dir() / sub).is_dir()
        for path in (cache_dir() / sub).iterdir()
        if path.name.startswith((".pull-", ".convert-"))
    )
    if stale and repair:
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        report.repairs.append(f"removed {len(stale)} half-finished model download(s) from {cache_dir()}")
    elif stale:
        report.add(
            "caches",
            "interrupted pulls",
            "warn",
            f"{len(stale)} left, e.g. {stale[0]}",
            "dsarag doctor --repair",
        )


def _check_disk(report: DoctorReport, paths: list[Path], min_free_mb: int) -> None:
    seen: set[int] = set()
    for path in paths:
        existing = next((parent for parent in (path, *path.parents) if parent.exists()), None)
        if existing is None or os.stat(existing).st_dev in seen:
            continue
        seen.add(os.stat(existing).st_dev)
        free_mb = shutil.disk_usage(existing).free / 1e6
        status = "fail" if free_mb < min_free_mb else "warn" if free_mb < LOW_FREE_MB else "ok"
        fix = "" if status == "ok" else f"free space on the disk of {existing}"
        report.add(
            "disk", f"free at {existing}", status, f"{free_mb:,.0f} MB free (minimum {min_free_mb} MB)", fix
        )


# ---- store


def _check_store(report: DoctorReport, store: ChunkStore) -> StoreHealth | None:
    if not store.exists():
        report.add(
            "store", str(store.folder), "fail", "no store here", f"dsarag ingest DIR --store {store.folder}"
        )
        return None
    name, dim = _embedder_identity()
    health = check_store(store, name, dim)
    manifest = health.manifest
    if manifest is not None:
        report.add(
            "store",
            "manifest",
            "ok",
            f"format 2, generation {manifest.generation}, {manifest.n_chunks:,} chunks in {len(manifest.shards)} "
            f"shards, {len(manifest.files):,} sources, embedder {manifest.embedding_model}",
        )
    for problem in health.problems:
        report.add(
            "store",
            f"{problem.part} {problem.file}".strip(),
            "fail",
            problem.message,
            _store_fix(problem, store),
        )
    if manifest is not None and not any(problem.part in ("shard", "index") for problem in health.problems):
        index = manifest.index_file or "(none yet)"
        report.add(
            "store", "files", "ok", f"every shard and {index} match their size + sha256; ids and counts agree"
        )
    for note in health.notes:
        report.add("store", "note", "warn" if "interrupted writer" in note else "ok", note)
    holder = lock_holder(store.folder)
    if holder:
        report.add(
            "store",
            "lock",
            "ok",
            f"an ingest is running: pid {holder.get('pid')} since {holder.get('since')}",
        )
    return health


def _store_fix(problem, store: ChunkStore) -> str:  # noqa: ANN001 - a StoreProblem
    if problem.part == "index":
        return f"dsarag doctor --store {store.folder} --repair (rebuilds it from the stored embeddings)"
    if problem.part == "manifest":
        return f"dsarag doctor --store {store.folder} --repair --docs DIR (ingests DIR again)"
    if problem.part == "embedder":
        return "ingest into a new --store with this embedder"
    return f"dsarag doctor --store {store.folder} --repair"


def _embedder_identity() -> tuple[str | None, int | None]:
    """Name and dimension of the embedder this installation uses; (None, None) when it is not pulled."""
    from dsarag.base.errors import ModelError
    from dsarag.rag.embed import DEFAULT_EMBEDDER, load_embedder

    try:
        embedder = load_embedder()
    except ModelError:
        return None, None
    return DEFAULT_EMBEDDER, embedder.dim


def repair_store(store: ChunkStore, docs: Path | None, console: Console | None = None) -> list[str]:
    """Fix what the check found; the caller holds the write lock. Returns one line per repair made."""
    from dsarag.rag.store_index import update_index

    health = check_store(store)
    repairs: list[str] = []
    if health.manifest is None:
        return _rebuild_from_docs(store, docs, console)
    manifest = health.manifest
    affected = _affected_sources(store, health)
    columns = {
        key: manifest.files[key].columns for key in affected if key in manifest.files
    }  # before dropping
    if health.damaged_shards or affected:
        for name in health.damaged_shards:
            manifest.checksums.pop(name, None)
        manifest.shards = [shard for shard in manifest.shards if shard.name not in health.damaged_shards]
        for key in affected:
            manifest.files.pop(key, None)
        manifest = store.commit_batch(manifest, None, set(affected))
        damaged = ", ".join(health.damaged_shards) or "none"
        repairs.append(
            f"dropped damaged shard(s) {damaged} and the chunks of {len(affected)} affected source(s)"
        )
    removed = store.remove_leftovers(manifest)
    if removed:
        repairs.append(f"removed {len(removed)} file(s) of interrupted writers")
    if affected or any(problem.part == "index" for problem in health.problems):
        update = update_index(store, manifest, rebuild=True)
        repairs.append(
            f"rebuilt the index ({update.factory}, {update.ntotal:,} vectors) from the stored embeddings"
        )
    if affected:
        repairs += _reingest(store, sorted(affected), columns, console)
    return repairs


def _affected_sources(store: ChunkStore, health: StoreHealth) -> set[str]:
    """Sources whose chunks are not all intact: those with chunks in a damaged shard (fewer chunks in the intact
    shards than the manifest counts), with ids stored twice, or not listed in the manifest."""
    manifest = health.manifest
    intact = [shard.name for shard in manifest.shards if shard.name not in health.damaged_shards]
    rows = [store.read_shard(name, ["chunk_id", "source"]).to_pylist() for name in intact]
    rows = [row for table in rows for row in table]
    per_source = Counter(row["source"] for row in rows)
    twice = {chunk_id for chunk_id, n in Counter(row["chunk_id"] for row in rows).items() if n > 1}
    affected = {key for key, record in manifest.files.items() if per_source.get(key, 0) != record.n_chunks}
    affected |= {row["source"] for row in rows if row["chunk_id"] in twice}
    return affected | (set(per_source) - set(manifest.files))


def _reingest(
    store: ChunkStore, keys: list[str], columns: dict[str, dict | None], console: Console | None
) -> list[str]:
    """Ingest the sources `keys` again; `columns`: the column options each corpus file was read with."""
    from dsarag.corpora.corpus_files import CorpusColumns, corpus_kind
    from dsarag.rag.embed import load_embedder
    from dsarag.rag.ingest import IngestOptions, ingest

    root = Path(store.parse_manifest().root)
    present = [key for key in keys if (root / key).is_file()]
    gone = [key for key in keys if not (root / key).is_file()]
    # Documents re-read alike; corpus files with the columns the manifest recorded for them (one ingest per
    # set of columns); corpus files from stores older than that record, only the command to run.
    batches: dict[tuple, list[str]] = defaultdict(list)
    unknown = []
    for key in present:
        if not corpus_kind(root / key):
            batches[()].append(key)
        elif columns.get(key):
            batches[tuple(sorted(columns[key].items()))].append(key)
        else:
            unknown.append(key)
    lines = []
    for batch_columns, batch in batches.items():
        options = IngestOptions(CorpusColumns(**dict(batch_columns)), take_lock=False)
        report = ingest([root / key for key in batch], store, load_embedder(), options, console)
        lines.append(f"ingested {len(batch)} source(s) again from {root}: {report.chunks_embedded:,} chunks")
    if unknown:
        lines.append(
            f"{len(unknown)} corpus file(s) lost their chunks; ingest them again with their column options: "
            f"dsarag ingest {' '.join(str(root / key) for key in unknown)} --store {store.folder} [--text-column …]"
        )
    if gone:
        lines.append(
            f"{len(gone)} source(s) no longer exist under {root} (e.g. {gone[0]}); their chunks are gone"
        )
    return lines


def _rebuild_from_docs(store: ChunkStore, docs: Path | None, console: Console | None) -> list[str]:
    """An unreadable manifest: nothing in the folder can be trusted; ingest the documents again into it."""
    from dsarag.base.errors import BadInputError
    from dsarag.rag.embed import load_embedder
    from dsarag.rag.ingest import IngestOptions, ingest

    if docs is None:
        raise BadInputError(
            f"{store.manifest_path}: the manifest is unreadable and the store must be rebuilt from its documents "
            f"— pass them: dsarag doctor --store {store.folder} --repair --docs DIR"
        )
    store.remove_leftovers(None)
    store.manifest_path.unlink(missing_ok=True)
    report = ingest([docs], store, load_embedder(), IngestOptions(take_lock=False), console)
    return [f"the manifest was unreadable: ingested {docs} again ({report.chunks_total:,} chunks)"]
