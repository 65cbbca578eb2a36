"""Eval suites: metrics, external data formats, resumable runs, thresholds, and a small run of every suite."""

import json
from pathlib import Path

import pytest

from dsarag.base.errors import EXIT_BAD_INPUT, BadInputError, MissingInputError
from dsarag.evals.datasets import contexts_corpus, folder_text, load_beir, load_qa, synthetic_text
from dsarag.evals.metrics import (
    contains_answer,
    exact_match,
    ndcg_at_k,
    percentiles,
    recall_at_k,
    reciprocal_rank,
    token_f1,
)
from dsarag.evals.run import EXIT_THRESHOLD, EvalOptions, ItemLog, check_thresholds, parse_threshold
from dsarag.evals.runner import run_suite, suite_thresholds

# --- metrics ------------------------------------------------------------------------------------------------


def test_answer_scores_follow_squad_normalization():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("1,140 members", ["1140 members"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert token_f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("nothing alike", ["Paris"]) == 0.0
    assert token_f1("Lyon", ["Paris", "Lyon"]) == 1.0  # the best of several answers
    assert contains_answer("It was Ines Marchetti [1].", ["Ines Marchetti"]) == 1.0
    assert contains_answer("Inesa Marchettis", ["Ines Marchetti"]) == 0.0  # whole words only


def test_ranking_metrics_on_a_known_ranking():
    ranked = ["d3", "d1", "d7", "d2"]
    relevant = {"d1": 1.0, "d2": 1.0}
    assert recall_at_k(ranked, relevant, 1) == 0.0
    assert recall_at_k(ranked, relevant, 2) == 0.5
    assert recall_at_k(ranked, relevant, 4) == 1.0
    assert reciprocal_rank(ranked, relevant) == 0.5
    assert reciprocal_rank(ranked, relevant, k=1) == 0.0
    ideal = 1 + 1 / 1.5849625  # two relevant at ranks 1 and 2
    assert ndcg_at_k(ranked, relevant) == pytest.approx((1 / 1.5849625 + 1 / 2.3219281) / ideal)
    assert ndcg_at_k(["d1", "d2"], relevant) == pytest.approx(1.0)
    assert percentiles([1.0, 2.0, 3.0, 4.0])["p50"] == 2.5


# --- external data formats ----------------------------------------------------------------------------------


def test_qa_jsonl_takes_lists_strings_contexts_and_doc_ids(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Who?", "answers": ["Ada", "Ada L."], "doc_ids": ["a.md"]},
        {"id": "x", "question": "When?", "answer": "1843", "source": "b.md", "kind": "date"},
        {"question": "Where?", "answers": ["London"], "context": "Ada lived in London."},
    ]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    items = load_qa(path)
    assert [item.answers for item in items] == [["Ada", "Ada L."], ["1843"], ["London"]]
    assert items[0].doc_ids == ["a.md"] and items[1].doc_ids == ["b.md"] and items[1].id == "x"
    assert items[1].meta == {"kind": "date"}
    corpus = contexts_corpus(items, tmp_path / "contexts.jsonl")
    lines = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert lines == [{"id": items[2].doc_ids[0], "text": "Ada lived in London."}]


def test_a_bad_qa_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "ok?", "answers": ["y"]}\n{"answers": ["no question"]}\n')
    with pytest.raises(BadInputError, match=r"qa\.jsonl:2: no \"question\""):
        load_qa(path)
    path.write_text("{not json\n")
    with pytest.raises(BadInputError, match=r"qa\.jsonl:1: invalid JSON"):
        load_qa(path)


def write_squad(path: Path) -> Path:
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Lovelace", "paragraphs": [
        {"context": "Ada Lovelace was born in London in 1815.", "qas": [
            {"id": "q1", "question": "Where was Ada Lovelace born?", "answers": [{"text": "London", "answer_start": 25}, {"text": "London", "answer_start": 25}]},  # noqa: E501
            {"id": "q2", "question": "Who was born on the moon?", "answers": [], "is_impossible": True},
        ]},
        {"context": "The Analytical Engine was designed by Charles Babbage.", "qas": [
            {"id": "q3", "question": "Who designed the Analytical Engine?", "answers": [{"text": "Charles Babbage", "answer_start": 38}]},  # noqa: E501
        ]},
    ]}]}))  # fmt: skip
    return path


