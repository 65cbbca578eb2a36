"""The generator a `--model` spec names: a local model loaded in this process, or a served one
(`openai:URL#MODEL`, rag/remote_generator.py). Both answer the agent through the same methods."""

from typing import TYPE_CHECKING

from dsarag.rag.remote_endpoint import is_remote_spec
from dsarag.rag.remote_generator import RemoteGenerator, connect

if TYPE_CHECKING:
    from dsarag.indexer_model.generate import Generator


def open_generator(spec: str | None, device: str = "cpu") -> "Generator | RemoteGenerator":
    if is_remote_spec(spec):
        return connect(spec)
    from dsarag.indexer_model.generate import load_generator

    return load_generator(spec, device=device)
