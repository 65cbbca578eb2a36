"""Training and held-out text as token ids: read from a folder of text files, or from ids saved as `.npy`.

A GPU machine that gets only the model's GGUF has no tokenizer, so `dsarag indexer tokenize` writes a folder's
ids once; `train` and `eval` read the folder and the `.npy` alike.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dsarag.base.atomic import atomic_write
from dsarag.base.errors import BadInputError, MissingInputError

TEXT_SUFFIXES = {".txt", ".rst", ".md"}


def text_files(folder: Path) -> list[Path]:
    """The .txt/.rst/.md files under `folder`, in path order (the order their text is joined in)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def load_token_stream(data: Path, encode: Callable[[str], list[int]] | None = None) -> np.ndarray:
    """Token ids from a `.npy` file, or from every .txt/.rst/.md file under a folder (sorted, blank-line joined)."""
    if not data.exists():
        raise MissingInputError(
            f"{data}: not found — pass a folder of .txt/.rst/.md files or token ids (.npy)", data
        )
    if data.suffix == ".npy":
        return np.load(data).astype(np.int64)
    if encode is None:
        raise BadInputError(
            f"{data}: a text folder needs the model's tokenizer, which a .gguf does not carry here — pass token "
            "ids (`dsarag indexer tokenize`) or the model's name",
            data,
        )
    files = text_files(data) if data.is_dir() else []
    if not files:
        raise MissingInputError(
            f"{data}: no .txt, .rst or .md files — pass a folder of text or token ids (.npy)", data
        )
    return np.array(encode("\n\n".join(p.read_text(errors="replace") for p in files)), dtype=np.int64)


def tokenizer_encode(model_spec: str) -> Callable[[str], list[int]] | None:
    """The model's `encode`; None for a `.gguf`, whose text must come as token ids."""
    if model_spec.endswith(".gguf"):
        return None
    from dsarag.indexer_model.resolve import resolve_model
    from dsarag.indexer_model.tokenizer import ChatTokenizer

    return ChatTokenizer(resolve_model(model_spec)).encode


def write_token_ids(model_spec: str, folder: Path, out: Path) -> dict:
    """`dsarag indexer tokenize`: the ids `train` would read from `folder`, saved to `out` (.npy, atomic)."""
    if out.suffix != ".npy":
        raise BadInputError(f"{out}: token ids are saved as .npy — name the output file ….npy", out)
    if not folder.is_dir():
        raise MissingInputError(
            f"{folder}: not a folder — pass the folder of .txt/.rst/.md files to tokenize", folder
        )
    ids = load_token_stream(folder, tokenizer_encode(model_spec))
    # int32 holds any vocabulary and halves what travels to the GPU machine; readers widen to int64.
    ids = ids.astype(np.int32)

    def save(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a file object: np.save would append .npy to the temp file's name
            np.save(handle, ids)

    atomic_write(out, save)
    return {
        "folder": str(folder),
        "files": len(text_files(folder)),
        "tokens": int(len(ids)),
        "out": str(out),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