def test_squad_json_keeps_questions_with_their_contexts_and_marks_the_unanswerable(tmp_path):
    items = load_qa(write_squad(tmp_path / "dev.json"))
    assert [item.id for item in items] == ["q1", "q2", "q3"]
    assert items[0].answers == ["London"] and items[0].context.startswith("Ada Lovelace")
    assert items[1].answers == [] and items[1].meta["answerable"] is False
    assert items[1].meta["kind"] == "unanswerable" and "answerable" not in items[0].meta
    (tmp_path / "bad.json").write_text('{"data": [{"no": "paragraphs"}]}')
    with pytest.raises(BadInputError, match="not SQuAD JSON"):
        load_qa(tmp_path / "bad.json")


def write_beir(folder: Path) -> Path:
    """Three unmistakable documents and one query for each (plus an unjudged query)."""
    docs = {
        "volcano": ("Volcanoes", "Magma rises through the crust and erupts as lava from the volcano's vent."),
        "bakery": ("Sourdough", "The baker feeds the sourdough starter with flour and water every morning."),
        "chess": ("Openings", "The Sicilian Defence answers white's king pawn opening with the c-pawn."),
    }
    queries = {"q1": "how does lava erupt", "q2": "feeding a sourdough starter", "q3": "Sicilian Defence chess opening", "q9": "unjudged"}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n" for k, (t, x) in docs.items()))  # fmt: skip
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))  # fmt: skip
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tvolcano\t1\nq2\tbakery\t2\nq3\tchess\t1\n")  # fmt: skip
    return folder


def test_beir_folder_reads_judged_queries_and_graded_qrels(tmp_path):
    beir = load_beir(write_beir(tmp_path / "beir"))
    assert (
        set(beir.queries) == {"q1", "q2", "q3"}
        and beir.qrels["q2"] == {"bakery": 2.0}
        and beir.split == "test"
    )


def test_a_text_folder_becomes_a_haystack_and_an_empty_one_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# Minutes\n\nThe board met on Tuesday.\n")
    (tmp_path / "notes" / "b.txt").write_text("The roof was repaired.\n")
    text = folder_text(tmp_path / "notes")
    assert "The board met on Tuesday." in text and "The roof was repaired." in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="no readable text for a haystack"):
        folder_text(tmp_path / "empty")
    assert len(synthetic_text(5000, seed=1)) >= 5000 and synthetic_text(5000, seed=1) == synthetic_text(
        5000, seed=1
    )


# --- resumable runs and thresholds ----------------------------------------------------------------------------


def test_item_log_resumes_drops_a_cut_line_and_refuses_other_options(tmp_path):
    log = ItemLog(tmp_path, {"model": "tiny"})
    log.record("a", {"score": 1})
    log.record("b", {"score": 0})
    with open(log.path, "a") as handle:
        handle.write('{"key": "c", "sco')  # a kill in the middle of a line
    again = ItemLog(tmp_path, {"model": "tiny"})
    assert set(again.done) == {"a", "b"}
    assert again.run("a", lambda: pytest.fail("a finished item is not computed again"))["score"] == 1
    again.record("c", {"score": 1})
    assert [json.loads(line)["key"] for line in log.path.read_text().splitlines()] == ["a", "b", "c"]
    with pytest.raises(BadInputError, match="other options \\(model\\)"):
        ItemLog(tmp_path, {"model": "default"})
    assert ItemLog(tmp_path, {"model": "default"}, fresh=True).done == {}


def test_thresholds_match_globs_and_a_missing_metric_fails():
    metrics = {"lost_vs_dense.dsa-256": 0.01, "lost_vs_dense.dsa-2048": 0.2, "accuracy.dense": 0.9}
    rows = check_thresholds(metrics, [parse_threshold("lost_vs_dense.*<=0.05"), parse_threshold("typo>=1")])
    assert [(row["metric"], row["passed"]) for row in rows] == [
        ("lost_vs_dense.dsa-256", True),
        ("lost_vs_dense.dsa-2048", False),
        ("typo", False),
    ]
    with pytest.raises(BadInputError, match="METRIC>=VALUE"):
        parse_threshold("accuracy > 0.5")
    assert [str(rule) for rule in suite_thresholds("niah", ["accuracy.dense>=0.5"])] == [
        "accuracy.dense >= 0.5",
        "lost_vs_dense.* <= 0.05",
    ]
    assert suite_thresholds("niah", ["none"]) == []


# --- the suites, small, on real parts (tiny model, MiniLM, FAISS) ------------------------------------------


