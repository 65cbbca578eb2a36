"""No-orphan trials: `dsarag ingest` killed at a random moment after its read/chunk workers and the
multiprocessing resource tracker started; a trial passes when none of its processes is alive 10 s later
(rag/parent_death.py; the trial helpers are rag/orphan_harness.py). Linux (reads /proc). The recorded run in
docs/reliability.md:

    .venv/bin/python benchmarks/orphan_trials.py --trials 20
"""

import argparse
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

from dsarag.rag.orphan_harness import (
    GONE_WITHIN_S,
    ingest_command,
    kill_while_working,
    wait_until_gone,
    write_documents,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--signal", default="SIGKILL", help="SIGKILL, SIGTERM, …")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--max-delay", type=float, default=6.0, help="kill up to this long after workers run")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    kill_signal = signal.Signals[options.signal]
    rng = random.Random(options.seed)
    clean = 0
    with tempfile.TemporaryDirectory() as tmp:
        docs = write_documents(Path(tmp) / "docs", options.documents)
        for trial in range(options.trials):
            store = Path(tmp) / "store"
            shutil.rmtree(store, ignore_errors=True)
            delay_s = rng.uniform(0, options.max_delay)
            command = ingest_command(docs, store, options.workers, 1024)
            processes = kill_while_working(command, store, options.workers, kill_signal, False, delay_s)
            killed = time.monotonic()
            left = wait_until_gone(processes, GONE_WITHIN_S)
            gone_s = time.monotonic() - killed
            clean += not left
            print(
                f"trial {trial}: {kill_signal.name} {delay_s:.1f} s after the workers ran; {len(processes)} processes "
                f"below it, " + (f"LEFT ALIVE: {left}" if left else f"all gone after {gone_s:.1f} s"),
                flush=True,
            )
            for pid in left:  # do not let a failed trial's processes pile up
                os.kill(pid, signal.SIGKILL)
    print(f"{clean}/{options.trials} trials left no process behind")


if __name__ == "__main__":
    main()
