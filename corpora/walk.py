"""Find the readable document files under a folder, and say why every other file was left out.

Never leaves the folder: a symbolic link is followed only when asked, and only if it resolves to something
inside the folder. Hidden files and folders, dependency and cache folders are passed over silently; any
other file that is not taken is reported in `skipped` with a reason the user can act on.
"""

import codecs
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dsarag.base.errors import MissingInputError
from dsarag.corpora.readers import UTF16_BOMS, kind_of

# Folders that hold tooling, not documents (hidden ones like .git and .venv are skipped by their dot).
SKIPPED_FOLDER_NAMES = frozenset({"node_modules", "__pycache__", "site-packages", "bower_components"})
SNIFF_BYTES = 8192
MAX_FILE_BYTES = 20_000_000  # a document larger than this is skipped with a reason (`ingest --max-file-mb`)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class WalkResult:
    files: list[Path] = field(default_factory=list)  # sorted
    skipped: list[SkippedFile] = field(default_factory=list)


def walk_folder(
    root: Path, follow_symlinks: bool = False, max_file_bytes: int = MAX_FILE_BYTES
) -> WalkResult:
    """The document files under `root` (or `root` itself if it is a file), sorted, plus what was skipped."""
    root = Path(root).expanduser()
    if not root.exists():
        raise MissingInputError(f"{root}: folder not found — pass an existing folder or file to ingest", root)
    result = WalkResult()
    if not root.is_dir():
        reason = _reason_to_skip(root, max_file_bytes)
        if reason:
            result.skipped.append(SkippedFile(root, reason))
        else:
            result.files.append(root)
        return result

    real_root = root.resolve()
    visited_folders = {real_root}
    found: dict[Path, tuple[bool, Path]] = {}  # real path -> (reached through a link, path as walked)
    folders = [root]
    linked_folders: list[tuple[Path, Path]] = []  # walked last, so real paths win over link paths
    while folders or linked_folders:
        if folders:
            folder, via_link = folders.pop(), False
        else:
            (folder, real_folder), via_link = linked_folders.pop(), True
            if real_folder in visited_folders:
                continue  # the same folder through another way in, or a link loop
            visited_folders.add(real_folder)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            result.skipped.append(
                SkippedFile(Path(folder), f"cannot list folder ({error.strerror}) — check permissions")
            )
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                if not follow_symlinks:
                    result.skipped.append(SkippedFile(path, "symbolic link — not followed"))
                    continue
                real, reason = _link_target_inside(path, real_root)
                if reason:
                    result.skipped.append(SkippedFile(path, reason))
                elif real.is_dir():
                    linked_folders.append((path, real))
                else:
                    found.setdefault(real, (True, path))
                continue
            if entry.is_dir(follow_symlinks=False):
                if not _is_tooling_folder(path):
                    if not via_link:
                        visited_folders.add(path.resolve())
                    folders.append(path)
                continue
            real = path.resolve() if follow_symlinks else path  # resolving is only needed to drop duplicates
            if real not in found or found[real][0]:
                found[real] = (via_link, path)

    for _via_link, path in found.values():
        reason = _reason_to_skip(path, max_file_bytes)
        if reason:
            result.skipped.append(SkippedFile(path, reason))
        else:
            result.files.append(path)
    result.files.sort()
    result.skipped.sort(key=lambda item: item.path)
    return result


def _is_tooling_folder(path: Path) -> bool:
    return path.name in SKIPPED_FOLDER_NAMES or (path / "pyvenv.cfg").exists()  # a virtualenv by any name


def _link_target_inside(link: Path, real_root: Path) -> tuple[Path, str]:
    """(real target, "") for a link that stays inside the folder; otherwise (link, reason not to follow)."""
    try:
        real = link.resolve(strict=True)
    except FileNotFoundError:
        return link, "broken symbolic link — its target does not exist"
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        return link, "symbolic link loop — not followed"
    if not real.is_relative_to(real_root):
        return link, f"symbolic link to {real}, outside the folder — never followed"
    inside = real.relative_to(real_root).parts
    if any(part.startswith(".") or part in SKIPPED_FOLDER_NAMES for part in inside):
        return link, "symbolic link into a hidden or tooling folder — not followed"
    return real, ""


def _reason_to_skip(path: Path, max_file_bytes: int) -> str:
    """Why `path` is not a readable document, or "" if it is one."""
    try:
        info = path.stat()
    except OSError as error:
        return f"cannot read ({error.strerror}) — check permissions"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (device, pipe or socket)"
    if info.st_size > max_file_bytes:
        return (
            f"{info.st_size / 1e6:.1f} MB is over the {max_file_bytes / 1e6:g} MB size cap — "
            "split the file or raise the cap (`dsarag ingest --max-file-mb`)"
        )
    kind = kind_of(path)
    if kind == "unsupported":
        return f"unsupported file type {path.suffix} — export it to PDF or text to include it"
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as error:
        return f"cannot read ({error.strerror}) — check permissions"
    if kind == "pdf":
        return "" if b"%PDF-" in head[:1024] else "not a PDF (no %PDF header) — rename it or remove it"
    if head.startswith(UTF16_BOMS):
        return ""  # UTF-16 text: NUL bytes are expected, the reader decodes it
    if b"\0" in head:
        return "binary file (NUL bytes in its first 8 KB)"
    if kind is None and not _is_utf8_start(head):
        return f"unknown file type {path.suffix or '(no extension)'} and not UTF-8 text"
    return ""


def _is_utf8_start(head: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut multi-byte char is fine
    except UnicodeDecodeError:
        return False
    return True
