"""The ask agent: one LangGraph StateGraph deciding whether and how to retrieve, then answering.

decide → plan → retrieve (+ bridge documents) → dedup → rerank → pack → generate → check, with two conditional edges: `decide`
may go straight to `generate` (no retrieval), and `check` may send an unsupported answer back to `retrieve`
once, with another strategy and a doubled budget. Every node appends what it decided and why to `trace`.
Loaded parts (retriever, generator, options) travel in the run's context, so the graph itself can be
built and drawn without loading anything.
"""

import operator
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from dsarag.indexer_model.attention_policy import TopkBudget, answer_mode, topk_budget
from dsarag.indexer_model.generate import GenerationResult, Generator
from dsarag.rag.answerability import answer_probe
from dsarag.rag.bridge import with_bridge_documents
from dsarag.rag.dedup import dedup_rankings, drop_superseded_versions
from dsarag.rag.grounding import Grounding, add_citations, check_grounding, cited_by_model
from dsarag.rag.pack import PackedContext, build_messages, pack_sources
from dsarag.rag.query_features import QueryFeatures, query_features
from dsarag.rag.reader import Reading, declined_for_missing_terms, read, reading_mode
from dsarag.rag.reader_remote import read_served
from dsarag.rag.remote_generator import RemoteGenerator
from dsarag.rag.rerank import RecencyBlend
from dsarag.rag.retrieve import Hit, Retriever
from dsarag.rag.route import choose_complexity, choose_strategy, decide_retrieval, label_scores, model_voted
from dsarag.rag.strategies import retrieve_rankings, write_sub_questions

if TYPE_CHECKING:
    from dsarag.rag.ask import AskOptions

MAX_ATTEMPTS = 2  # the first answer plus one retry: a bounded loop
RETRY_STRATEGY = {"semantic": "hybrid", "temporal": "hybrid", "multi-query": "hybrid", "hybrid": "semantic"}
ANSWER_RESERVE_TOKENS = 512  # room left in the model's context for the chat template and the answer


