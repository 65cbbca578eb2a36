"""`dsarag eval run SUITE`: check the options, run the suite (resumably), test its thresholds, write reports."""

import time
from dataclasses import replace

from rich.console import Console

from dsarag.base.errors import BadInputError
from dsarag.evals.report import write_reports
from dsarag.evals.run import (
    EvalOptions,
    ItemLog,
    SuiteRun,
    Threshold,
    check_thresholds,
    parse_threshold,
    summarize,
)
from dsarag.evals.suites import SUITES
from dsarag.rag.ask import READERS
from dsarag.rag.remote_endpoint import is_remote_spec

ATTENTION_MODES = ("dense", "sparse", "auto")


def suite_thresholds(suite_name: str, overrides: list[str]) -> list[Threshold]:
    """The suite's default rules, each replaced by an override on the same metric; "none" drops them all."""
    if overrides == ["none"]:
        return []
    rules = {rule.metric: rule for rule in map(parse_threshold, SUITES[suite_name].THRESHOLDS)}
    rules |= {rule.metric: rule for rule in map(parse_threshold, overrides)}
    return list(rules.values())


def check_options(options: EvalOptions) -> None:
    """Fail on bad options before any model or data is loaded."""
    if options.suite not in SUITES and options.suite != "all":
        raise BadInputError(f"unknown suite {options.suite!r}: use one of {', '.join(SUITES)} or all")
    if options.limit is not None and options.limit < 1:
        raise BadInputError(f"--limit {options.limit}: use a positive number of items")
    if options.repeats < 1:
        raise BadInputError(f"--repeats {options.repeats}: use 1 or more")
    if options.concurrency is not None and options.concurrency < 1:
        raise BadInputError(f"--concurrency {options.concurrency}: use 1 or more")
    if options.in_flight() > 1 and not is_remote_spec(options.model):
        raise BadInputError(
            f"--concurrency {options.concurrency}: a model in this process answers one question at a time — "
            "serve it (`dsarag serve`) and pass --model openai:http://127.0.0.1:PORT/v1"
        )
    if options.context_tokens < 64:
        raise BadInputError(
            f"--context-tokens {options.context_tokens}: give at least 64 tokens for the sources"
        )
    if options.attention not in ATTENTION_MODES:
        raise BadInputError(f"--attention {options.attention!r}: use one of {', '.join(ATTENTION_MODES)}")
    if options.reader not in READERS:
        raise BadInputError(f"--reader {options.reader!r}: use one of {', '.join(READERS)}")
    if any(length < 64 for length in options.lengths or []):
        raise BadInputError(f"--lengths {options.lengths}: context lengths start at 64 tokens")
    if any(not 0 <= depth <= 1 for depth in options.depths or []):
        raise BadInputError(f"--depths {options.depths}: depths are shares of the haystack, from 0 to 1")
    if any(k < 1 for k in options.topks or []):
        raise BadInputError(f"--topks {options.topks}: top-k values are positive")
    for path, what in ((options.data, "--data"), (options.corpus, "--corpus")):
        if path is not None and not path.exists():
            raise BadInputError(f"{what} {path}: not found — pass an existing file or folder", path)
    for rule in options.thresholds:
        if rule != "none":
            parse_threshold(rule)


def run_suite(options: EvalOptions, console: Console) -> dict:
    """Run one suite into `<out>/<suite>/`; the summary (metrics, thresholds, passed) it also wrote there."""
    check_options(options)
    suite = SUITES[options.suite]
    thresholds = suite_thresholds(options.suite, options.thresholds)
    folder = options.out / suite.NAME
    log = ItemLog(folder, options.fingerprint(), options.fresh)
    if log.done:
        console.log(f"resuming: {len(log.done)} items already done in {log.path}")
    started = time.perf_counter()
    run = SuiteRun(options, folder, log, console)
    result = suite.run(run)
    summary = summarize(options, suite.NAME, result, check_thresholds(result.metrics, thresholds), time.perf_counter() - started)  # fmt: skip
    if run.computed:
        summary["throughput"] = {
            "items": run.computed,
            "seconds": round(run.compute_s, 2),
            "items_per_s": round(run.computed / run.compute_s, 3),
            "in_flight": options.in_flight(),
        }
    summary["files"] = [str(path) for path in write_reports(folder, summary)] + [str(folder / name) for name in result.plots]  # fmt: skip
    return summary


def run_suites(options: EvalOptions, console: Console) -> list[dict]:
    """One suite, or every suite in turn for "all" (each with the same options)."""
    check_options(options)
    names = list(SUITES) if options.suite == "all" else [options.suite]
    return [run_suite(replace(options, suite=name), console) for name in names]
