"""The store's write lock: one writer (ingest, index rebuild, doctor --repair) at a time; readers never lock.

A lock file in the store folder is held with `flock` for the writer's lifetime and names its holder (pid,
command, start time). The kernel drops the lock when the holder dies, even by SIGKILL, so a crashed writer
never leaves the store locked. The file is removed on release; a waiter that then wins the lock on the
removed file notices (its inode is gone from the path) and locks the new one instead.
"""

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from dsarag.base.errors import EXIT_LOCKED, DsaragError, StoreError

LOCK_NAME = ".dsarag.lock"
DEFAULT_LOCK_TIMEOUT_S = 60.0
_POLL_S = 0.05


class StoreLockedError(DsaragError):
    exit_code = EXIT_LOCKED


def lock_path(store_folder: Path) -> Path:
    return Path(store_folder) / LOCK_NAME


def lock_holder(store_folder: Path) -> dict | None:
    """Who holds the store's lock ({pid, command, since}), or None when nobody does."""
    path = lock_path(store_folder)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # a file left without a holder: nobody is writing
    finally:
        os.close(fd)


@contextmanager
def store_write_lock(
    store_folder: Path, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, command: str | None = None
) -> Iterator[None]:
    """Hold the store's write lock; wait up to `timeout_s` seconds, then raise StoreLockedError naming the
    holder. The store folder is created if needed."""
    folder = Path(store_folder)
    created = not folder.exists()
    fd = _acquire(lock_path(folder), timeout_s, folder)
    try:
        holder = {
            "pid": os.getpid(),
            "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        lock_path(folder).unlink(missing_ok=True)  # still held: nobody can lock this inode in between
        os.close(fd)  # releases the flock
        if created:
            _remove_if_empty(folder)  # a writer that committed nothing leaves no empty store behind


def _acquire(path: Path, timeout_s: float, folder: Path) -> int:
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StoreError(
                f"{folder}: cannot create the store's lock file ({error.strerror}) — pass a writable --store folder",
                folder,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise StoreLockedError(_busy_message(folder, path, timeout_s), folder) from None
            time.sleep(_POLL_S)
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the previous holder removed this file on release: lock the current one


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _read_holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _busy_message(folder: Path, path: Path, timeout_s: float) -> str:
    holder = _read_holder(path) or {}
    who = f"pid {holder.get('pid', '?')} ({holder.get('command', 'unknown command')}, since {holder.get('since', '?')})"
    return (
        f"{folder}: store is locked by another writer, {who}; waited {timeout_s:g} s — let it finish, or pass "
        f"a longer --lock-timeout (a crashed writer releases the lock by itself)"
    )