def _add_timings(old: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    return {name: old.get(name, 0.0) + new.get(name, 0.0) for name in old | new}


class AgentState(TypedDict, total=False):
    question: str
    features: QueryFeatures
    retrieval: str  # "retrieve" | "no_retrieve"
    strategy: str  # "semantic" | "multi-query" | "temporal" | "hybrid" | "none"
    complexity: str
    queries: list[str]  # the question, then any sub-questions
    retrieve_k: int
    context_budget: int
    rankings: list[list[Hit]]
    hits: list[Hit]
    packed: PackedContext | None
    topk: TopkBudget
    generation: GenerationResult
    reading: Reading | None  # the constrained reader's answer or refusal, a refusal before reading; else None
    answerability: float | None  # the answerability probe's score of a free answer's prompt
    # Each [n] of the final answer: who wrote it and whether its source holds the answer.
    citations: list[dict]
    grounding: Grounding
    attempt: int
    retry: bool
    timings: Annotated[dict[str, float], _add_timings]  # seconds per step, summed over a retry
    trace: Annotated[list[dict], operator.add]


@dataclass
class AgentContext:
    options: "AskOptions"
    retriever: Retriever | None  # None when asked without a store (--strategy none)
    generator: Generator | RemoteGenerator
    on_text: Callable[[str], None] | None = None  # each attempt's answer text as it is generated
    on_retry: Callable[[str], None] | None = None  # the check starts another attempt, for this reason


def build_graph() -> CompiledStateGraph:
    """Every node and edge of the agent, wired in one place."""
    graph = StateGraph(AgentState, context_schema=AgentContext)
    for name, node in (
        ("decide", decide),
        ("plan", plan),
        ("retrieve", retrieve),
        ("dedup", dedup),
        ("rerank", rerank),
        ("pack", pack),
        ("generate", generate),
        ("check", check),
    ):
        graph.add_node(name, node)
    graph.add_edge(START, "decide")
    graph.add_conditional_edges("decide", after_decide, {"retrieve": "plan", "no_retrieve": "generate"})
    graph.add_edge("plan", "retrieve")
    graph.add_edge("retrieve", "dedup")
    graph.add_edge("dedup", "rerank")
    graph.add_edge("rerank", "pack")
    graph.add_edge("pack", "generate")
    graph.add_edge("generate", "check")
    graph.add_conditional_edges("check", after_check, {"retry": "retrieve", "done": END})
    return graph.compile()


def graph_mermaid() -> str:
    return build_graph().get_graph().draw_mermaid()


def run_agent(question: str, context: AgentContext) -> AgentState:
    """Run the graph on `question`; the final state holds the answer, its sources and the trace."""
    return build_graph().invoke(
        {"question": question, "attempt": 1, "timings": {}, "trace": []}, context=context
    )


def after_decide(state: AgentState) -> str:
    return state["retrieval"]


def after_check(state: AgentState) -> str:
    return "retry" if state.get("retry") else "done"


def decide(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Retrieve or answer directly: forced by --strategy, else the LLM and the query features."""
    started = time.perf_counter()
    question, options = state["question"], runtime.context.options
    features = query_features(question)
    if options.strategy is not None:
        retrieval = "no_retrieve" if options.strategy == "none" else "retrieve"
        reason = f"forced by --strategy {options.strategy}"
    else:
        best = runtime.context.retriever.semantic(question, 1)
        scores = label_scores(question, runtime.context.generator, ("retrieval",))
        decision = decide_retrieval(features, best[0].score if best else 0.0, scores["retrieval"])
        retrieval, reason = decision.choice, decision.reason + _without_model_vote(runtime.context.generator)
    update: dict = {"features": features, "retrieval": retrieval}
    if retrieval == "no_retrieve":
        update |= {"strategy": "none", "packed": None}
    return update | {
        "timings": {"decide_s": time.perf_counter() - started},
        "trace": [
            {"node": "decide", "decision": retrieval, "reason": reason, "features": features.to_json()}
        ],
    }


def plan(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Strategy, time window, task complexity, sub-questions and the retrieval/packing budgets."""
    started = time.perf_counter()
    question, features = state["question"], state["features"]
    options, generator = runtime.context.options, runtime.context.generator
    decisions = ("complexity",) if options.strategy is not None else ("strategy", "complexity")
    scores = label_scores(question, generator, decisions)
    if options.strategy is not None:
        strategy, strategy_reason = options.strategy, f"forced by --strategy {options.strategy}"
    else:
        dated = runtime.context.retriever.has_dated_documents
        decision = choose_strategy(features, scores["strategy"], dated)
        strategy, strategy_reason = decision.choice, decision.reason + _without_model_vote(generator)
    complexity = choose_complexity(features, scores["complexity"])
    queries = [question]
    if strategy == "multi-query":
        queries += list(features.compared) or write_sub_questions(question, generator)
    trace = [
        {"node": "plan", "decision": "strategy", "choice": strategy, "reason": strategy_reason},
        {
            "node": "plan",
            "decision": "complexity",
            "choice": complexity.choice,
            "reason": complexity.reason + _without_model_vote(generator),
        },
    ]
    if strategy == "temporal":
        window = features.window.describe() if features.window else "none: newest available"
        trace.append({"node": "plan", "decision": "time window", "choice": window})
    if len(queries) > 1:
        trace.append({"node": "plan", "decision": "sub-questions", "choice": queries[1:]})
    return {
        "strategy": strategy,
        "complexity": complexity.choice,
        "queries": queries,
        "retrieve_k": options.chunks,
        "context_budget": min(options.context_tokens, _context_room(options, generator)),
        "timings": {"plan_s": time.perf_counter() - started},
        "trace": trace,
    }


def retrieve(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """The strategy's rankings; a semantic one also gets the bridge documents its best hits name."""
    started = time.perf_counter()
    retriever, k = runtime.context.retriever, state["retrieve_k"]
    rankings = retrieve_rankings(state["strategy"], state["queries"], retriever, k)
    entry = {
        "node": "retrieve",
        "strategy": state["strategy"],
        "k": k,
        "rankings": [len(ranking) for ranking in rankings],
        "attempt": state["attempt"],
    }
    if state["strategy"] == "semantic":
        ranking, added = with_bridge_documents(state["question"], rankings[0], retriever, k)
        rankings = [ranking]
        entry["bridge"] = [f"{name} → {hit.citation}" for name, hit in added]
    return {"rankings": rankings, "timings": {"retrieve_s": time.perf_counter() - started}, "trace": [entry]}


def dedup(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    report = dedup_rankings(state["rankings"], runtime.context.retriever.embedding)
    return {"hits": report.kept, "trace": [{"node": "dedup", **report.to_json()}]}


def rerank(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Temporal questions: relevance × recency inside the time window, then only the best-fitting version
    of each fact; then keep the k best."""
    hits = state["hits"]
    entry: dict = {"node": "rerank"}
    if state["strategy"] == "temporal":
        blend = RecencyBlend()
        retriever = runtime.context.retriever
        hits = blend.rerank(hits, state["features"].window, retriever.newest_date(), retriever.undated_paths)
        hits, superseded = drop_superseded_versions(hits, retriever.embedding)
        entry["superseded_versions_dropped"] = [
            {"dropped": dropped, "kept": kept, "cosine": cosine} for dropped, kept, cosine in superseded
        ]
        entry["method"] = (
            f"(1-{blend.weight})·relevance + {blend.weight}·recency, half-life {blend.half_life_days:.0f} d"
        )
    else:
        entry["method"] = "relevance order kept"
    hits = hits[: state["retrieve_k"]]
    entry["top"] = [f"{hit.citation} ({hit.date}, {hit.score:.3f})" for hit in hits[:5]]
    return {"hits": hits, "trace": [entry]}


def pack(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    packed = pack_sources(state["hits"], runtime.context.generator.count_tokens, state["context_budget"])
    return {"packed": packed, "trace": [{"node": "pack", **packed.to_json()}]}


def generate(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Answer with the top-k budget of the task's complexity (dense below the DSA threshold). A question naming
    a number no source holds is declined; yes/no questions (and factoid ones under --reader span) go to the
    constrained reader (yes, no, or a span copied from a source; or a refusal); others are answered freely,
    unless the model's answerability probe judges the prompt unanswerable after its prefill."""
    options, generator = runtime.context.options, runtime.context.generator
    question, packed = state["question"], state.get("packed")
    retrieved = packed is not None and bool(packed.sources)
    mode = reading_mode(question, options.reader) if retrieved else "free"
    messages = build_messages(question, packed)
    prompt_tokens = generator.prompt_tokens(messages)
    budget = topk_budget(
        state.get("complexity", "document_qa"), prompt_tokens, options.attention_topk, options.critical
    )
    attention = answer_mode(options.attention, budget, options.critical)
    reading = declined_for_missing_terms(question, packed) if retrieved else None
    gate = None
    if reading is not None:
        generation = GenerationResult(reading.reply(packed), [], prompt_tokens, 0, 0.0, 0.0, 0, "declined")
    elif mode == "free":
        probe = answer_probe(generator) if retrieved and options.abstain else None
        with probe.watch(generator.model) if probe else nullcontext() as gate:
            gated = {"after_prefill": gate.declines} if gate else {}  # a served model has no prefill to gate
            generation = generator.answer(
                messages,
                max_new_tokens=options.max_new_tokens,
                temperature=options.temperature,
                attention=attention,
                topk=budget.topk,
                on_text=runtime.context.on_text,
                **gated,
            )
        if generation.stop_reason == "declined":
            reading = Reading("probe", "", False, gate.score)
            generation = replace(generation, text=reading.reply(packed))
    else:
        compared = state["features"].compared if "features" in state else ()
        reader = read_served if isinstance(generator, RemoteGenerator) else read
        reading = reader(mode, generator, question, packed, attention, budget.topk, compared)
        generation = replace(reading.generation, text=reading.reply(packed))
    entry = {
        "node": "generate",
        "reader": mode,
        "topk_budget": budget.to_json(),
        "attention": generation.attention,
        "topk": generation.topk,
        "backend": generation.backend,
        "prompt_tokens": generation.prompt_tokens,
        "new_tokens": generation.new_tokens,
    }
    if reading is not None:
        entry["reading"] = reading.to_json() | {"features": reading.features}
    answerability = gate.score if gate else None
    if answerability is not None:
        entry["answerability"] = {
            "score": round(answerability, 3),
            "threshold": round(gate.probe.threshold, 3),
        }
    return {
        "topk": budget,
        "generation": generation,
        "reading": reading,
        "answerability": answerability,
        "timings": {"prefill_s": generation.prefill_s, "decode_s": generation.decode_s},
        "trace": [entry],
    }


def check(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Is the answer supported by the packed sources? A constrained answer is (it was copied from one) unless
    the reader declined; a free answer's terms must be found there, and each [n] it cites must hold them.
    A declined or unsupported answer is retried once with another strategy (unless forced) and twice the
    chunks and context budget."""
    packed, reading = state.get("packed"), state.get("reading")
    if packed is None or not packed.sources:
        return {
            "retry": False,
            "citations": [],
            "trace": [{"node": "check", "supported": None, "reason": "no sources: not retrieved"}],
        }
    generation = state["generation"]
    if reading is not None:
        supported = reading.answerable
        reason = f"{reading.mode}: {reading.answer}, cited {list(reading.sources)}"
        grounding = Grounding(
            supported, 1.0 if supported else 0.0, reason if supported else "the reader declined"
        )
        citations = [{"source": number, "by": "reader", "verified": True} for number in reading.sources]
    else:
        grounding = check_grounding(generation.text, packed.text)
        citations = cited_by_model(generation.text, [hit.text for hit in packed.sources])
    entry = {"node": "check", **grounding.to_json(), "attempt": state["attempt"]}
    # The probe judged the answer prompt itself; a bigger pack is not what it was fitted on.
    probe_declined = reading is not None and reading.mode == "probe"
    if grounding.supported or state["attempt"] >= MAX_ATTEMPTS or probe_declined:
        if not grounding.supported:
            why = "the answerability probe declined" if probe_declined else f"{MAX_ATTEMPTS} attempts made"
            entry["retry"] = f"no: {why}"
            return {"grounding": grounding, "retry": False, "citations": citations, "trace": [entry]}
        if reading is not None or citations:
            return {"grounding": grounding, "retry": False, "citations": citations, "trace": [entry]}
        text, cited, support = add_citations(generation.text, [hit.text for hit in packed.sources])
        if cited is None:
            return {"grounding": grounding, "retry": False, "citations": [], "trace": [entry]}
        entry["cited"] = (
            f"[{cited}] added: the answer named no source, [{cited}] holds {support:.0%} of its terms"
        )
        return {
            "grounding": grounding,
            "retry": False,
            "generation": replace(generation, text=text),
            "citations": [{"source": cited, "by": "tool", "verified": True}],
            "trace": [entry],
        }
    options, generator = runtime.context.options, runtime.context.generator
    strategy = state["strategy"] if options.strategy is not None else RETRY_STRATEGY[state["strategy"]]
    retry_k = state["retrieve_k"] * 2
    retry_budget = min(state["context_budget"] * 2, _context_room(options, generator))
    entry["retry"] = f"strategy {strategy}, k {retry_k}, context budget {retry_budget} tokens"
    if runtime.context.on_retry is not None:
        runtime.context.on_retry(entry["retry"])
    return {
        "grounding": grounding,
        "retry": True,
        "attempt": state["attempt"] + 1,
        "strategy": strategy,
        "retrieve_k": retry_k,
        "context_budget": retry_budget,
        "trace": [entry],
    }


def _without_model_vote(generator: Generator | RemoteGenerator) -> str:
    return "" if model_voted(generator) else " (no LLM vote: the server offers no log-probabilities)"


def _context_room(options: "AskOptions", generator: Generator | RemoteGenerator) -> int:
    """Tokens the sources may take: the model's context less the template, question and answer."""
    return generator.max_context - ANSWER_RESERVE_TOKENS - options.max_new_tokens
