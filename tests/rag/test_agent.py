"""The ask agent: graph shape, query features and time windows, recency rerank, RRF, dedup, top-k budget,
packing, grounding, the bounded retry, routing, and the CLI's --trace / --json / --strategy / graph."""

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from dsarag.base.errors import EXIT_BAD_INPUT
from dsarag.corpora.demo_corpus import DEMO_DOCS
from dsarag.indexer_model.attention_policy import TOPK_MAX, TOPK_MIN, topk_budget
from dsarag.rag.agent import MAX_ATTEMPTS, AgentContext, build_graph, run_agent
from dsarag.rag.ask import AskOptions, ask
from dsarag.rag.dedup import dedup_rankings, drop_superseded_versions
from dsarag.rag.fusion import RRF_K, reciprocal_rank_fusion
from dsarag.rag.grounding import Grounding, add_citations, check_grounding
from dsarag.rag.ingest import ingest_folder
from dsarag.rag.pack import pack_sources
from dsarag.rag.query_features import query_features, time_window
from dsarag.rag.rerank import RecencyBlend
from dsarag.rag.retrieve import Hit, Retriever
from dsarag.rag.store import ChunkStore
from dsarag.rag.strategies import parse_sub_questions


def hit(
    chunk_id: int, path: str = "a.md", score: float = 0.5, when: date = date(2024, 1, 1), start: int = 0
) -> Hit:
    text = f"chunk {chunk_id} of {path}"
    return Hit(chunk_id, path, text, start, start + len(text), 1, 2, when, score)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, embedder) -> Path:
    store = tmp_path_factory.mktemp("agent") / "store"
    ingest_folder(DEMO_DOCS, ChunkStore(store), embedder)
    return store


@pytest.fixture(scope="module")
def retriever(demo_store, embedder) -> Retriever:
    return Retriever(ChunkStore(demo_store), embedder)


@pytest.fixture(scope="module")
def tiny():
    from dsarag.indexer_model.generate import load_generator

    return load_generator("tiny")


# --- graph ---------------------------------------------------------------------------------------------


def test_graph_has_the_design_nodes_and_both_conditional_edges():
    drawn = build_graph().get_graph()
    assert set(drawn.nodes) == {
        "__start__", "decide", "plan", "retrieve", "dedup", "rerank", "pack", "generate", "check", "__end__",
    }  # fmt: skip
    edges = {(edge.source, edge.target, edge.conditional) for edge in drawn.edges}
    assert ("decide", "generate", True) in edges  # retrieval can be skipped
    assert ("decide", "plan", True) in edges
    assert ("check", "retrieve", True) in edges  # the retry loop
    assert ("check", "__end__", True) in edges
    assert ("rerank", "pack", False) in edges


def test_dsarag_graph_prints_mermaid(run_cli):
    code, out, _ = run_cli("graph")
    assert code == 0
    assert "graph TD" in out
    assert "check -. &nbsp;retry&nbsp; .-> retrieve" in out
    assert "decide -. &nbsp;no_retrieve&nbsp; .-> generate" in out


# --- query features, time windows, recency --------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "start", "end"),
    [
        ("How much does one solar share cost as of March 2025?", None, date(2025, 3, 31)),
        ("What was the membership fee in 2023?", date(2023, 1, 1), date(2023, 12, 31)),
        ("In spring 2024, when did the workshop close?", date(2024, 3, 1), date(2024, 5, 31)),
        ("From 7 September 2024, when does it close?", None, date(2024, 9, 7)),
        ("What is the latest reimbursement cap?", None, None),
    ],
)
def test_time_window_is_parsed_from_the_question(question, start, end):
    window = time_window(question)
    assert (window.start, window.end) == (start, end)


def test_no_time_window_without_a_date_or_recency_word():
    assert time_window("Who is the privacy officer?") is None


def test_query_features_find_identifiers_and_comparisons():
    features = query_features("Did ticket LHC-4471 ship in 3.8.1, and what is idle_timeout_minutes?")
    assert {"LHC-4471", "3.8.1", "idle_timeout_minutes"} <= set(features.identifiers)
    assert query_features("How did the fee change between 2024 and 2025?").comparison
    assert not query_features("Translate 'good morning' into German.").identifiers  # a phrase, not a code


