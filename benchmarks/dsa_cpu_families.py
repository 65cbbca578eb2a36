"""The compiled CPU kernels' families side by side on one layer's real DSA inputs, on any CPU.

`capture` (needs the default model) runs a prefill of held-out text up to one layer and saves that layer's DSA
inputs: the attention's q, k, v and the indexer's q, w, k, in bf16. `time` loads them and times the selection and
the gather attention over the selected keys on every kernel family this CPU runs (AMX, AVX512-BF16, float32), so a
machine without the model (the `device` host's AMX Xeon) compares them on real selections, whose neighbouring
queries share keys, unlike random ones. About 24 MB at 8K.

    .venv/bin/python benchmarks/dsa_cpu_families.py capture --heldout ids.npy --length 8192 --layer 9 --topk 768 \
        --out layer9.pt
    python benchmarks/dsa_cpu_families.py time layer9.pt --threads 2
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsarag.indexer_model.cpu_families import capture, time_families  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    take = commands.add_parser("capture", help="save one layer's DSA inputs (needs the default model)")
    take.add_argument("--heldout", type=Path, required=True, help="held-out token ids (.npy)")
    take.add_argument("--length", type=int, default=8192)
    take.add_argument("--layer", type=int, default=9)
    take.add_argument("--topk", type=int, default=768)
    take.add_argument("--out", type=Path, required=True)
    timing = commands.add_parser("time", help="time every kernel family this CPU runs on saved inputs")
    timing.add_argument("inputs", type=Path)
    timing.add_argument("--threads", type=int, default=2)
    timing.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    if args.command == "capture":
        capture(np.load(args.heldout), args.length, args.layer, args.topk, args.out)
        return
    rows = time_families(args.inputs, args.threads)
    print("| family | select s | attention s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['select_s']} | {row['attention_s']} |")
    if args.out:
        args.out.write_text(json.dumps({"inputs": str(args.inputs), "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