def test_retrieval_on_a_beir_folder_through_the_cli(tmp_path, run_cli):
    beir = write_beir(tmp_path / "beir")
    code, out, err = run_cli("eval", "run", "retrieval", "--data", str(beir), "--out", str(tmp_path / "out"),
                             "--index", "Flat", "--index", "HNSW32:efSearch=16", "--index", "bm25", "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["metrics"]["recall@10.flat"] == 1.0
    assert summary["metrics"]["ndcg@10.flat"] == pytest.approx(1.0)
    assert summary["metrics"]["ndcg@10.bm25"] > 0.6
    assert {row["setting"] for row in summary["table"]} == {"Flat", "HNSW32:efSearch=16", "bm25"}
    report = (tmp_path / "out" / "retrieval" / "report.md").read_text()
    assert "| best.ndcg@10 | 1 |" in report and "Thresholds: all thresholds met." in report

    code, out, err = run_cli("eval", "run", "retrieval", "--data", str(beir), "--out", str(tmp_path / "out"),
                             "--index", "Flat", "--threshold", "p50_ms.flat<=0", "--json")  # fmt: skip
    assert code == EXIT_THRESHOLD
    assert json.loads(out)["passed"] is False and "MISSED" in err


def test_bad_eval_arguments_exit_2_with_one_line(tmp_path, run_cli):
    for args, message in (
        (["eval", "run", "nope"], "unknown suite 'nope'"),
        (["eval", "run", "docqa", "--data", str(tmp_path / "missing.jsonl")], "--data"),
        (["eval", "run", "niah", "--depths", "0.5,1.5"], "--depths"),
        (["eval", "run", "niah", "--threshold", "accuracy=1"], "METRIC>=VALUE"),
    ):
        code, _, err = run_cli(*args, "--out", str(tmp_path / "out"))
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == EXIT_BAD_INPUT and len(lines) == 1 and message in lines[0], (args, err)


def tiny_options(tmp_path: Path, suite: str, **fields) -> EvalOptions:
    return EvalOptions(suite=suite, out=tmp_path / "out", model="tiny", thresholds=["none"], **fields)


@pytest.mark.slow
def test_niah_small_grid_resumes_without_recomputing(tmp_path, monkeypatch, console):
    options = tiny_options(tmp_path, "niah", lengths=[384], depths=[0.25, 0.75], topks=[128])
    summary = run_suite(options, console)
    metrics = summary["metrics"]
    assert metrics["accuracy.dense"] == 1.0  # the tiny model finds pass keys in 384 tokens
    assert 0.0 <= metrics["lost_vs_dense.dsa-128"] <= 1.0
    assert {"accuracy.single.dense", "accuracy.multi.dsa-128", "lost_vs_dense.auto-128"} <= set(metrics)
    folder = tmp_path / "out" / "niah"
    assert (folder / "niah_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # 3 cases × dense, dsa-128 and auto-128 (the question's positions dense)
    assert len((folder / "items.jsonl").read_text().splitlines()) == 9

    import dsarag.evals.suites.niah as niah

    monkeypatch.setattr(niah, "answer", lambda *args: pytest.fail("finished cases are not run again"))
    assert run_suite(options, console)["metrics"] == metrics


@pytest.mark.slow
def test_topk_sweep_small(tmp_path, console):
    options = tiny_options(tmp_path, "topk-sweep", lengths=[384], depths=[0.5], topks=[96, 256], limit=1)
    metrics = run_suite(options, console)["metrics"]
    assert metrics["flops_vs_dense.k96"] < metrics["flops_vs_dense.k256"]
    assert {"accuracy.dense", "accuracy.k96", "prefill_speedup.k256", "smallest_k_share"} <= set(metrics)
    assert (tmp_path / "out" / "topk-sweep" / "accuracy_cost_vs_k.png").exists()


@pytest.mark.slow
def test_docqa_on_squad_contexts_scores_and_cites(tmp_path, console):
    options = tiny_options(
        tmp_path, "docqa", data=write_squad(tmp_path / "dev.json"), context_tokens=256, limit=1
    )
    summary = run_suite(options, console)
    metrics = summary["metrics"]
    assert metrics["source_recall"] == 1.0  # each question's context is retrieved and packed
    assert {"exact_match", "f1", "answer_in_reply", "citation_accuracy"} <= set(metrics)
    assert (tmp_path / "out" / "docqa" / "contexts.jsonl").exists()


@pytest.mark.slow
def test_routing_and_temporal_small(tmp_path, console):
    routing = run_suite(tiny_options(tmp_path, "routing", limit=3), console)
    assert routing["metrics"]["accuracy"] >= 2 / 3  # the three "no retrieval" questions come first
    temporal = run_suite(tiny_options(tmp_path, "temporal", limit=1, context_tokens=512), console)
    assert temporal["metrics"]["source_packed"] == 1.0
    assert "newest_fact_accuracy" in temporal["metrics"]


@pytest.mark.slow
def test_latency_small_dense_and_sparse(tmp_path, console):
    summary = run_suite(tiny_options(tmp_path, "latency", limit=1, context_tokens=160, topks=[96]), console)
    metrics = summary["metrics"]
    assert metrics["p50_s.dense"] > 0 and metrics["p50_s.sparse"] > 0
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "latency" / "items.jsonl").read_text().splitlines()
    ]
    assert {row["attention"] for row in rows} == {"dense", "sparse"}
    assert (tmp_path / "out" / "latency" / "latency_cdf.png").exists()


