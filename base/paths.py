"""Where dsarag keeps its files: models and compiled kernels in the cache, stores and ledgers in the data home."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$DSARAG_CACHE`, else `$XDG_CACHE_HOME/dsarag`, else `~/.cache/dsarag`."""
    if os.environ.get("DSARAG_CACHE"):
        return Path(os.environ["DSARAG_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "dsarag"
    return Path.home() / ".cache" / "dsarag"


def data_home() -> Path:
    """`$DSARAG_HOME`, else `$XDG_DATA_HOME/dsarag`, else `~/.local/share/dsarag`."""
    if os.environ.get("DSARAG_HOME"):
        return Path(os.environ["DSARAG_HOME"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "dsarag"
