"""`dsarag ask`: bring the store up to date, retrieve, pack, generate, cite."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from rag.embed import load_embedder
from rag.errors import BadInputError
from rag.ingest import IngestReport, ingest_folder
from rag.pack import build_messages, pack_sources
from rag.retrieve import Retriever
from rag.store import ChunkStore

ATTENTION_MODES = ("auto", "dense", "sparse")
ANSWER_RESERVE_TOKENS = 512  # room left in the model's context for the chat template and the answer


@dataclass
class AskOptions:
    question: str
    store: Path
    docs: Path | None = None
    model: str | None = None
    top_k: int = 6
    context_tokens: int = 3072
    max_new_tokens: int = 256
    temperature: float = 0.0
    attention: str = "auto"  # dense | sparse | auto
    attention_topk: int | None = None  # DSA top-k (default 2048)


@dataclass
class AskResult:
    question: str
    answer: str
    sources: list[dict]
    model: str
    attention: str
    attention_topk: int | None
    timings: dict[str, float]
    tokens: dict[str, int]
    ingest: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(vars(self))


def ask(
    options: AskOptions, console: Console | None = None, on_text: Callable[[str], None] | None = None
) -> AskResult:
    """Answer one question over the store (ingesting `docs` first when the store is missing or stale)."""
    question = options.question.strip()
    if options.attention not in ATTENTION_MODES:
        raise BadInputError(f"--attention {options.attention!r}: use one of {', '.join(ATTENTION_MODES)}")
    if not question:
        raise BadInputError(
            'empty question — pass the question as the first argument, e.g. dsarag ask "What …?"'
        )
    from indexer_model.generate import load_generator

    timings: dict[str, float] = {}
    embedder = load_embedder()
    store = ChunkStore(options.store)
    report: IngestReport | None = None
    if options.docs is not None:
        report = ingest_folder(options.docs, store, embedder, console=console)
        timings["ingest_s"] = report.seconds

    started = time.perf_counter()
    _ = embedder.model  # loaded here unless the ingest above needed it already
    timings["load_embedder_s"] = time.perf_counter() - started
    started = time.perf_counter()
    retriever = Retriever(store, embedder)
    hits = retriever.semantic(question, options.top_k)
    timings["retrieve_s"] = time.perf_counter() - started

    started = time.perf_counter()
    generator = load_generator(options.model)
    timings["load_model_s"] = time.perf_counter() - started

    budget = min(
        options.context_tokens, generator.max_context - ANSWER_RESERVE_TOKENS - options.max_new_tokens
    )
    packed = pack_sources(hits, generator.count_tokens, budget)
    generation = generator.answer(
        build_messages(question, packed),
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        on_text=on_text,
        attention=options.attention,
        topk=options.attention_topk,
    )
    timings["prefill_s"] = generation.prefill_s
    timings["decode_s"] = generation.decode_s
    sources = [
        {
            "number": number,
            "path": hit.path,
            "line_start": hit.line_start,
            "line_end": hit.line_end,
            "citation": hit.citation,
            "date": str(hit.date),
            "score": round(hit.score, 4),
            "chunk_id": hit.chunk_id,
        }
        for number, hit in enumerate(packed.sources, start=1)
    ]
    return AskResult(
        question=question,
        answer=generation.text.strip(),
        sources=sources,
        model=generator.name,
        attention=generation.attention,
        attention_topk=generation.topk,
        timings={name: round(value, 3) for name, value in timings.items()},
        tokens={
            "context": packed.tokens,
            "prompt": generation.prompt_tokens,
            "generated": generation.new_tokens,
        },
        ingest=report.to_json() if report else None,
    )
