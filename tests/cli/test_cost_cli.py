"""`dsarag bench` and `dsarag cost report` through the CLI, on the tiny model at tiny lengths."""

import json

import pytest


@pytest.mark.slow
def test_bench_sweeps_dense_and_sparse_and_writes_json_and_plots(tmp_path, run_cli):
    out = tmp_path / "bench"
    code, stdout, stderr = run_cli(
        "bench", "--model", "tiny", "--lengths", "200", "--topk", "128,192,256", "--decode-steps", "3",
        "--out", str(out), "--json",
    )  # fmt: skip
    assert code == 0, stderr
    result = json.loads(stdout)
    rows = {(row["mode"], row["topk"]): row for row in result["rows"]}
    assert set(rows) == {("dense", None), ("sparse", 128), ("sparse", 192)}  # k = 256 covers all 200 keys
    assert rows[("sparse", 192)]["accuracy"] >= 0.75  # 8 of 200 keys dropped: the greedy tokens barely move
    assert 0.0 <= rows[("sparse", 128)]["accuracy"] <= 1.0
    assert rows[("sparse", 128)]["analytic_prefill_flop_ratio"] > 0
    curves = result["cost_curves"]
    assert len(curves["prefill"]["dense"]) == len(curves["positions"])
    assert curves["decode"]["sparse"][-1] < curves["decode"]["dense"][-1]  # sparse is cheaper far out
    assert json.loads((out / "bench.json").read_text())["model"] == result["model"]
    for plot in ("cost_per_million.png", "latency_accuracy_vs_k.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lengths", "1k"], "--lengths"),
        (["--topk", "0"], "--topk"),
        (["--price-per-hour", "-1"], "negative"),
    ],
)
def test_bench_bad_input_exits_2_with_one_line(tmp_path, run_cli, args, message):
    code, _, stderr = run_cli("bench", "--model", "tiny", "--out", str(tmp_path), *args)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_cost_report_on_an_empty_ledger(run_cli):
    code, stdout, _ = run_cli("cost", "report", "--json")
    assert code == 0
    assert json.loads(stdout)["total"]["answers"] == 0


@pytest.mark.slow
def test_ask_reports_cost_compares_modes_and_fills_the_ledger(tmp_path, run_cli):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "harbor.md").write_text(
        "# Harbor log\n\n" + "The harbor crane inspection found worn cables on pier four. " * 30
    )
    (docs / "garden.md").write_text("# Garden\n\n" + "The community garden plants tomatoes in May. " * 30)
    code, out, err = run_cli(
        "ask", "What did the crane inspection find?", "--docs", str(docs), "--model", "tiny",
        "--strategy", "semantic", "--attention", "sparse", "--topk", "128", "--max-new-tokens", "6",
        "--compare-dense", "--price-per-hour", "3.6", "--json",
    )  # fmt: skip
    assert code == 0, err
    cost = json.loads(out)["cost"]
    assert cost["mode_ran"] == "sparse" and cost["topk"] == 128
    assert cost["prompt_tokens"] > 128  # the context is longer than k, so sparse attention really ran
    assert cost["sparse"]["attention_flops"] < cost["dense"]["attention_flops"]
    assert cost["gpu"]["price_per_hour"] == 3.6 and cost["measured"]["dollars_at_price"] > 0
    assert cost["measured"]["backend"] in ("cpu-amx", "cpu-bf16", "cpu-fp32", "torch")  # the kernels it timed
    compare = cost["compare"]
    assert compare["speedup"] > 0 and isinstance(compare["answers_identical"], bool)
    assert 0.0 <= compare["token_overlap"] <= 1.0

    code, out, _ = run_cli("cost", "report", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["total"]["answers"] == 1 and set(report["by_mode"]) == {"sparse"}

    code, _, err = run_cli("cost", "report")  # the table, in the test console's 80 columns
    assert code == 0
    header = next(line for line in err.splitlines() if line.startswith("group"))
    assert header.split() == [
        "group",
        "answers",
        "tokens",
        "seconds",
        "$",
        "dense",
        "$",
        "sparse",
        "$",
        "saving",
    ]
    assert "…" not in err and "mode sparse" in err
