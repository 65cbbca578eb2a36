"""Prefill and decode speed of dsarag against llama.cpp on the same GGUF, prompt tokens and threads.

    pip install -e '.[bench]'    # llama-cpp-python, built from source (several minutes on 2 cores)
    .venv/bin/python benchmarks/llama_cpp_decode.py --lengths 128,8192 --threads 2 --repeats 3 --out r.json

llama.cpp reads the registry model's GGUF (`dsarag models pull`) in its own quantized blocks; dsarag loads the bf16
safetensors converted from that GGUF (or float32 where the CPU has no AVX512-BF16) twice: decode steps over the
model's own weights, and over int8 copies (`DSARAG_DECODE_WEIGHTS`). Each run feeds the same token ids (held-out
text: the demo corpus, then Python's argparse.py), prefills them, then decodes `--new-tokens` greedily; the runs
take turns: each repeat prefills the prompt in every engine, then the engines run one greedy decode step each in
turn (the step's argmax included), so a load that comes and goes on a shared machine hits every engine alike. Attention
is dense in both. Reported: median prefill seconds, decode tokens/s as 1 / the median step (all steps of all repeats;
a median, because bursts of other work on a shared machine stretch some steps by 10-100x), and the load average
around each length.

A CPU without AVX-512 (most laptops: AVX2, FMA, F16C), emulated on a bigger one: cap both engines' instruction sets,

    DSARAG_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        PYTHONPATH=/path/to/llama-avx2 .venv/bin/python benchmarks/llama_cpp_decode.py ...

with llama-cpp-python built AVX2-only into its own folder (docs/benchmarks.md has the build command). The run refuses
a cap that is not complete (PyTorch's kernels or llama.cpp's build still on AVX-512) and records the caps it ran under.
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
from dsarag.indexer_model.generate import decode_one_token, prefill, sample
from dsarag.indexer_model.provision import registry_model
from dsarag.indexer_model.resolve import resolve_model
from dsarag.indexer_model.tokenizer import ChatTokenizer
from dsarag.indexer_model.weights import default_dtype, load_model
from dsarag.kernels.cpu_dsa import cpu_isa

DEMO_DOCS = Path(__file__).resolve().parents[1] / "corpora" / "demo" / "docs"
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
# What caps PyTorch's own kernels (ATen, oneDNN, MKL) to AVX2, read when they first run: set before starting Python.
TORCH_AVX2_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


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
        from llama_cpp import Llama, llama_print_system_info

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
        self.system_info, self.library = (
            llama_print_system_info().decode().strip(),
            Path(bindings.__file__).parent,
        )
        self.token = 0

    def next_token(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def prefill(self, ids: list[int], new_tokens: int) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        self.token = self.next_token()

    def step(self) -> None:
        self.llm.eval([self.token])
        self.token = self.next_token()


def isa_caps(llama: LlamaCpp | None) -> dict:
    """The instruction sets each engine ran with; under DSARAG_CPU_ISA=avx2, refuse a cap one engine does not honour."""
    caps = {
        "DSARAG_CPU_ISA": cpu_isa(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{name: os.environ.get(name) for name in TORCH_AVX2_CAPS},
        "llama_cpp_system_info": llama and llama.system_info,
        "llama_cpp_library": llama and str(llama.library),
    }
    if caps["DSARAG_CPU_ISA"] != "avx2":
        return caps
    torch_capped = all(caps[name] == value for name, value in TORCH_AVX2_CAPS.items())
    if not torch_capped or caps["torch_cpu_capability"] != "AVX2":
        settings = " ".join(f"{name}={value}" for name, value in TORCH_AVX2_CAPS.items())
        raise SystemExit(
            f"DSARAG_CPU_ISA=avx2 caps dsarag's own kernels only: set {settings} as well (PyTorch's kernels run"
            f" {caps['torch_cpu_capability']})"
        )
    if llama is not None and ("AVX512" in llama.system_info or "AVX2 = 1" not in llama.system_info):
        raise SystemExit(
            f"DSARAG_CPU_ISA=avx2, but the llama.cpp in {llama.library} says {llama.system_info!r}: put an"
            " AVX2-only build of llama-cpp-python first on PYTHONPATH (docs/benchmarks.md)"
        )
    return caps


class Dsarag:
    def __init__(self, folder: Path, decode_weights: str) -> None:
        self.name = f"dsarag {decode_weights}"
        self.model = load_model(folder, decode_weights=decode_weights)
        self.token, self.position = torch.zeros(1, 1, dtype=torch.long), 0

    @torch.inference_mode()
    def prefill(self, ids: list[int], new_tokens: int) -> None:
        """As `generate` runs a prompt: caches for the prompt and the new tokens, the first token from the prefill."""
        self.model.setup_caches(max_batch_size=1, max_seq_len=len(ids) + new_tokens)
        logits = prefill(self.model, torch.tensor([ids]), torch.arange(len(ids)))
        self.token, self.position = sample(logits).view(1, 1), len(ids)

    @torch.inference_mode()
    def step(self) -> None:
        """One of `generate`'s CPU decode steps: the token at the next position, then its greedy successor."""
        logits = decode_one_token(self.model, self.token, torch.tensor([self.position]))
        self.token, self.position = sample(logits).view(1, 1), self.position + 1


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
        default="off" if "amx_int8" in cpu_description()["flags"] and cpu_isa() == "native" else "on",
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
    engines = []
    if "llama.cpp" in wanted:
        context = max(lengths) + args.new_tokens + 8
        engines.append(LlamaCpp(gguf, context, args.threads, args.llama_extra_buffers == "on"))
    caps = isa_caps(engines[0] if engines else None)
    engines += [Dsarag(folder, choice) for choice in ("model", "int8") if choice in wanted]

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_description(),
        "isa_caps": caps,
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
        prefills = {engine.name: [] for engine in engines}
        steps = {engine.name: [] for engine in engines}
        for (
            engine
        ) in engines:  # warm-up: first-call costs (kernel builds, allocations) stay out of the medians
            engine.prefill(ids[:64], 4)
            engine.step()
        for _ in range(args.repeats):
            for engine in engines:
                started = time.perf_counter()
                engine.prefill(ids, args.new_tokens)
                prefills[engine.name].append(time.perf_counter() - started)
            for _ in range(args.new_tokens - 1):
                for engine in engines:
                    started = time.perf_counter()
                    engine.step()
                    steps[engine.name].append(time.perf_counter() - started)
            print(
                f"  {length}: "
                + ", ".join(
                    f"{n} {1 / statistics.median(s[-args.new_tokens + 1 :]):.2f} tok/s"
                    for n, s in steps.items()
                ),
                flush=True,
            )
        for engine in engines:
            row = {
                "engine": engine.name,
                "prompt_tokens": length,
                "prefill_s": statistics.median(prefills[engine.name]),
                "decode_tokens_per_s": 1 / statistics.median(steps[engine.name]),
                "decode_step_ms_quartiles": [1000 * q for q in statistics.quantiles(steps[engine.name], n=4)],
                "load_average": [load_before, os.getloadavg()[0]],
            }
            report["rows"].append(row)
            print(
                f"{length:>6} {engine.name:<14} prefill {row['prefill_s']:7.2f} s  decode {row['decode_tokens_per_s']:6.2f}"
                f" tok/s  (load {load_before:.1f} → {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
