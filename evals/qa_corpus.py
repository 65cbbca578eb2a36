"""The corpus behind a QA suite, ingested into a store in the suite's folder, and one agent answer per question.

Where the documents come from, in order: `--corpus PATH` (a folder, files or a corpus file), the questions'
own contexts (SQuAD, or JSONL with "context": written out as contexts.jsonl), else the bundled demo corpus
when the questions are the bundled ones.
"""

import re
import time
from pathlib import Path

from dsarag.base.errors import BadInputError
from dsarag.corpora.corpus_files import CorpusColumns, available_columns, corpus_kind
from dsarag.corpora.demo_corpus import DEMO_DOCS
from dsarag.evals.datasets import QAItem, contexts_corpus
from dsarag.evals.run import SuiteRun
from dsarag.rag.ask import AskOptions
from dsarag.rag.ingest import IngestOptions, ingest
from dsarag.rag.retrieve import Hit, Retriever
from dsarag.rag.store import ChunkStore


def qa_retriever(run: SuiteRun, items: list[QAItem]) -> Retriever:
    """Ingest (or bring up to date) the questions' corpus into `<suite folder>/store`; a retriever over it."""
    options = run.options
    columns = CorpusColumns()
    if options.corpus is not None:
        inputs = [options.corpus]
        if corpus_kind(Path(options.corpus)):
            found = set(available_columns(Path(options.corpus)))
            columns = CorpusColumns(
                id=next((name for name in ("id", "_id", "doc_id") if name in found), None)
            )
    elif any(item.context for item in items):
        inputs = [contexts_corpus(items, run.folder / "contexts.jsonl")]
        columns = CorpusColumns(id="id")
    elif options.data is None:
        inputs = [DEMO_DOCS]
    else:
        raise BadInputError(
            f"{options.data}: the questions carry no context — pass the documents they are about with --corpus PATH",
            options.data,
        )
    store = ChunkStore(run.folder / "store")
    with run.console.status("ingesting the corpus"):
        ingest(inputs, store, run.embedder(), IngestOptions(columns=columns), run.console)
    return Retriever(store, run.embedder())


def doc_of(path: str) -> str:
    """The document a hit comes from: a corpus record's id (`file.jsonl#id`), else the file's path."""
    return path.split("#", 1)[1] if "#" in path else path


def same_doc(found: str, gold: str) -> bool:
    """Paths may be relative to different roots ("docs/faq.md" vs "faq.md"): compare on a path boundary."""
    return found == gold or found.endswith("/" + gold) or gold.endswith("/" + found)


def cited_sources(answer: str, sources: list[Hit]) -> list[Hit]:
    """The sources an answer cites with [n] markers (n counted from 1), in order, once each."""
    numbers = dict.fromkeys(int(n) for n in re.findall(r"\[(\d+)\]", answer))
    return [sources[n - 1] for n in numbers if 1 <= n <= len(sources)]


def agent_answer(run: SuiteRun, retriever: Retriever, question: str, **ask: object) -> dict:
    """One pass of the ask agent: answer, strategy, sources (as hits), the agent's timings, wall seconds."""
    from dsarag.rag.agent import AgentContext, run_agent

    options = AskOptions(
        question=question,
        store=retriever.store.folder,
        model=run.options.model,
        context_tokens=run.options.context_tokens,
        record_cost=False,
        **ask,
    )
    started = time.perf_counter()
    state = run_agent(question, AgentContext(options, retriever, run.generator()))
    generation, reading = state["generation"], state.get("reading")
    citations = state.get("citations", [])
    reply = {
        "answer": generation.text.strip(),
        "citations_added": sum(citation["by"] == "tool" for citation in citations),
        "sub_questions": state.get("queries", [question])[1:],
        "strategy": state["strategy"],
        "sources": state["packed"].sources if state.get("packed") else [],
        "attention": generation.attention,
        "topk": generation.topk,
        "prompt_tokens": generation.prompt_tokens,
        "timings": {name: round(value, 3) for name, value in state["timings"].items()},
        "seconds": round(time.perf_counter() - started, 3),
        "trace": state["trace"],
    }
    if reading is not None:
        reply |= {
            "declined": not reading.answerable,
            "short_answer": reading.answer,
            "answerability": reading.score,
        }
    elif state.get("answerability") is not None:
        reply["answerability"] = state["answerability"]
    return reply
