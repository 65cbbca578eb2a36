"""Where stores live. A folder's default store sits in the user data dir, keyed by the folder's path,
so `dsarag ingest DIR` and `dsarag ask --docs DIR` find the same store without writing into DIR."""

import hashlib
import os
from pathlib import Path


def data_home() -> Path:
    """`$DSARAG_HOME`, else `$XDG_DATA_HOME/dsarag`, else `~/.local/share/dsarag`."""
    if os.environ.get("DSARAG_HOME"):
        return Path(os.environ["DSARAG_HOME"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "dsarag"


def default_store_for(docs: Path) -> Path:
    resolved = Path(docs).expanduser().resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return data_home() / "stores" / f"{resolved.name or 'root'}-{key}"


def resolve_store(store: Path | None, docs: Path | None) -> Path:
    """The explicit `--store`, else the default store of `--docs`."""
    if store is not None:
        return Path(store).expanduser()
    if docs is None:
        from rag.errors import BadInputError

        raise BadInputError("no store given — pass --store PATH or --docs DIR")
    return default_store_for(docs)
