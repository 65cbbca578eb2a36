"""`dsarag ask`: bring the store up to date, then run the agent graph (rag/agent.py) and cite its sources."""

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from dsarag.base.errors import BadInputError
from dsarag.rag.ask_options import AskOptions, AskResult
from dsarag.rag.cost import GpuSpec, ModelShape, meter_answer, peak_memory_mb, token_overlap
from dsarag.rag.cost_ledger import append_row, ledger_row
from dsarag.rag.embed import Embedder, load_embedder
from dsarag.rag.ingest import IngestReport, ingest_folder
from dsarag.rag.lock import StoreLockedError
from dsarag.rag.pack import build_messages
from dsarag.rag.retrieve import Retriever
from dsarag.rag.route import STRATEGIES
from dsarag.rag.store import ChunkStore

if TYPE_CHECKING:
    from dsarag.indexer_model.generate import GenerationResult, Generator
    from dsarag.rag.remote_generator import RemoteGenerator
    from dsarag.rag.warm_models import WarmModels

ATTENTION_MODES = ("auto", "dense", "sparse")
STRATEGY_CHOICES = (*STRATEGIES, "none")
READERS = ("auto", "span", "free")  # how the sources are read: rag/reader.py reading_mode


class AnswerStream:
    """Each attempt's answer text as the model writes it, a notice when the check starts another attempt,
    and at the end what the check added to the last attempt (a citation marker)."""

    def __init__(self, on_text: Callable[[str], None], on_retry: Callable[[str], None] | None) -> None:
        self.on_text, self.on_retry, self.attempt_text = on_text, on_retry, ""

    def text(self, delta: str) -> None:
        self.attempt_text += delta
        self.on_text(delta)

    def retry(self, reason: str) -> None:
        self.attempt_text = ""
        if self.on_retry is not None:
            self.on_retry(reason)

    def finish(self, answer: str) -> None:
        streamed = self.attempt_text.strip()
        self.on_text(answer[len(streamed) :] if answer.startswith(streamed) else "\n" + answer)


def ask(
    options: AskOptions,
    console: Console | None = None,
    on_text: Callable[[str], None] | None = None,
    stream: bool = False,
    on_retry: Callable[[str], None] | None = None,
    warm: "WarmModels | None" = None,
) -> AskResult:
    """Answer one question over the store (ingesting `docs` first when the store is missing or stale).

    `on_text` gets the final answer once; with `stream`, it gets each attempt's text as it is generated
    instead (the agent's check may retry an unsupported answer: `on_retry` is told why before the next
    attempt streams), then what the check added to the last one. `warm` (dsarag serve) supplies loaded
    models and open stores; its generator is the one `options.model` names."""
    from dsarag.indexer_model.attention_policy import min_attention_topk

    question = options.question.strip()
    if options.attention not in ATTENTION_MODES:
        raise BadInputError(f"--attention {options.attention!r}: use one of {', '.join(ATTENTION_MODES)}")
    if options.attention_topk is not None and options.attention_topk < min_attention_topk():
        raise BadInputError(
            f"--topk {options.attention_topk}: below {min_attention_topk()}, the sink and recent-window tokens "
            "every query keeps — pass a larger k, or --attention dense"
        )
    if options.reader not in READERS:
        raise BadInputError(f"--reader {options.reader!r}: use one of {', '.join(READERS)}")
    if options.strategy is not None and options.strategy not in STRATEGY_CHOICES:
        raise BadInputError(f"--strategy {options.strategy!r}: use one of {', '.join(STRATEGY_CHOICES)}")
    if not question:
        raise BadInputError(
            'empty question — pass the question as the first argument, e.g. dsarag ask "What …?"'
        )
    if options.store is None and options.strategy != "none":
        raise BadInputError("no store given — pass --store PATH or --docs DIR (or --strategy none)")
    from dsarag.rag.agent import AgentContext, run_agent
    from dsarag.rag.generators import open_generator

    timings: dict[str, float] = {}
    report: IngestReport | None = None
    retriever = None
    if options.store is not None:
        embedder = warm.embedder if warm is not None else load_embedder()
        store = ChunkStore(options.store)
        if options.docs is not None:
            report = refresh_store(options.docs, store, embedder, console)
            if report is not None:
                timings["ingest_s"] = report.seconds
        started = time.perf_counter()
        _ = embedder.model  # loaded here unless the ingest above needed it already
        timings["load_embedder_s"] = time.perf_counter() - started
        retriever = warm.retriever(store) if warm is not None else Retriever(store, embedder)

    started = time.perf_counter()
    generator = warm.generator if warm is not None else open_generator(options.model)
    timings["load_model_s"] = time.perf_counter() - started

    streaming = AnswerStream(on_text, on_retry) if stream and on_text is not None else None
    context = AgentContext(options, retriever, generator)
    if streaming is not None:
        context.on_text, context.on_retry = streaming.text, streaming.retry
    state = run_agent(question, context)
    timings |= state["timings"]
    generation, packed, reading = state["generation"], state.get("packed"), state.get("reading")
    answerability = reading.score if reading else state.get("answerability")
    cost = meter_generation(generator, generation, GpuSpec(price_per_hour=options.price_per_hour))
    if options.compare_dense:
        cost["compare"] = compare_modes(generator, build_messages(question, packed), generation, options)
    if options.record_cost:
        append_row(ledger_row(question, generator.name, cost))
    answer = generation.text.strip()
    if streaming is not None:
        streaming.finish(answer)
    elif on_text is not None:
        on_text(answer)
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
        for number, hit in enumerate(packed.sources if packed else [], start=1)
    ]
    return AskResult(
        question=question,
        answer=answer,
        sources=sources,
        model=generator.name,
        attention=generation.attention,
        attention_topk=generation.topk,
        attention_layer_topk=generation.layer_topk,
        attention_decode=generation.decode_attention,
        attention_dense_tail=generation.dense_tail,
        timings={name: round(value, 3) for name, value in timings.items()},
        tokens={
            "context": packed.tokens if packed else 0,
            "prompt": generation.prompt_tokens,
            "generated": generation.new_tokens,
        },
        ingest=report.to_json() if report else None,
        strategy=state["strategy"],
        answerable=reading.answerable if reading else (None if answerability is None else True),
        answerability=None if answerability is None else round(answerability, 3),
        short_answer=(reading.answer or None) if reading else None,
        citations=state.get("citations", []),
        trace=state["trace"],
        cost=cost,
    )


