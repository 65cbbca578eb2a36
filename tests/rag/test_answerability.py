"""The answerability probe: its score, its file, the gate between prefill and decoding, the agent's refusal
before writing a word, and the fit that chooses its weights and threshold."""

import json
import random

import pytest
import torch

from dsarag.base.errors import ModelError
from dsarag.evals.answerability_fit import fit_probe
from dsarag.rag.agent import AgentContext, run_agent
from dsarag.rag.answerability import PROBE_FILE, AnswerabilityProbe, find_probe
from dsarag.rag.ask import AskOptions


@pytest.fixture(scope="module")
def tiny():
    from dsarag.indexer_model.generate import load_generator

    return load_generator("tiny")


def probe_for(dim: int, layers: tuple[int, ...], threshold: float, weight: float = 1.0) -> AnswerabilityProbe:
    n = dim * len(layers)
    return AnswerabilityProbe(layers, (0.0,) * n, (1.0,) * n, (weight / n,) * n, 0.5, threshold, "test")


def test_the_score_is_the_standardized_states_dot_the_weights_plus_the_bias():
    probe = AnswerabilityProbe((0,), (1.0, -1.0), (2.0, 0.5), (3.0, -1.0), 0.25, 0.0)
    # (5 - 1) / 2 * 3 + (0 + 1) / 0.5 * -1 + 0.25
    assert probe.score(torch.tensor([5.0, 0.0])) == pytest.approx(6.0 - 2.0 + 0.25)
    with pytest.raises(ModelError, match="hidden state of 2"):
        probe.score(torch.zeros(3))


def test_a_probe_file_round_trips_and_a_broken_one_names_itself(tmp_path):
    probe = AnswerabilityProbe((3, 7), (0.5,) * 4, (2.0,) * 4, (0.1, 0.2, 0.3, 0.4), -1.0, 0.75, "sq-fit")
    probe.save(tmp_path / PROBE_FILE)
    assert find_probe(tmp_path) == probe
    assert find_probe(tmp_path / "elsewhere") is None and find_probe(None) is None
    (tmp_path / PROBE_FILE).write_text(json.dumps({"layers": [1], "mean": [0.0]}))
    with pytest.raises(ModelError, match=f"{PROBE_FILE}: not an answerability probe"):
        find_probe(tmp_path)


def test_the_shipped_probe_fits_the_default_model():
    from dsarag.indexer_model.checkpoint import checkpoint_folders

    folder = next(folder for folder in checkpoint_folders() if folder.name == "qwen2.5-coder-0.5b-instruct")
    probe = find_probe(folder)
    assert probe is not None and len(probe.weight) == 896 * len(
        probe.layers
    )  # Qwen2.5-0.5B: 24 layers of 896
    assert all(0 <= layer < 24 for layer in probe.layers)
    assert "fit" in probe.fitted_on and "report" not in probe.fitted_on  # never the reported questions


def test_the_gate_reads_the_prefill_and_stops_before_the_first_token(tiny):
    model, dim = tiny.model, tiny.model.args.dim
    messages = [{"role": "user", "content": "Where does the kitchen serve lunch?"}]
    for threshold, declined in ((float("inf"), True), (float("-inf"), False)):
        probe = probe_for(dim, (1, 2), threshold)
        with probe.watch(model) as gate:
            result = tiny.answer(messages, max_new_tokens=4, attention="dense", after_prefill=gate.declines)
        assert gate.score is not None and (result.stop_reason == "declined") == declined
        assert (result.new_tokens == 0) == declined
        assert not model.layers[1]._forward_hooks  # the hooks leave with the block
    # The score is the probe's on the prompt's last position, layer by layer.
    ids = tiny.chat_prompt_ids(messages)
    states = []
    hooks = [
        model.layers[n].register_forward_hook(lambda m, i, o: states.append(o[0, -1].float())) for n in (1, 2)
    ]
    with torch.inference_mode():
        model.setup_caches(1, len(ids))
        model(torch.tensor([ids]), torch.arange(len(ids)), last_logits_only=True)
    for hook in hooks:
        hook.remove()
    assert gate.score == pytest.approx(probe.score(torch.cat(states)), rel=1e-4, abs=1e-4)