def test_recency_rerank_puts_the_newest_equally_relevant_chunk_first():
    hits = [hit(1, when=date(2022, 1, 1)), hit(2, when=date(2025, 1, 1)), hit(3, when=date(2023, 6, 1))]
    ranked = RecencyBlend().rerank(hits, time_window("What is the latest cap?"), newest=date(2025, 1, 1))
    assert [h.chunk_id for h in ranked] == [2, 3, 1]


def test_recency_rerank_respects_an_as_of_window_and_keeps_relevance_in_the_blend():
    hits = [hit(1, score=0.6, when=date(2025, 2, 1)), hit(2, score=0.5, when=date(2023, 5, 1)),
            hit(3, score=0.3, when=date(2023, 1, 1))]  # fmt: skip
    ranked = RecencyBlend().rerank(hits, time_window("as of December 2023"), newest=date(2025, 2, 1))
    # the most relevant chunk postdates the window: it keeps only its relevance share, 0.5 · 1.0
    assert [h.chunk_id for h in ranked] == [2, 1, 3]
    assert ranked[1].score == pytest.approx(0.5)


def test_undated_documents_are_neither_promoted_nor_demoted_by_recency():
    hits = [hit(1, path="undated.md", when=date(2026, 11, 1)), hit(2, path="new.md", when=date(2025, 1, 1)),
            hit(3, path="old.md", when=date(2020, 1, 1))]  # fmt: skip
    ranked = RecencyBlend().rerank(hits, None, newest=date(2025, 1, 1), undated=frozenset({"undated.md"}))
    assert [h.chunk_id for h in ranked] == [2, 1, 3]


def test_temporal_rerank_finds_the_newest_source_on_the_demo_corpus(retriever):
    question = "What is the current home office equipment reimbursement cap?"
    ranked = RecencyBlend().rerank(
        retriever.semantic(question, 24),
        time_window(question),
        retriever.newest_date(),
        retriever.undated_paths,
    )
    assert ranked[0].path == "remote-work-policy-2025.md"


# --- fusion, dedup, lexical -----------------------------------------------------------------------------


def test_reciprocal_rank_fusion_scores_by_rank_and_merges_shared_chunks():
    fused = reciprocal_rank_fusion([[hit(1), hit(2), hit(3)], [hit(3), hit(1), hit(4)]])
    assert [h.chunk_id for h in fused] == [1, 3, 2, 4]
    assert fused[0].score == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 2))
    assert fused[3].score == pytest.approx(1 / (RRF_K + 3))


def test_dedup_merges_the_same_chunk_and_drops_near_duplicates_of_the_same_date():
    vectors = {1: [1.0, 0.0], 2: [0.999, 0.045], 3: [0.0, 1.0], 4: [0.999, 0.045]}
    embedding_of = {
        key: np.array(value) / np.linalg.norm(value) for key, value in vectors.items()
    }.__getitem__
    rankings = [[hit(1), hit(2), hit(3)], [hit(3), hit(1), hit(4, when=date(2025, 1, 1))]]
    report = dedup_rankings(rankings, embedding_of)
    assert report.same_id == 2  # chunks 1 and 3 were found by both rankings
    assert [h.chunk_id for h in report.kept] == [1, 3, 4]  # 4 is as close to 1 but of another date: a version
    assert [(dropped, kept) for dropped, kept, _ in report.near_duplicates] == [(2, 1)]


def test_superseded_versions_of_a_fact_are_dropped_after_the_recency_rerank():
    vectors = {1: [1.0, 0.0, 0.0], 2: [0.8, 0.6, 0.0], 3: [0.0, 0.0, 1.0], 4: [0.8, 0.6, 0.0]}
    embedding_of = {key: np.array(value) for key, value in vectors.items()}.__getitem__
    ranked = [hit(1, "prices-2025.md", when=date(2025, 1, 6)), hit(2, "prices-2024.md", when=date(2024, 1, 2)),
              hit(3, "policy.md", when=date(2024, 1, 2)), hit(4, "prices-2025.md", start=300, when=date(2025, 1, 6))]  # fmt: skip
    kept, dropped = drop_superseded_versions(ranked, embedding_of)
    assert [h.chunk_id for h in kept] == [1, 3, 4]  # 4 is the same document: another part, not a version
    assert dropped == [(2, 1, 0.8)]