def refresh_store(
    docs: Path, store: ChunkStore, embedder: Embedder, console: Console | None
) -> IngestReport | None:
    """Ingest `docs` first, unless another writer is ingesting into the store right now: then answer from its
    last committed state rather than wait (a store that has no commit yet is waited for)."""
    try:
        return ingest_folder(
            docs, store, embedder, console=console, lock_timeout_s=0 if store.exists() else 60
        )
    except StoreLockedError as error:
        if not store.exists():
            raise
        (console or Console(stderr=True)).print(
            f"[yellow]note:[/] {error} — answering from the last committed state", highlight=False
        )
        return None


def meter_generation(
    generator: "Generator | RemoteGenerator", generation: "GenerationResult", gpu: GpuSpec
) -> dict:
    """The cost meter of one generation: the mode that ran against the other, at the answer's top-k. The sparse
    side prefills and decodes as the sparse run did, or, after a dense run, as `--attention auto` would."""
    from dsarag.indexer_model.attention_policy import auto_dsa
    from dsarag.indexer_model.dsa import DSAConfig
    from dsarag.rag.remote_generator import RemoteGenerator
    from dsarag.rag.served_models import meter_served

    if isinstance(generator, RemoteGenerator):
        return meter_served(generator, generation, gpu)

    sparse = generation.attention == "sparse"
    auto = auto_dsa(generation.topk or DSAConfig().topk)  # what the sparse side runs after a dense answer
    meter = meter_answer(
        ModelShape.of(generator.model),
        generation.prompt_tokens,
        generation.new_tokens,
        auto.topk,
        {"prefill_s": generation.prefill_s, "decode_s": generation.decode_s},
        "sparse" if sparse else "dense",
        gpu,
        sparse_decode=generation.decode_attention == "sparse" if sparse else auto.sparse_decode,
        dense_tail=generation.dense_tail if sparse else auto.dense_tail,
    )
    meter["measured"]["peak_memory_mb"] = round(peak_memory_mb(str(generator.model.output.weight.device)), 1)
    meter["measured"]["backend"] = generation.backend  # the kernels the measured seconds ran on
    return meter


def compare_modes(
    generator: "Generator | RemoteGenerator",
    messages: list[dict],
    first: "GenerationResult",
    options: AskOptions,
) -> dict:
    """Answer the same prompt in the other attention mode (dense after sparse, sparse after dense) and
    report the measured speedup of sparse and whether the answers agree."""
    if first.attention not in ("dense", "sparse"):
        return {"skipped": f"{generator.name} chooses its own attention: compare the modes where it runs"}
    other_mode = "dense" if first.attention == "sparse" else "sparse"
    from dsarag.indexer_model.generate import Generator

    local = isinstance(generator, Generator)  # a served model's indexers are the server's to know
    if other_mode == "sparse" and local and not generator.model.has_indexers:
        return {"skipped": f"{generator.name} has no trained indexer: only dense attention can run"}
    other = generator.answer(
        messages,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        attention=other_mode,
        topk=first.topk or options.attention_topk,
    )
    sparse, dense = (first, other) if first.attention == "sparse" else (other, first)
    seconds = {name: g.prefill_s + g.decode_s for name, g in (("sparse", sparse), ("dense", dense))}
    return {
        "sparse_s": round(seconds["sparse"], 3),
        "dense_s": round(seconds["dense"], 3),
        "prefill_speedup": dense.prefill_s / sparse.prefill_s if sparse.prefill_s else None,
        "speedup": seconds["dense"] / seconds["sparse"] if seconds["sparse"] else None,
        "answers_identical": sparse.text.strip() == dense.text.strip(),
        "token_overlap": round(token_overlap(sparse.text, dense.text), 3),
        "other_answer": other.text.strip(),
    }