def ask_with_probe(monkeypatch, embedder, tmp_path, tiny, probe, **options):
    from dsarag.rag.ingest import ingest_folder
    from dsarag.rag.retrieve import Retriever
    from dsarag.rag.store import ChunkStore

    monkeypatch.setattr("dsarag.rag.agent.answer_probe", lambda generator: probe)
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "kitchen.md").write_text("The community kitchen serves lunch at noon on weekdays.\n")
    ingest_folder(docs, ChunkStore(tmp_path / "store"), embedder)
    retriever = Retriever(ChunkStore(tmp_path / "store"), embedder)
    question = "When does the community kitchen serve lunch?"
    ask = AskOptions(question=question, store=tmp_path / "store", strategy="semantic", chunks=2, **options)
    return run_agent(question, AgentContext(ask, retriever, tiny))


def test_the_agent_declines_a_prompt_the_probe_judges_unanswerable(monkeypatch, embedder, tmp_path, tiny):
    probe = probe_for(tiny.model.args.dim, (1,), float("inf"))
    state = ask_with_probe(monkeypatch, embedder, tmp_path, tiny, probe, max_new_tokens=8)
    reading = state["reading"]
    assert reading.mode == "probe" and not reading.answerable and reading.score == state["answerability"]
    assert state["generation"].text == (
        "The documents do not contain the answer. Closest sources: [1] kitchen.md:1-1."
    )
    assert state["generation"].new_tokens == 0 and state["citations"] == []
    checks = [entry for entry in state["trace"] if entry["node"] == "check"]
    assert len(checks) == 1 and checks[0]["retry"] == "no: the answerability probe declined"
    generate = next(entry for entry in state["trace"] if entry["node"] == "generate")
    assert generate["answerability"]["score"] == round(state["answerability"], 3)


def test_an_answer_the_probe_passes_is_written_and_scored(monkeypatch, embedder, tmp_path, tiny):
    probe = probe_for(tiny.model.args.dim, (1,), float("-inf"))
    state = ask_with_probe(monkeypatch, embedder, tmp_path, tiny, probe, max_new_tokens=8)
    assert state["reading"] is None and state["generation"].new_tokens > 0
    assert state["answerability"] is not None


def test_no_abstain_turns_the_probe_off(monkeypatch, embedder, tmp_path, tiny):
    probe = probe_for(tiny.model.args.dim, (1,), float("inf"))
    state = ask_with_probe(monkeypatch, embedder, tmp_path, tiny, probe, max_new_tokens=8, abstain=False)
    assert state["reading"] is None and state["generation"].new_tokens > 0
    assert state.get("answerability") is None


def test_the_fit_separates_the_kinds_and_declines_the_share_asked_of_the_answerable():
    rng = random.Random(0)
    answerable = torch.tensor([float(i % 3 != 0) for i in range(300)])
    states = torch.tensor(
        [[rng.gauss(2.0 * y - 1.0, 1.0), rng.gauss(0, 1), rng.gauss(5, 3)] for y in answerable]
    )
    probe, rates = fit_probe(states, answerable, (4,), 1.0, 0.1, "synthetic fit")
    assert rates["out_of_fold_declined_answerable"] == pytest.approx(0.1, abs=0.01)
    assert (
        rates["out_of_fold_declined_unanswerable"] > 0.6
    )  # the classes overlap: about 2 standard deviations
    assert abs(probe.weight[0]) > 5 * max(abs(probe.weight[1]), abs(probe.weight[2]))
    scores = torch.tensor([probe.score(state) for state in states])
    assert (scores[answerable.bool()] >= probe.threshold).float().mean() > 0.85


def test_the_fit_reads_the_states_the_agent_scores(monkeypatch, embedder, tmp_path, tiny):
    """prompt_states packs as the agent packs a semantic route: its states are the ones the gate scores."""
    from dsarag.evals.answerability_fit import prompt_states
    from dsarag.rag.retrieve import Retriever
    from dsarag.rag.store import ChunkStore

    probe = probe_for(tiny.model.args.dim, (1, 2), float("-inf"), weight=3.0)
    state = ask_with_probe(monkeypatch, embedder, tmp_path, tiny, probe, max_new_tokens=2)
    retriever = Retriever(ChunkStore(tmp_path / "store"), embedder)
    states = prompt_states(tiny, retriever, "When does the community kitchen serve lunch?", (1, 2))
    assert states.shape == (2 * tiny.model.args.dim,)
    assert probe.score(states) == pytest.approx(state["answerability"], rel=1e-3, abs=1e-3)
