"""Crash trials: `dsarag ingest` SIGKILLed at random moments, the store checked after every kill and after the
rerun (rag/crash_harness.py). The recorded run in docs/reliability.md:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/crash_trials.py --trials 20 --max-kills 3 --out crash.json
"""

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from dsarag.rag.crash_harness import reference_run, run_trial
from dsarag.rag.embed import load_embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-kills", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(1)
    embedder = load_embedder()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        reference = reference_run(Path(tmp))
        print(
            f"reference: {len(reference.ids)} chunks, {reference.commits} commits, longest gap {reference.gap_s:.2f} s",
            flush=True,
        )
        trials = []
        for seed in range(options.first_seed, options.first_seed + options.trials):
            trial = run_trial(Path(tmp), reference, embedder, seed, options.max_kills)
            trials.append(trial)
            print(
                f"trial {seed:3d} {trial.mode:6s} kills after (commits, s) {trial.kill_points} → generations "
                f"{trial.killed_at_generation}, commits of the killed runs {trial.commits_before_kill}, leftovers seen {trial.leftovers_seen}: "
                f"{'ok' if trial.ok else trial.problems}",
                flush=True,
            )
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        "trials": len(trials),
        "trials_ok": sum(trial.ok for trial in trials),
        "kills": sum(len(trial.commits_before_kill) for trial in trials),
        "kills_before_the_first_commit_of_the_run": sum(
            commits == 0 for trial in trials for commits in trial.commits_before_kill
        ),
        "kills_after_one_or_more_commits": sum(
            commits > 0 for trial in trials for commits in trial.commits_before_kill
        ),
        "runs_that_finished_before_their_kill": sum(trial.finished_before_kill for trial in trials),
        "kills_that_left_half_written_files": sum(trial.leftovers_seen for trial in trials),
        "reference_chunks": len(reference.ids),
        "reference_commits": reference.commits,
        "seconds": round(time.monotonic() - started, 1),
        "results": [trial.to_json() for trial in trials],
    }
    print(json.dumps({key: value for key, value in summary.items() if key != "results"}, indent=2))
    if options.out:
        options.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
