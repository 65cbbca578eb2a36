"""`--model openai:URL#MODEL` against a real `dsarag serve --model tiny` process: the same answer as in this
process, logprobs for the agent's decisions, concurrent evals, and the failures (unreachable, unknown model,
refused key, a server killed mid-stream), each one line with its exit code and nothing half-written."""

import json
import signal
import threading

import pytest
from serve_process import free_port, start_server

from dsarag.base.errors import EXIT_BAD_INPUT, EXIT_MODEL, EXIT_SERVER, BadInputError, ServerError
from dsarag.indexer_model.generate import load_generator
from dsarag.rag.cost import GpuSpec
from dsarag.rag.cost_ledger import ledger_dir, ledger_row
from dsarag.rag.generators import open_generator
from dsarag.rag.label_choice import label_logprob
from dsarag.rag.remote_endpoint import Endpoint
from dsarag.rag.remote_generator import RemoteGenerator
from dsarag.rag.route import RETRIEVAL_CHOICE
from dsarag.rag.served_models import meter_served, served_architecture

pytestmark = pytest.mark.slow  # a served tiny model answers the agent's questions
QUESTION = "When is lunch?"
MESSAGES = [{"role": "user", "content": "Name one colour."}]


def answers_at_once(generator: RemoteGenerator, count: int, max_new_tokens: int) -> list[str]:
    """`count` greedy answers to MESSAGES asked from as many threads at once."""
    texts: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: texts.append(generator.answer(MESSAGES, max_new_tokens=max_new_tokens).text)
        )
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return texts


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("remote-home"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def spec(served) -> str:
    return f"openai:{served.url}/v1#smollm2-135m-instruct"


def test_the_demo_style_question_gets_the_same_answer_and_citations_as_in_process(
    spec, small_docs, tmp_path, run_cli
):
    args = ("ask", QUESTION, "--docs", str(small_docs), "--store", str(tmp_path / "store"), "--json")
    args += ("--max-new-tokens", "24", "--no-server")
    code, out, _ = run_cli(*args, "--model", spec)
    assert code == 0
    remote = json.loads(out)
    code, out, _ = run_cli(*args, "--model", "tiny")
    assert code == 0
    local = json.loads(out)
    assert remote["answer"] == local["answer"] and remote["sources"] == local["sources"]
    assert remote["citations"] == local["citations"] and remote["strategy"] == local["strategy"]
    assert (
        remote["tokens"] == local["tokens"]
    )  # the served model's tokenizer is on this machine: exact counts
    assert remote["model"] == f"smollm2-135m-instruct@{spec[len('openai:') :].split('#')[0]}"
    served_meter = remote["cost"]["served"]
    assert (
        served_meter["endpoint"].endswith("/v1") and served_meter["architecture"] == "smollm2-135m-instruct"
    )
    assert remote["cost"]["measured"]["prefill_s"] > 0 and remote["attention"] == "dense"


def test_first_step_logprobs_match_the_model_in_this_process(spec):
    remote, local = open_generator(spec), load_generator("tiny")
    messages = RETRIEVAL_CHOICE.messages("Who leads the kitchen?")
    result, top = remote.scored_reply(messages, max_new_tokens=1)
    assert top is not None and len(top) == 20
    import torch

    ids = local.chat_prompt_ids(messages)
    local.model.setup_caches(1, len(ids))
    with torch.inference_mode():
        logits = local.model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
    logprobs = torch.log_softmax(logits.float(), -1)
    for label in RETRIEVAL_CHOICE.labels:
        token_id = local.tokenizer.encode(label)[0]
        expected = float(logprobs[token_id])
        if remote.first_token_text(label) in top:
            assert label_logprob(top, label, remote.first_token_text(label)) == pytest.approx(
                expected, abs=0.05
            )
    assert result.text == max(top, key=top.__getitem__)  # greedy: the likeliest token
    # Biased alike, the labels lead the list and keep the model's differences.
    _, biased = remote.scored_reply(messages, max_new_tokens=1, options=RETRIEVAL_CHOICE.labels)
    first, second = (remote.first_token_text(label) for label in RETRIEVAL_CHOICE.labels)
    first_id, second_id = (local.tokenizer.encode(label)[0] for label in RETRIEVAL_CHOICE.labels)
    expected = float(logprobs[first_id] - logprobs[second_id])
    assert sorted(biased, key=biased.__getitem__)[-2:] == sorted([first, second], key=biased.__getitem__)
    assert biased[first] - biased[second] == pytest.approx(expected, abs=0.05)


def test_a_continued_reply_equals_the_local_reply_start(spec):
    remote, local = open_generator(spec), load_generator("tiny")
    kwargs = {"max_new_tokens": 6, "reply_start": "Answer:"}
    assert remote.answer(MESSAGES, **kwargs).text == local.answer(MESSAGES, **kwargs).text


def test_labels_missing_from_the_list_score_as_its_least_likely_entry():
    top = {"doc": -1.0, "uments": -3.0, "general": -2.0}
    assert label_logprob(top, "documents", "doc") == -1.0
    assert label_logprob(top, "summary", "sum") == -3.0
    assert label_logprob(top, "documents", None) == pytest.approx(-1.0)  # by prefix when the token is unknown


def test_an_unreachable_server_exits_5_in_one_line_and_writes_no_ledger_row(small_docs, tmp_path, run_cli):
    spec = f"openai:http://127.0.0.1:{free_port()}/v1"
    code, out, err = run_cli("ask", QUESTION, "--docs", str(small_docs), "--store", str(tmp_path / "s"), "--model", spec)  # fmt: skip
    assert code == EXIT_MODEL and out == ""
    assert err.strip().startswith("error:") and "no server answers there" in err
    assert len(err.strip().splitlines()) == 1
    assert not ledger_dir().exists() or not any(ledger_dir().iterdir())


def test_an_unknown_model_exits_5_naming_what_is_served(served, run_cli):
    code, _, err = run_cli("ask", QUESTION, "--strategy", "none", "--model", f"openai:{served.url}/v1#gpt-4o")
    assert code == EXIT_MODEL
    assert "'gpt-4o' is not served there (it serves smollm2-135m-instruct)" in err


def test_a_malformed_spec_exits_2(run_cli):
    code, _, err = run_cli("ask", QUESTION, "--strategy", "none", "--model", "openai:localhost:8000")
    assert code == EXIT_BAD_INPUT and "openai:http://HOST:PORT/v1" in err


def test_the_spec_can_come_from_the_environment(monkeypatch, served):
    monkeypatch.setenv("DSARAG_OPENAI_BASE_URL", f"{served.url}/v1")
    monkeypatch.setenv("DSARAG_OPENAI_API_KEY", "sk-secret-value")
    endpoint = Endpoint.parse("openai:")
    assert endpoint.base_url == f"{served.url}/v1" and endpoint.model is None
    assert "sk-secret" not in repr(endpoint)
    with pytest.raises(BadInputError):
        Endpoint.parse("openai:ftp://example.org")


def test_a_refused_key_exits_5_without_printing_it(tmp_path, monkeypatch, run_cli):
    locked = start_server(tmp_path, "--api-key", "right-key")
    try:
        spec = f"openai:{locked.url}/v1"
        monkeypatch.setenv("DSARAG_OPENAI_API_KEY", "wrong-key-1234")
        code, out, err = run_cli("ask", "Hi", "--strategy", "none", "--model", spec, "--max-new-tokens", "2")
        assert code == EXIT_MODEL and "refused the API key" in err and "wrong-key-1234" not in out + err
        monkeypatch.setenv("DSARAG_OPENAI_API_KEY", "right-key")
        code, out, err = run_cli("ask", "Hi", "--strategy", "none", "--model", spec, "--max-new-tokens", "2", "--json")  # fmt: skip
        assert code == 0 and json.loads(out)["answer"] and "right-key" not in out + err
    finally:
        locked.stop()


def test_a_server_killed_mid_stream_raises_a_server_error(tmp_path):
    doomed = start_server(tmp_path)
    generator = open_generator(f"openai:{doomed.url}/v1")
    texts: list[str] = []

    def kill_on_first_text(text: str) -> None:
        texts.append(text)
        if len(texts) == 1:
            doomed.process.send_signal(signal.SIGKILL)

    try:
        with pytest.raises(ServerError) as raised:
            generator.answer(
                [{"role": "user", "content": "Write a long story about a lighthouse."}],
                max_new_tokens=400,
                on_text=kill_on_first_text,
            )
        assert raised.value.exit_code == EXIT_SERVER and "\n" not in str(raised.value)
    finally:
        doomed.process.kill()
        doomed.process.wait()


def test_an_eval_suite_runs_four_questions_at_once_with_the_local_format(spec, tmp_path, run_cli):
    args = ("eval", "run", "routing", "--limit", "8", "--threshold", "none", "--json")
    code, out, _ = run_cli(*args, "--model", spec, "--out", str(tmp_path / "remote"))
    assert code == 0
    remote = json.loads(out)
    assert remote["throughput"]["in_flight"] == 4 and remote["throughput"]["items"] == 8
    code, out, _ = run_cli(*args, "--model", "tiny", "--out", str(tmp_path / "local"))
    local = json.loads(out)
    assert remote["metrics"].keys() == local["metrics"].keys()
    rows = [json.loads(line) for line in (tmp_path / "remote/routing/items.jsonl").read_text().splitlines()]
    local_rows = [
        json.loads(line) for line in (tmp_path / "local/routing/items.jsonl").read_text().splitlines()
    ]
    assert sorted(row["key"] for row in rows) == sorted(row["key"] for row in local_rows)
    assert all(row.keys() == local_rows[0].keys() for row in rows)


def test_concurrency_needs_a_served_model(tmp_path, run_cli):
    code, _, err = run_cli(
        "eval", "run", "routing", "--model", "tiny", "--concurrency", "4", "--out", str(tmp_path)
    )
    assert code == EXIT_BAD_INPUT and "one question at a time" in err


def test_the_meter_knows_deepseek_v32_and_marks_others_unknown(spec):
    architecture = served_architecture("deepseek-ai/DeepSeek-V3.2-Exp")
    shape = architecture.shape
    active = shape.n_layer * shape.layer_weights + 2 * shape.dim * shape.vocab_size
    assert 36e9 < active < 39e9  # DeepSeek-V3's 37B activated parameters per token
    assert architecture.attention == "sparse" and architecture.topk == 2048
    generator = open_generator(spec)
    result = generator.answer(MESSAGES, max_new_tokens=4)
    generator.served_model = "some-org/unknown-model"
    meter = meter_served(generator, result, GpuSpec())
    assert meter["served"]["architecture"] == "unknown" and "dense" not in meter
    row = ledger_row(QUESTION, generator.name, meter)
    assert row["dense_flops"] is None and row["new_tokens"] == result.new_tokens


def test_threads_share_one_remote_generator(spec):
    generator = open_generator(spec)
    assert isinstance(generator, RemoteGenerator)
    texts = answers_at_once(generator, 3, max_new_tokens=4)
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: the same reply, queued by the server


def test_bench_times_a_served_model_per_prompt_length(spec, tmp_path, run_cli):
    code, out, _ = run_cli(
        "bench", "--model", spec, "--out", str(tmp_path), "--lengths", "64,256", "--decode-steps", "4",
        "--repeats", "2", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    short, long = result["rows"]
    assert short["prompt_tokens"] < long["prompt_tokens"] and long["prompt_tokens"] >= 256
    assert all(row["first_text_s"] > 0 and 0 < row["new_tokens"] <= 4 for row in result["rows"])
    assert result["architecture"] == "smollm2-135m-instruct"
    assert long["analytic_prefill_flop_ratio"] < 1.0  # below k = 2048 sparse only adds the indexer


def test_a_busy_server_is_retried_with_back_off(tmp_path):
    busy = start_server(tmp_path, "--max-queue", "0")  # a second request while one runs gets 503
    try:
        texts = answers_at_once(open_generator(f"openai:{busy.url}/v1"), 2, max_new_tokens=8)
        assert len(texts) == 2 and texts[0] == texts[1]
        assert "/v1/chat/completions: 503" in (tmp_path / "serve.log").read_text()  # refused, then retried
    finally:
        busy.stop()
