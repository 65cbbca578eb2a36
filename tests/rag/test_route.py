"""The agent's decisions: labels scored by one short forward pass over the question after a cached prompt opening,
the same scores as the whole prompt scored alone, and decide + plan keeping their decisions."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from langgraph.runtime import Runtime

from dsarag.corpora.demo_corpus import DEMO_DOCS
from dsarag.rag.agent import AgentContext, decide, plan
from dsarag.rag.ask import AskOptions
from dsarag.rag.ingest import ingest_folder
from dsarag.rag.label_choice import LabelChoice, first_token_ids
from dsarag.rag.query_features import query_features
from dsarag.rag.retrieve import Retriever
from dsarag.rag.route import CHOICES, choose_strategy, decide_retrieval, label_scores
from dsarag.rag.store import ChunkStore


@pytest.fixture(scope="module")
def tiny():
    from dsarag.indexer_model.generate import load_generator

    return load_generator("tiny", dtype=torch.float32)  # float32: batched and alone agree to rounding


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, embedder) -> Retriever:
    store = ChunkStore(tmp_path_factory.mktemp("route") / "store")
    ingest_folder(DEMO_DOCS, store, embedder)
    return Retriever(store, embedder)


@pytest.fixture
def forward_passes(tiny, monkeypatch) -> list[tuple[int, ...]]:
    """The input shape of each forward pass the tiny model runs."""
    shapes: list[tuple[int, ...]] = []
    forward = tiny.model.forward

    def counted(idx, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - the model's own signature
        shapes.append(tuple(idx.shape))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", counted)
    return shapes


def scored_alone(tiny, choice: LabelChoice, question: str) -> list[float]:
    """The label log-probabilities of the whole prompt, prefilled from position 0 on its own."""
    ids = choice.prompt_ids(tiny, question)
    tiny.model.setup_caches(max_batch_size=1, max_seq_len=len(ids))
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)[first_token_ids(tiny, choice.labels)].tolist()


@pytest.mark.parametrize("name", list(CHOICES))
def test_scores_after_the_cached_opening_equal_the_whole_prompt_scored_alone(name, tiny):
    choice = replace(CHOICES[name])  # its own cache of the opening
    question = "Who was treasurer in 2023 versus now?"
    scores = choice.scores(tiny, question)
    raw, prior = scored_alone(tiny, choice, question), scored_alone(tiny, choice, "N/A")
    calibrated = [value - baseline for value, baseline in zip(raw, prior, strict=True)]
    normalizer = math.log(sum(math.exp(value) for value in calibrated))
    assert [scores[label] for label in choice.labels] == pytest.approx(
        [value - normalizer for value in calibrated], abs=1e-3
    )
    assert sum(np.exp(list(scores.values()))) == pytest.approx(1.0, abs=1e-6)


def test_one_short_forward_pass_per_question_once_the_opening_is_cached(tiny, forward_passes):
    choice = replace(CHOICES["strategy"])
    whole_prompt = len(choice.prompt_ids(tiny, "N/A"))
    choice.scores(tiny, "What is the capital of France?")
    assert forward_passes[0] == (1, whole_prompt)  # once per model: the opening and the calibration
    assert len(forward_passes) == 2
    forward_passes.clear()
    for question in ("What was ticket LHC-4471 about?", "Compare the 2022 and 2025 remote work policies."):
        choice.scores(tiny, question)
    assert len(forward_passes) == 2  # one pass a question
    assert all(shape[1] < whole_prompt / 2 for shape in forward_passes)  # only the question and the ending


def test_labels_sharing_a_first_token_are_refused(tiny):
    with pytest.raises(ValueError, match="share a first token"):
        LabelChoice("x", ("reason", "reasoning")).scores(tiny, "q")  # "reason" + "ing"


def run_decide_and_plan(question: str, retriever: Retriever, tiny) -> dict:
    context = AgentContext(AskOptions(question=question, store=None), retriever, tiny)
    state: dict = {"question": question, "attempt": 1, "timings": {}}
    trace = []
    for node in (decide, plan):
        update = node(state, Runtime(context=context))
        trace += update.pop("trace")
        state |= update
        if state["retrieval"] == "no_retrieve":
            break
    return state | {"trace": trace}


@pytest.mark.parametrize(
    ("question", "strategy", "complexity"),
    [
        ("What was ticket LHC-4471 about?", "hybrid", "keyword_lookup"),
        ("Who is the current treasurer of Lumen Harbor Cooperative?", "temporal", "document_qa"),
        ("What is the difference between Kelp Room and Tidepool Room?", "multi-query", "multi_hop"),
    ],
)
def test_decide_and_plan_run_one_forward_pass_and_keep_their_decisions(
    question, strategy, complexity, retriever, tiny, forward_passes
):
    run_decide_and_plan("Who leads the Harbor Street Kitchen?", retriever, tiny)  # caches the openings
    forward_passes.clear()
    state = run_decide_and_plan(question, retriever, tiny)
    whole_prompt = len(CHOICES["retrieval"].prompt_ids(tiny, question))
    assert len(forward_passes) == 3  # retrieval, strategy, complexity: one short pass each
    assert all(shape[1] < whole_prompt / 2 for shape in forward_passes)
    assert (state["retrieval"], state["strategy"], state["complexity"]) == ("retrieve", strategy, complexity)
    assert state["queries"][1:] == list(
        query_features(question).compared
    )  # named sides: no LLM sub-questions
    decide_entry, strategy_entry, complexity_entry = state["trace"][:3]
    assert decide_entry["reason"].startswith("LLM documents-vs-general")
    assert strategy_entry["choice"] == strategy and "features" in strategy_entry["reason"]
    assert complexity_entry["decision"] == "complexity" and "LLM prefers" in complexity_entry["reason"]


def test_features_and_cosine_decide_with_the_model_scores_as_evidence():
    undecided = {"documents": math.log(0.5), "general": math.log(0.5)}
    ticket = query_features("What was ticket LHC-4471 about?")
    assert decide_retrieval(ticket, 0.2, undecided).choice == "retrieve"  # an identifier outweighs the cosine
    assert decide_retrieval(query_features("What is 17 times 23?"), 0.1, undecided).choice == "no_retrieve"
    lookup_leaning = {
        "lookup": math.log(0.7),
        "latest": math.log(0.1),
        "compare": math.log(0.1),
        "exact": math.log(0.1),
    }
    assert choose_strategy(ticket, lookup_leaning).choice == "hybrid"
    assert choose_strategy(query_features("Who leads the kitchen?"), lookup_leaning).choice == "semantic"


def test_a_date_opens_a_time_window_only_over_documents_that_state_their_dates():
    dated_question = query_features("What did Beyonce and Rowland found in 2005?")
    undecided = {label: math.log(0.25) for label in ("lookup", "latest", "compare", "exact")}
    assert choose_strategy(dated_question, undecided).choice == "temporal"
    undated = choose_strategy(dated_question, undecided, dated_documents=False)
    assert undated.choice == "semantic" and "not a time window" in undated.reason


def test_a_store_knows_whether_any_document_states_its_date(tmp_path, embedder):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "encyclopedia.txt").write_text("Beyonce and Rowland founded a charity in 2005.\n")
    store = ChunkStore(tmp_path / "store")
    ingest_folder(folder, store, embedder)
    assert not Retriever(store, embedder).has_dated_documents
    (folder / "2023-11-02-minutes.md").write_text("The board met.\n")
    ingest_folder(folder, store, embedder)
    assert Retriever(store, embedder).has_dated_documents


def test_a_forced_strategy_scores_only_the_complexity(retriever, tiny, forward_passes):
    question = "Who is the privacy officer?"
    label_scores("Who leads the kitchen?", tiny, tuple(CHOICES))  # caches the openings and calibrations
    forward_passes.clear()
    context = AgentContext(AskOptions(question=question, store=None, strategy="semantic"), retriever, tiny)
    state: dict = {"question": question, "attempt": 1, "timings": {}, "trace": []}
    state |= decide(state, Runtime(context=context))
    assert forward_passes == []  # forced: no decision to score
    state |= plan(state, Runtime(context=context))
    assert state["strategy"] == "semantic" and state["complexity"]
    assert [shape[0] for shape in forward_passes] == [1]  # one pass, one row: the complexity alone
