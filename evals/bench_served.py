"""`dsarag bench --model openai:…`: a served model's latency across prompt lengths, from the client's side.

For each length L, a prompt of about L tokens (the demo corpus' text, repeated; exact where the served model's
tokenizer is on this machine) is sent `repeats` times with greedy decoding and streamed: time to the first text,
decode tokens/s after it, and the tokens `usage` reports. Medians of the repeats. Beside them, the analytic
dense and sparse FLOPs of the prefill where the architecture is known (rag/served_models.py).
"""

import statistics

from dsarag.corpora.demo_corpus import DEMO_DOCS
from dsarag.rag.cost import prefill_cost
from dsarag.rag.remote_generator import RemoteGenerator
from dsarag.rag.served_models import served_architecture

INSTRUCTION = "Summarize the notes above in one sentence."


def prompt_of(generator: RemoteGenerator, length: int) -> str:
    """About `length` tokens of real text (the instruction after it is not counted)."""
    text = "\n\n".join(path.read_text() for path in sorted(DEMO_DOCS.glob("*.md")))
    while generator.count_tokens(text) < length:
        text += "\n\n" + text
    if generator.tokenizer is not None:
        return generator.tokenizer.decode(generator.tokenizer.encode(text)[:length])
    return text[: int(length * len(text) / generator.count_tokens(text))]


def bench_served(generator: RemoteGenerator, lengths: list[int], new_tokens: int, repeats: int) -> dict:
    architecture = served_architecture(generator.served_model)
    rows = []
    for length in lengths:
        messages = [{"role": "user", "content": f"{prompt_of(generator, length)}\n\n{INSTRUCTION}"}]
        runs = [generator.answer(messages, max_new_tokens=new_tokens) for _ in range(repeats)]
        row = {
            "length": length,
            "prompt_tokens": runs[0].prompt_tokens,
            "new_tokens": statistics.median(run.new_tokens for run in runs),
            "first_text_s": statistics.median(run.prefill_s for run in runs),
            "decode_tokens_per_s": statistics.median(run.decode_tokens_per_s for run in runs),
            "attention": runs[0].attention,
        }
        if architecture is not None:
            dense = prefill_cost(architecture.shape, runs[0].prompt_tokens, None)
            sparse = prefill_cost(architecture.shape, runs[0].prompt_tokens, architecture.topk)
            row["analytic_prefill_flop_ratio"] = dense.flops / sparse.flops
        rows.append(row)
    return {
        "model": generator.served_model,
        "endpoint": generator.endpoint.base_url,
        "architecture": architecture.name if architecture else "unknown",
        "repeats": repeats,
        "rows": rows,
    }
