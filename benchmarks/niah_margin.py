"""How close one NIAH question is: the first answer token's top probabilities, dense against DSA.

    .venv/bin/python benchmarks/niah_margin.py --niah niah-default.json --length 32758 --variant 2 --depth 0.5

The case comes from a file written by `benchmarks/dsa_quality.py prepare`; the haystack and the question are
prefilled as the NIAH run does, and the probabilities of the next token after the answer's lead-in are printed
for each mode. A question dense answers with its right and a wrong needle's value nearly tied is one any small
perturbation flips (docs/dsa-quality.md, Notes).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dsa_quality import load_base_model, load_trained_indexers  # noqa: E402
from dsarag.evals.niah import NiahCase  # noqa: E402
from dsarag.indexer_model.dsa import DSAConfig  # noqa: E402
from dsarag.indexer_model.resolve import resolve_model  # noqa: E402
from dsarag.indexer_model.tokenizer import ChatTokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--niah", type=Path, required=True, help="cases written by dsa_quality.py prepare")
    parser.add_argument("--length", type=int, required=True, help="the case's length in tokens")
    parser.add_argument("--variant", type=int, required=True)
    parser.add_argument("--depth", type=float, required=True, help="the needle asked for")
    parser.add_argument("--topks", default="2048", help="comma-separated DSA top-k values beside dense")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()

    spec = json.loads(options.niah.read_text())
    chosen = [
        c
        for c in spec["cases"]
        if c["length"] == options.length and c["meta"].get("variant") == options.variant
    ]
    if not chosen:
        sys.exit(f"{options.niah}: no case of length {options.length}, variant {options.variant}")
    case = NiahCase.from_json(chosen[0])
    tokenizer = ChatTokenizer(resolve_model(options.model))
    model = load_base_model(options.model, options.device, None)
    model.attach_indexers(load_trained_indexers(model, None)[0])
    asked = [i for i, needle in enumerate(case.needles) if needle.depth == options.depth]
    if not asked:
        sys.exit(f"no needle at depth {options.depth}: the case has {[n.depth for n in case.needles]}")
    print("needles", [(needle.depth, needle.value) for needle in case.needles], flush=True)
    # The answer's lead-in ends at "... is"; the value's first digit follows a space token.
    ids = case.prefix_ids + case.question_ids[asked[0]] + tokenizer.encode(" ")[-1:]
    modes = [("dense", None)] + [
        (f"dsa-{k}", DSAConfig(topk=int(k), dense_threshold=0)) for k in options.topks.split(",")
    ]
    for name, dsa in modes:
        model.setup_caches(1, len(ids) + 1)
        with torch.inference_mode():
            logits = model(
                torch.tensor([ids], device=options.device),
                torch.arange(len(ids), device=options.device),
                last_logits_only=True,
                dsa=dsa,
            )
        top = logits[0, -1].float().softmax(-1).topk(5)
        pairs = [
            (tokenizer.decode([int(i)]), round(float(p), 3))
            for p, i in zip(top.values, top.indices, strict=True)
        ]
        print(name, pairs, flush=True)


if __name__ == "__main__":
    main()