def test_sub_questions_are_parsed_from_question_lines_only():
    reply = "1. What was the fee in 2024?\n- What was the fee in 2025?\nThe fee rose by $5.\n2. What was the fee in 2024?"
    assert parse_sub_questions(reply, "How did the fee change?") == [
        "What was the fee in 2024?",
        "What was the fee in 2025?",
    ]


def test_bm25_finds_an_exact_ticket_number(retriever):
    hits = retriever.lexical("LHC-4480", 3)
    assert hits[0].path == "lantern-labs-sprint-notes-2024-09.md"
    assert "LHC-4480" in hits[0].text


# --- budget, packing, grounding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("complexity", "tokens", "topk"),
    [("document_qa", 32_000, 960), ("multi_hop", 20_000, 1200), ("keyword_lookup", 8_000, TOPK_MIN),
     ("chain_of_thought", 64_000, TOPK_MAX)],
)  # fmt: skip
def test_topk_budget_follows_the_ratio_table_and_clamps(complexity, tokens, topk):
    budget = topk_budget(complexity, tokens)
    assert (budget.attention, budget.topk) == ("sparse", topk)
    assert complexity in budget.reason


def test_topk_budget_is_dense_below_the_threshold_or_when_critical_and_topk_overrides():
    assert topk_budget("multi_hop", 1500).attention == "dense"
    assert topk_budget("multi_hop", 32_000, critical=True).attention == "dense"
    override = topk_budget("multi_hop", 1500, override=512)
    assert (override.attention, override.topk) == ("sparse", 512)
    assert "--topk" in override.reason
    assert topk_budget("multi_hop", 32_000, override=512, critical=True).attention == "dense"


def count_words(text: str) -> int:
    return len(text.split())


def test_packing_groups_by_document_in_reading_order_and_numbers_sources():
    hits = [
        hit(1, "b.md", start=500),
        hit(2, "a.md", start=0),
        hit(3, "b.md", start=100),
        hit(4, "a.md", start=900),
    ]
    packed = pack_sources(hits, count_words, budget_tokens=1000)
    assert [(h.path, h.char_start) for h in packed.sources] == [
        ("b.md", 100),
        ("b.md", 500),
        ("a.md", 0),
        ("a.md", 900),
    ]
    assert packed.text.startswith("[1] b.md") and "[3] a.md" in packed.text


def test_packing_skips_what_does_not_fit_and_truncates_only_the_best_hit():
    big = Hit(1, "big.md", "word " * 500, 0, 2500, 1, 40, date(2024, 1, 1), 0.9)
    packed = pack_sources([hit(2), big, hit(3)], count_words, budget_tokens=30)
    assert [h.chunk_id for h in packed.sources] == [2, 3] and [h.chunk_id for h in packed.skipped] == [1]
    alone = pack_sources([big], count_words, budget_tokens=30)
    assert alone.truncated and count_words(alone.text) <= 30


def test_grounding_by_overlap_and_i_do_not_know():
    sources = "The home office equipment cap is $600 from 2025, set by Tobias Achterberg."
    assert check_grounding("The cap is $600 [1].", sources).supported
    assert not check_grounding("The cap is $900, approved by Marisol Venkatesan.", sources).supported
    assert not check_grounding("The sources do not contain the answer.", sources).supported


