"""Does decoding over int8 weights change what the model says? Held-out NLL and greedy answers, model weights
against int8 copies, through the real decode steps.

    .venv/bin/python benchmarks/int8_decode_quality.py --model default [--windows 6 --scored 128]

NLL: windows of held-out text (the demo corpus, then Python's own argparse.py and textwrap.py: nothing here tuned
the kernels); each window's first tokens are prefilled once, then its last `scored` tokens are fed one decode step
at a time (teacher forcing) with the model's own weights and again with int8 copies, so each token's NLL comes from
exactly the products a decode step runs. Greedy: the demo questions with their source document, 48 new tokens under
each, compared token by token.
"""

import argparse
import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsarag.indexer_model.generate import generate, load_generator
from dsarag.kernels.backend import resolve_backend

DEMO = Path(__file__).resolve().parents[1] / "corpora" / "demo"


def held_out_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [path.read_text() for path in sorted((DEMO / "docs").glob("*.md"))]
    parts += [(stdlib / name).read_text() for name in ("argparse.py", "textwrap.py")]
    return "\n\n".join(parts)


@torch.inference_mode()
def teacher_forced_nll(model, ids: list[int], scored: int, backends: dict) -> dict:
    """Per backend: summed NLL of the last `scored` tokens of `ids`, each predicted by one decode step, and each
    step's argmax (to compare the choices)."""
    prefix = len(ids) - scored
    model.setup_caches(1, len(ids))
    model(torch.tensor([ids[:prefix]]), torch.arange(prefix))  # the cache before the scored tokens, shared
    results = {}
    for name, backend in backends.items():
        model.use_backend(backend)
        nll, choices = 0.0, []
        for position in range(prefix - 1, len(ids) - 1):  # rewrites the cache from prefix - 1 on
            logits = model(torch.tensor([[ids[position]]]), torch.tensor([position]))[0, -1].float()
            nll += float(F.cross_entropy(logits[None], torch.tensor([ids[position + 1]])))
            choices.append(int(logits.argmax()))
        results[name] = {"nll": nll, "choices": choices}
    model.clear_caches()
    return results


def greedy_answers(generator, backends: dict, n_questions: int, new_tokens: int) -> dict:
    questions = [json.loads(line) for line in (DEMO / "qa.jsonl").read_text().splitlines()][:n_questions]
    prompts = []
    for item in questions:
        source = (DEMO / item["source"]).read_text()[:6000]
        messages = [
            {"role": "system", "content": "Answer from the document, in one sentence."},
            {"role": "user", "content": f"Document:\n{source}\n\nQuestion: {item['question']}"},
        ]
        prompts.append(generator.chat_prompt_ids(messages))
    answers = {}
    for name, backend in backends.items():
        generator.model.use_backend(backend)
        answers[name] = [
            generate(generator.model, prompt, new_tokens, generator.tokenizer.decode, set()).token_ids
            for prompt in prompts
        ]
    return answers


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--window", type=int, default=1024, help="tokens per window")
    parser.add_argument(
        "--scored", type=int, default=128, help="last tokens of a window scored by decode steps"
    )
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = load_generator(args.model)
    dtype = generator.model.output.weight.dtype
    backends = {choice: resolve_backend("cpu", dtype, decode_weights=choice) for choice in ("model", "int8")}
    ids = generator.tokenizer.encode(held_out_text())
    starts = np.linspace(0, len(ids) - args.window, args.windows).astype(int)
    windows = [
        teacher_forced_nll(generator.model, ids[s : s + args.window], args.scored, backends) for s in starts
    ]
    tokens = args.windows * args.scored
    report = {"model": generator.name, "dtype": str(dtype), "scored_tokens": tokens}
    for name in backends:
        mean = sum(w[name]["nll"] for w in windows) / tokens
        per_window = [w[name]["nll"] / args.scored for w in windows]
        report[f"nll_{name}"] = mean
        report[f"ppl_{name}"] = math.exp(mean)
        report[f"nll_per_window_{name}"] = per_window
    same = sum(
        a == b for w in windows for a, b in zip(w["model"]["choices"], w["int8"]["choices"], strict=True)
    )
    report["argmax_agreement"] = same / tokens

    answers = greedy_answers(generator, backends, args.questions, args.new_tokens)
    pairs = list(zip(answers["model"], answers["int8"], strict=True))
    report["greedy_identical"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    report["greedy_common_prefix"] = [common_prefix(a, b) for a, b in pairs]
    report["greedy_texts"] = {
        name: [generator.tokenizer.decode(tokens) for tokens in answers[name]] for name in answers
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