@pytest.fixture
def console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def test_niah_table_says_not_run_for_a_variant_without_cases():
    from dsarag.evals.suites.niah import variant_accuracy

    group = [{"variant": "single", "correct": [True]}, {"variant": "single", "correct": [False]}]
    assert variant_accuracy(group, "single") == 0.5
    assert variant_accuracy(group, "multi") == "not run"


def _docqa_row(kind, answerable, declined, right=False, packed=True, cited_ok=(), added=0):
    row = {"kind": kind, "answerable": answerable, "declined": declined, "strategy": "semantic", "seconds": 2.0,
           "cited": ["a"] * len(cited_ok), "citations_added": added, "gold_packed": packed, "citation_ok": bool(cited_ok),
           "source_ok": packed, "gold_cited": bool(cited_ok)}  # fmt: skip
    if answerable:
        row |= {"answer_in_reply": float(right), "exact_match": float(right), "f1": float(right), "right": right,
                "cited_verified": list(cited_ok)}  # fmt: skip
    return row


def test_docqa_separates_reading_from_retrieval_and_scores_abstention():
    from dsarag.evals.suites.docqa import docqa_result

    rows = [
        _docqa_row("factoid", True, False, right=True, cited_ok=[True]),
        _docqa_row("factoid", True, False, right=False, packed=False, cited_ok=[False], added=1),
        _docqa_row("factoid", True, True),  # wrongly declined
        _docqa_row("unanswerable", False, True),
        _docqa_row("unanswerable", False, False),
    ]
    result = docqa_result(rows, "test")
    metrics = result.metrics
    assert metrics["right"] == pytest.approx(1 / 3) and metrics["gold_packed"] == pytest.approx(4 / 5)
    assert metrics["right_when_packed"] == 0.5  # of the two answerable questions whose gold was packed
    assert metrics["declined_unanswerable"] == 0.5 and metrics["declined_answerable"] == pytest.approx(1 / 3)
    assert metrics["decline_precision"] == 0.5
    assert metrics["citations_verified"] == 0.5 and metrics["citations_added"] == 0.5
    kinds = {row["kind"]: row for row in result.table}
    assert set(kinds) == {"factoid", "unanswerable", "all"} and kinds["unanswerable"]["right"] is None
    assert result.details["routing"] == {"factoid": {"semantic": 3}, "unanswerable": {"semantic": 2}}