def test_an_answer_without_markers_cites_the_source_holding_its_terms():
    sources = [
        "Treasurer until June 2024: Marisol Venkatesan.",
        "Treasurer from July 2024: Tobias Achterberg.",
    ]
    text, number, support = add_citations("Tobias Achterberg.", sources)
    assert number == 2 and support == 1.0 and text.startswith("Tobias Achterberg. [2]")
    assert "[2] cited by dsarag" in text  # the reply says the tool added it
    assert add_citations("It is Tobias Achterberg [2].", sources)[:2] == (
        "It is Tobias Achterberg [2].",
        None,
    )
    assert add_citations("Greta Novak.", sources)[:2] == ("Greta Novak.", None)  # in no source: no citation
    assert add_citations("The sources do not contain it.", sources)[1] is None
    both = ["Treasurer: Tobias Achterberg (2024).", "Tobias Achterberg, treasurer."]
    assert add_citations("Tobias Achterberg", both)[1] == 1  # a tie goes to the better-ranked source


# --- the graph end to end (tiny model) ----------------------------------------------------------------


def test_unsupported_answer_is_retried_once_with_another_strategy_and_a_bigger_budget(
    demo_store, retriever, tiny, monkeypatch
):
    monkeypatch.setattr(
        "dsarag.rag.agent.check_grounding", lambda answer, text: Grounding(False, 0.0, "forced")
    )
    monkeypatch.setattr("dsarag.rag.agent.choose_strategy", lambda *args: _decision("semantic"))
    options = AskOptions(
        question="What is the deposit for the portable wheel truing stand?", store=demo_store,
        chunks=2, context_tokens=300, max_new_tokens=4, reader="free",
    )  # fmt: skip
    state = run_agent(options.question, AgentContext(options, retriever, tiny))
    retrieves = [entry for entry in state["trace"] if entry["node"] == "retrieve"]
    assert [entry["attempt"] for entry in retrieves] == list(range(1, MAX_ATTEMPTS + 1))
    assert [(entry["strategy"], entry["k"]) for entry in retrieves] == [("semantic", 2), ("hybrid", 4)]
    assert [entry["node"] for entry in state["trace"]].count("generate") == MAX_ATTEMPTS
    assert state["trace"][-1]["retry"].startswith("no:")  # bounded: no third attempt


def test_a_streamed_answer_shows_each_attempt_then_what_the_check_added(demo_store, monkeypatch):
    verdicts = iter([Grounding(False, 0.0, "forced"), Grounding(True, 1.0, "forced")])
    monkeypatch.setattr("dsarag.rag.agent.check_grounding", lambda answer, text: next(verdicts))
    monkeypatch.setattr(
        "dsarag.rag.agent.add_citations", lambda answer, sources: (f"{answer.rstrip()} [1]", 1, 1.0)
    )
    events: list[tuple[str, str]] = []
    options = AskOptions(
        question="What is the deposit for the portable wheel truing stand?", store=demo_store, model="tiny",
        strategy="semantic", chunks=2, context_tokens=300, max_new_tokens=4, record_cost=False, reader="free",
    )  # fmt: skip
    result = ask(
        options,
        on_text=lambda text: events.append(("text", text)),
        stream=True,
        on_retry=lambda reason: events.append(("retry", reason)),
    )
    kinds = [kind for kind, _ in events]
    assert kinds.count("retry") == 1 and kinds.index("retry") > 0  # the first attempt streamed before it
    second = "".join(text for kind, text in events[kinds.index("retry") + 1 :])
    assert second.strip() == result.answer and result.answer.endswith(" [1]")
    assert events[-1] == ("text", " [1]")  # the check's citation marker, after the streamed words


def _decision(choice: str):  # noqa: ANN202
    from dsarag.rag.route import Decision

    return Decision(choice, "test", {})


