"""Where stores live. A folder's default store sits in the user data dir, keyed by the folder's path,
so `dsarag ingest DIR` and `dsarag ask --docs DIR` find the same store without writing into DIR."""

import hashlib
from pathlib import Path

from dsarag.base.paths import data_home


def default_store_for(docs: Path) -> Path:
    resolved = Path(docs).expanduser().resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return data_home() / "stores" / f"{resolved.name or 'root'}-{key}"


def resolve_store(store: Path | None, docs: Path | None) -> Path:
    """The explicit `--store`, else the default store of `--docs`."""
    if store is not None:
        return Path(store).expanduser()
    if docs is None:
        from dsarag.base.errors import BadInputError

        raise BadInputError("no store given — pass --store PATH or --docs DIR")
    return default_store_for(docs)
