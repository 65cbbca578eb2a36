"""User-facing errors: each carries a one-line message naming the file and the fix, and an exit code."""

from pathlib import Path

# Documented in the README ("Exit codes"); the CLI turns a DsaragError into `error: <message>` + this code.
EXIT_BAD_INPUT = 2  # bad arguments: empty question, unknown option value
EXIT_MISSING_INPUT = 3  # document folder or file missing, empty, or nothing readable in it
EXIT_STORE = 4  # store corrupt, or built with another embedder: rebuild it
EXIT_MODEL = (
    5  # model not provisioned, checksum mismatch, unsupported model; a served one unreachable or unknown
)
EXIT_PARTIAL_INGEST = 6  # ingest committed what it could, but some files failed
# 7 is `dsarag eval`'s: a metric missed its threshold (evals/run.py)
EXIT_LOCKED = 8  # another writer holds the store's lock past --lock-timeout
EXIT_ENVIRONMENT = 9  # doctor: too little free disk, or a cache/data folder that cannot be written
EXIT_SERVER = 10  # serve: the port is taken or cannot be bound; ask: the (or a served model's) server failed


class DsaragError(Exception):
    """An error the user can fix; `str(error)` is the one-line message."""

    exit_code = 1

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(message)


class BadInputError(DsaragError):
    exit_code = EXIT_BAD_INPUT


class MissingInputError(DsaragError):
    exit_code = EXIT_MISSING_INPUT


class StoreError(DsaragError):
    exit_code = EXIT_STORE


class ModelError(DsaragError):
    exit_code = EXIT_MODEL


class ServerError(DsaragError):
    exit_code = EXIT_SERVER