def test_ask_json_trace_and_forced_strategy(demo_store, run_cli):
    code, out, err = run_cli(
        "ask", "What was ticket LHC-4471 about?", "--store", str(demo_store), "--model", "tiny",
        "--strategy", "hybrid", "--max-new-tokens", "8", "--context-tokens", "400", "--json", "--trace",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["strategy"] == "hybrid"
    nodes = [entry["node"] for entry in result["trace"]]
    assert nodes[:2] == ["decide", "plan"] and {
        "retrieve",
        "dedup",
        "rerank",
        "pack",
        "generate",
        "check",
    } <= set(nodes)
    retrieve = next(entry for entry in result["trace"] if entry["node"] == "retrieve")
    assert len(retrieve["rankings"]) == 2  # dense and BM25
    assert "forced by --strategy hybrid" in result["trace"][0]["reason"]
    assert "agent path: decide → plan → retrieve → dedup → rerank → pack → generate → check" in err
    assert result["sources"][0]["path"] == "lantern-labs-sprint-notes-2024-09.md"


def test_ask_strategy_none_answers_without_retrieval(demo_store, run_cli):
    code, out, _ = run_cli(
        "ask", "What is 17 times 23?", "--store", str(demo_store), "--model", "tiny", "--strategy", "none",
        "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert [entry["node"] for entry in result["trace"]] == ["decide", "generate", "check"]
    assert result["sources"] == [] and result["strategy"] == "none"


def test_strategy_none_needs_no_store_and_other_strategies_do(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("DSARAG_HOME", str(tmp_path / "home"))
    code, out, _ = run_cli(
        "ask", "What is 17 times 23?", "--model", "tiny", "--strategy", "none", "--max-new-tokens", "2", "--json"
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert (
        result["strategy"] == "none"
        and result["sources"] == []
        and "load_embedder_s" not in result["timings"]
    )
    assert not (tmp_path / "home" / "stores").exists()
    code, _, err = run_cli("ask", "What is 17 times 23?", "--model", "tiny")
    assert code == EXIT_BAD_INPUT and "--strategy none" in err


def test_critical_runs_dense_even_with_sparse_attention_and_a_topk(demo_store, run_cli):
    code, out, _ = run_cli(
        "ask", "Who is the privacy officer?", "--store", str(demo_store), "--model", "tiny", "--critical",
        "--attention", "sparse", "--topk", "68", "--max-new-tokens", "2", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert (result["attention"], result["attention_topk"]) == ("dense", None)


def test_bad_strategy_exits_2_with_one_line(demo_store, run_cli):
    code, _, err = run_cli("ask", "Who?", "--store", str(demo_store), "--strategy", "magic")
    assert code == EXIT_BAD_INPUT
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--strategy 'magic'" in lines[0]
    assert "semantic, multi-query, temporal, hybrid, none" in lines[0]


# --- routing set ---------------------------------------------------------------------------------------


def test_routing_set_is_labelled_and_large_enough():
    from dsarag.evals.routing import load_routing_set

    rows = load_routing_set()
    assert len(rows) >= 80
    assert {row["strategy"] for row in rows} == {"none", "semantic", "temporal", "hybrid", "multi-query"}
    assert all(row["answer"] and row["source"] for row in rows if row["strategy"] == "temporal")
    assert all((row["decision"] == "no_retrieve") == (row["strategy"] == "none") for row in rows)


def test_routing_sample_with_the_tiny_model(retriever, tiny):
    from dsarag.evals.routing import evaluate_routing, load_routing_set

    rows = load_routing_set()[::7]  # every seventh question: all five labels
    routed = evaluate_routing(rows, retriever, tiny)
    accuracy = sum(item.correct for item in routed) / len(routed)
    assert accuracy >= 0.75, [
        (item.question, item.expected, item.predicted) for item in routed if not item.correct
    ]


def test_chunks_and_attention_topk_have_one_name_each(demo_store, run_cli):
    from dsarag.indexer_model.dsa import DSAConfig

    smallest = DSAConfig.n_sink + DSAConfig.window
    code, _, err = run_cli("ask", "Who?", "--store", str(demo_store), "--topk", str(smallest - 1))
    assert code == EXIT_BAD_INPUT and f"--topk {smallest - 1}: below {smallest}" in err
    code, out, _ = run_cli(
        "ask", "Who is the privacy officer?", "--store", str(demo_store), "--model", "tiny", "--top-k", "1",
        "--strategy", "semantic", "--max-new-tokens", "2", "--json",
    )  # fmt: skip
    assert code == 0 and len(json.loads(out)["sources"]) == 1  # the old name of --chunks still works
    code, _, err = run_cli("ask", "--help")
    assert "--chunks" in err + _ and "--top-k" not in err + _
