"""Crash safety: `dsarag ingest` SIGKILLed at random moments (fresh and updating runs) leaves a consistent
store after every kill, and the rerun ends with exactly the chunks of a clean run (rag/crash_harness.py;
benchmarks/crash_trials.py runs the recorded ≥ 20 trials)."""

import pytest

from dsarag.rag.crash_harness import reference_run, run_trial, write_corpus
from dsarag.rag.store import ChunkStore
from dsarag.rag.store_check import check_store

pytestmark = pytest.mark.slow

CI_TRIALS = 3


def test_random_sigkills_never_lose_or_duplicate_chunks(tmp_path, embedder):
    reference = reference_run(tmp_path)
    assert len(reference.ids) > 60 and reference.commits > 5 and reference.gap_s > 0
    trials = [run_trial(tmp_path, reference, embedder, seed, max_kills=1) for seed in range(CI_TRIALS)]
    assert [trial.problems for trial in trials] == [[]] * CI_TRIALS
    assert {trial.mode for trial in trials} == {"fresh", "update"}  # seeds 0-2 cover both kinds of run
    assert all(trial.chunks == len(reference.ids) for trial in trials)


def test_the_checker_catches_a_duplicated_chunk_and_a_miscounted_source(tmp_path, embedder):
    """The harness is only as good as its checker: it must fail on the damage a bad crash would leave."""
    from dsarag.rag.crash_harness import ingest, options

    store = ChunkStore(tmp_path / "store")
    ingest(write_corpus(tmp_path / "corpus"), store, embedder, options())
    assert check_store(store).ok
    manifest = store.read_manifest()
    again = store.read_chunks(manifest).slice(0, 3)  # three chunks committed a second time
    store.commit_batch(manifest, again, set())
    problems = check_store(store).problems
    assert any("stored twice" in problem.message for problem in problems)
    assert any(problem.part == "chunks" and problem.file.endswith(".md") for problem in problems)