def test_devsets_from_squad_hotpot_and_musique_keep_the_splits_apart(tmp_path):
    from dsarag.evals.devsets import prepare_hotpot, prepare_musique, prepare_squad

    paragraphs = [
        {"context": f"Paragraph {n} says the answer is A{n}.", "qas": [
            {"id": f"a{n}", "question": f"What is answer {n}?", "answers": [{"text": f"A{n}", "answer_start": 24}]},
            {"id": f"u{n}", "question": f"What is not said {n}?", "answers": [], "is_impossible": True},
        ]}
        for n in range(8)
    ]  # fmt: skip
    squad = tmp_path / "train-v2.0.json"
    squad.write_text(
        json.dumps({"version": "v2.0", "data": [{"title": "Topic (2020 film)", "paragraphs": paragraphs}]})
    )
    fit = prepare_squad(squad, tmp_path / "fit", per_article=3, unanswerable=2, split="fit")
    report = prepare_squad(squad, tmp_path / "report", per_article=3, unanswerable=2, split="report")
    fit_rows, report_rows = (load_qa(devset.questions) for devset in (fit, report))
    assert fit.counts == {"documents": 1, "questions": 5, "factoid": 3, "unanswerable": 2}
    assert not {row.id for row in fit_rows} & {row.id for row in report_rows}  # disjoint questions
    assert (tmp_path / "fit" / "docs" / "Topic_2020_film.txt").read_text().count("Paragraph") == 8
    unanswerable = [row for row in fit_rows if row.meta["kind"] == "unanswerable"]
    assert all(row.answers == [] and row.meta["answerable"] is False for row in unanswerable)
    hotpot = tmp_path / "hotpot.json"
    hotpot.write_text(json.dumps([
        {"_id": f"h{n}", "question": f"Q{n}?", "answer": "yes", "type": "comparison", "level": "easy",
         "supporting_facts": [[f"P{n}", 0], [f"R{n}", 0]],
         "context": [[f"P{n}", ["P says."]], [f"R{n}", ["R says."]], [f"D{n}", ["Distractor."]]]}
        for n in range(4)
    ]))  # fmt: skip
    devset = prepare_hotpot(hotpot, tmp_path / "hotpot", questions=2, split="fit")
    rows = load_qa(devset.questions)
    assert devset.counts["documents"] == 6 and len(rows) == 2
    assert all(len(row.doc_ids) == 2 and (devset.docs / row.doc_ids[0]).is_file() for row in rows)
    musique = tmp_path / "musique.json"
    musique.write_text(json.dumps([
        {"id": f"{hops}hop1__{n}_1", "question": f"M{n}?", "answer": f"A{n}", "answer_aliases": [f"Alias {n}"],
         "answerable": n != 3, "question_decomposition": [],
         "paragraphs": [{"idx": i, "title": f"T{n}-{i}", "paragraph_text": f"T{n}-{i} says.", "is_supporting": i < hops}
                        for i in range(5)] + [{"idx": 5, "title": "Shared", "paragraph_text": f"Shared {n}.", "is_supporting": False}]}
        for n, hops in enumerate((2, 3, 4, 2))
    ]))  # fmt: skip
    halves = [
        prepare_musique(musique, tmp_path / f"mq-{split}", questions=5, split=split)
        for split in ("fit", "report")
    ]
    rows = [row for half in halves for row in load_qa(half.questions)]
    ids = sorted(row.id for row in rows)
    assert ids == ["2hop1__0_1", "3hop1__1_1", "4hop1__2_1"]  # the unanswerable one left out
    assert all(row.answers == [f"A{row.question[1]}", f"Alias {row.question[1]}"] for row in rows)
    assert {row.meta["kind"]: len(row.doc_ids) for row in rows} == {"2hop": 2, "3hop": 3, "4hop": 4}
    assert all(
        (half.docs / doc).is_file()
        for half in halves
        for row in load_qa(half.questions)
        for doc in row.doc_ids
    )
    report = halves[1]
    shared = [f"Shared {row.question[1]}." for row in load_qa(report.questions)]
    assert (report.docs / "Shared.txt").read_text().strip().split("\n\n") == [
        "Shared",
        *shared,
    ]  # one page per title
    with pytest.raises(BadInputError, match="not MuSiQue JSON"):
        prepare_musique(hotpot, tmp_path / "wrong")


def test_a_qa_file_with_its_docs_splits_into_disjoint_halves_that_keep_rows_and_documents(tmp_path):
    from dsarag.corpora.demo_corpus import DEMO_DOCS
    from dsarag.evals.devsets import prepare_qa

    demo_qa = DEMO_DOCS.parent / "qa.jsonl"
    out = tmp_path
    fit, report = (prepare_qa(demo_qa, out / split, split=split) for split in ("fit", "report"))
    fit_rows, report_rows, all_rows = (load_qa(path) for path in (fit.questions, report.questions, demo_qa))
    assert len(fit_rows) + len(report_rows) == len(all_rows) and len(fit_rows) == len(all_rows) // 2
    assert not {row.id for row in fit_rows} & {row.id for row in report_rows}
    original = {row.id: row for row in all_rows}
    assert all(row == original[row.id] for row in fit_rows + report_rows)  # every field kept
    assert sorted(path.name for path in fit.docs.iterdir()) == sorted(
        path.name for path in DEMO_DOCS.iterdir()
    )
    with pytest.raises(MissingInputError, match="no docs/ folder"):
        prepare_qa(fit.docs / "team-page.md", out / "x")  # a file whose folder has no docs/ inside
