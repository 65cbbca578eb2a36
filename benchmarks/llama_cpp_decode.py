"""Prefill and decode speed of dsarag against llama.cpp on the same GGUF, prompt tokens and threads.

    pip install -e '.[bench]'    # llama-cpp-python, built from source (several minutes on 2 cores)
    .venv/bin/python benchmarks/llama_cpp_decode.py --lengths 128,8192 --threads 2 --repeats 3 --out r.json

llama.cpp reads the registry model's GGUF (`dsarag models pull`) in its own quantized blocks; dsarag loads the bf16
safetensors converted from that GGUF (or float32 where the CPU has no AVX512-BF16) twice: decode steps over the
model's own weights, and over int8 copies (`DSARAG_DECODE_WEIGHTS`). Each run feeds the same token ids (held-out
text: the demo corpus, then Python's argparse.py), prefills them, then decodes `--new-tokens` greedily; the runs
take turns within each repeat, so a load that comes and goes on a shared machine hits every engine alike. Attention
is dense in both. Reported: median prefill seconds and median decode tokens/s (decode steps / their seconds, the
sampling of each token included), and the load average around each length.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from dsarag.base.paths import cache_dir
from dsarag.indexer_model.generate import generate
from dsarag.indexer_model.provision import registry_model
from dsarag.indexer_model.resolve import resolve_model
from dsarag.indexer_model.tokenizer import ChatTokenizer
from dsarag.indexer_model.weights import default_dtype, load_model

DEMO_DOCS = Path(__file__).resolve().parents[1] / "corpora" / "demo" / "docs"
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def prompt_ids(tokenizer, length: int) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join(
        [*(p.read_text() for p in sorted(DEMO_DOCS.glob("*.md"))), (stdlib / "argparse.py").read_text()]
    )
    ids = tokenizer.encode(text)
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def cpu_description() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "")
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    return {"model": model or platform.processor(), "flags": [f for f in FLAGS_THAT_MATTER if f in flags]}


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf: Path, context: int, threads: int, extra_buffers: bool) -> None:
        import llama_cpp.llama_cpp as bindings
        from llama_cpp import Llama

        defaults = bindings.llama_model_default_params

        def model_params():  # Llama() takes no use_extra_bufts: set it where it reads the defaults
            params = defaults()
            params.use_extra_bufts = extra_buffers
            return params

        bindings.llama_model_default_params = model_params
        self.llm = Llama(
            str(gguf),
            n_ctx=context,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            logits_all=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def next_token(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
        """(prefill s, decode s, decode steps), as dsarag's generate counts them."""
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        token = self.next_token()
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([token])
            token = self.next_token()
        return prefill_s, time.perf_counter() - started, new_tokens - 1


class Dsarag:
    def __init__(self, folder: Path, tokenizer, decode_weights: str) -> None:
        self.name = f"dsarag {decode_weights}"
        self.model = load_model(folder, decode_weights=decode_weights)
        self.tokenizer = tokenizer

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
        result = generate(self.model, ids, new_tokens, self.tokenizer.decode, set())
        return result.prefill_s, result.decode_s, result.decode_steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="a registry generator with a GGUF source")
    parser.add_argument("--lengths", default="128,8192", help="prompt tokens, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="llama.cpp,model,int8", help="llama.cpp, model, int8")
    parser.add_argument(
        "--llama-extra-buffers",
        choices=("on", "off"),
        default="off" if "amx_int8" in cpu_description()["flags"] else "on",
        help="llama.cpp's repacked weight buffers; off on AMX CPUs, where its AMX product crashed (0.3.36)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    registered = registry_model(args.model)
    if registered is None or not registered.is_gguf:
        raise SystemExit(f"{args.model}: not a registry model with a GGUF source; use default or smollm2")
    gguf = cache_dir() / "models" / registered.name / "source" / f"{registered.name}.gguf"
    if not gguf.exists():
        raise SystemExit(f"{gguf}: missing; run `dsarag models pull {registered.name}`")

    folder = resolve_model(registered.name)
    tokenizer = ChatTokenizer(folder)
    wanted = args.engines.split(",")
    engines = [Dsarag(folder, tokenizer, choice) for choice in ("model", "int8") if choice in wanted]
    if "llama.cpp" in wanted:
        context = max(lengths) + args.new_tokens + 8
        engines.insert(0, LlamaCpp(gguf, context, args.threads, args.llama_extra_buffers == "on"))

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_description(),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "dsarag_dtype": str(default_dtype("cpu")),
        "gguf": gguf.name,
        "llama_extra_buffers": args.llama_extra_buffers,
        "rows": [],
    }
    for length in lengths:
        ids = prompt_ids(tokenizer, length)
        load_before = os.getloadavg()[0]
        runs = {engine.name: [] for engine in engines}
        for (
            engine
        ) in engines:  # warm-up: first-call costs (kernel builds, allocations) stay out of the medians
            engine.run(ids[:64], 4)
        for _ in range(args.repeats):
            for engine in engines:
                prefill_s, decode_s, steps = engine.run(ids, args.new_tokens)
                runs[engine.name].append((prefill_s, decode_s, steps))
                print(
                    f"  {length} {engine.name}: {prefill_s:.2f} s, {steps / decode_s:.2f} tok/s", flush=True
                )
        for name, measured in runs.items():
            row = {
                "engine": name,
                "prompt_tokens": length,
                "prefill_s": statistics.median(p for p, _, _ in measured),
                "decode_tokens_per_s": statistics.median(steps / s for _, s, steps in measured),
                "decode_tokens_per_s_all": [steps / s for _, s, steps in measured],
                "load_average": [load_before, os.getloadavg()[0]],
            }
            report["rows"].append(row)
            print(
                f"{length:>6} {name:<14} prefill {row['prefill_s']:7.2f} s  decode {row['decode_tokens_per_s']:6.2f}"
                f" tok/s  (load {load_before:.1f} → {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
