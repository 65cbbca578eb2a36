"""Generation: prefill, one-token decode, sampling, and the streaming loop; `Generator` wraps a loaded model."""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from indexer_model.cuda_graph import GraphedDecoder
from indexer_model.dsa import DSAConfig
from indexer_model.gguf_convert import END_OF_TURN_TOKENS
from indexer_model.model import Transformer
from indexer_model.tokenizer import ChatTokenizer
from rag.errors import ModelError


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int  # one-token forward passes (the first new token comes from the prefill)
    stop_reason: str  # "eos" or "max_new_tokens"
    attention: str = "dense"  # which attention the prefill ran: "dense" or "sparse"
    decode_attention: str = "dense"  # and the decode steps
    topk: int | None = None  # the DSA top-k when sparse
    dense_tail: int = 0  # the prompt's last positions that attended densely after a sparse body
    layer_topk: list[int] | None = None  # the keys each layer kept, when the checkpoint spreads k per layer

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_steps else 0.0


def prefill(
    model: Transformer,
    prompt: Tensor,
    input_pos: Tensor,
    dsa: DSAConfig | None = None,
    prompt_end: int | None = None,
) -> Tensor:
    """Run the prompt (B, T) through the model, filling the KV cache; logits (B, V) of its last position.

    With `dsa.dense_tail`, positions from prompt_end - dense_tail on attend densely; prompt_end is where the
    whole prompt ends (by default where this part does: a caller prefilling a prompt in parts passes it).
    The tail still writes its index keys: a later sparse part (the next question after a shared prefix, or a
    sparse decode step) ranks them."""
    n_tokens = prompt.shape[1]
    split = n_tokens  # where the dense tail starts within this part
    if dsa is not None and dsa.dense_tail:
        first = int(input_pos[0])
        end = first + n_tokens if prompt_end is None else prompt_end
        split = min(max(end - dsa.dense_tail - first, 0), n_tokens)
    if split == n_tokens:
        return model(prompt, input_pos, last_logits_only=True, dsa=dsa)[:, -1]
    if split:
        model(prompt[:, :split], input_pos[:split], last_logits_only=True, dsa=dsa)
    tail = slice(split, None)
    return model(prompt[:, tail], input_pos[tail], last_logits_only=True, dsa=dsa.attending_densely())[:, -1]


def decode_one_token(
    model: Transformer, token: Tensor, input_pos: Tensor, dsa: DSAConfig | None = None
) -> Tensor:
    """Logits (B, V) after one token (B, 1) at position `input_pos` (1,); with DSA it selects its top-k
    among every cached position."""
    return model(token, input_pos, last_logits_only=True, dsa=dsa)[:, -1]


# Where a DSA prefill is measured faster than a dense one, per device path: (the shortest prompt, the largest k as a
# share of the prompt); None: slower wherever measured, or not measured. "cpu": the compiled CPU kernels
# (dsarag_kernels/cpu_dsa.py) on a CPU that runs the model in fp32 (docs/dsa-quality.md section 4: k = 512 won at 8K,
# k = 2048 tied at 8K and won at 16K); "cpu-amx": their bf16 kernels on a CPU with AMX, where the model runs in
# bf16 and dense attention is 3-4x faster than in fp32 (k = 3/32 of the prompt, 768 on 8K and 1536 on 16K:
# 0.74-0.91x dense; at an eighth, 0.82-1.10x; docs/benchmarks.md, 'Session 20'; the agent's k stays below 9 % of
# the prompt from 8K on, so `auto` runs DSA there for every task); "cpu-bf16": their AVX512-BF16 kernels where the
# model runs in bf16 without AMX (a Zen 4 EPYC, whose bf16 dense attention has no AMX to run on: 0.76-0.79x dense
# at 4K and 0.50-0.65x from 8K with k up to an eighth of the prompt; docs/benchmarks.md, 'Session 27'; with the
# float32 kernels it already won, 'Session 26'); "cpu-torch": the PyTorch path, where no C++ compiler builds the
# kernels (slower up to 16K); "cuda": the Triton kernels (H100 / H200, up to 128K, end to end; docs/benchmarks.md).
SPARSE_FASTER: dict[str, tuple[int, float] | None] = {
    "cpu": (8192, 1 / 8),
    "cpu-amx": (8192, 3 / 32),
    "cpu-bf16": (4096, 1 / 8),
    "cpu-torch": None,
    "cuda": None,
}
# A DSA decode step was measured at most about a fifth faster than a dense one: 1.13x at 8K and 1.00x at 16K on an
# fp32 CPU, 1.00x at 8K and 0.89x at 16K on an AMX CPU, 0.97x at 8K and 0.78x at 16K on a Zen 4 CPU with the bf16
# kernels (benchmarks/dsa_cpu_decode.py; a step projects the indexer and scores every cached key, where dense
# attention reads 2 kv heads; the weights' products take most of a step), 1.4-1.7x on the H200 with CUDA graphs
# (docs/benchmarks.md, 'Session 28'). So `auto` runs a sparse prefill and decodes densely over the whole cache: about
# as fast at these lengths, exact, and what its NIAH figures were measured with.
SPARSE_DECODE_FASTER = False
# `auto` also runs the prompt's last AUTO_DENSE_TAIL positions densely: the question and the chat template's end,
# whose attention retrieves from the whole context. On 144 NIAH haystacks (questions of 30-34 tokens), with stage 6's
# indexers a sparse prefill lost 16 / 21 of the 400 questions dense answers at k = 2048 / 512, and 7 / 10 with a
# dense tail of 32 (a tail of 128, on a third of them: no better; docs/benchmarks.md, 'Session 15'); with the
# shipped stage 7, 8 / 9 with the tail (docs/dsa-quality.md). The tail reads 32 x (L - k) more keys: 1.4 % more
# attention than a sparse 16K prefill at k = 2048, and its queries skip the index scores.
AUTO_DENSE_TAIL = 32


def auto_dsa(topk: int, dense_threshold: int = DSAConfig.dense_threshold) -> DSAConfig:
    """The DSA `--attention auto` runs at `topk` once it chooses DSA: a sparse prefill with a dense tail, then
    dense decode steps while no sparse one is measured faster."""
    return DSAConfig(
        topk=topk,
        dense_threshold=dense_threshold,
        sparse_decode=SPARSE_DECODE_FASTER,
        dense_tail=AUTO_DENSE_TAIL,
    )


def _device_path(device: str) -> str:
    """The SPARSE_FASTER key of a device: on the CPU, which DSA path runs and in which dtype."""
    if device != "cpu":
        return device
    from dsarag_kernels.cpu_dsa import amx_ready, native_library
    from indexer_model.weights import default_dtype

    if native_library() is None:
        return "cpu-torch"
    if default_dtype("cpu") != torch.bfloat16:
        return "cpu"
    return "cpu-amx" if amx_ready() else "cpu-bf16"


def auto_sparse_range(device: str = "cpu") -> tuple[int, float] | None:
    """Where `--attention auto` runs DSA on `device`: (the shortest prompt, the largest k as a share of it), or
    None where it always runs dense."""
    return SPARSE_FASTER.get(_device_path(device))


def choose_attention(
    mode: str, n_context: int, topk: int | None, has_indexers: bool, device: str = "cpu"
) -> DSAConfig | None:
    """The attention of one generation: None for dense, else the DSA config.

    dense: always dense. sparse: DSA even on short contexts (k below the context length). auto: DSA when a
    trained indexer is attached, the context reaches the dense threshold, and context and k lie where DSA is
    measured faster on `device` (SPARSE_FASTER)."""
    default = DSAConfig()
    if mode == "dense":
        return None
    if mode == "sparse":
        if not has_indexers:
            raise ModelError(
                "no trained indexer for this model — run `dsarag indexer train`, or use --attention dense"
            )
        k = topk or min(default.topk, max(default.n_sink + default.window, n_context // 2))
        return DSAConfig(topk=max(k, default.n_sink + default.window), dense_threshold=0)
    if mode != "auto":
        raise ValueError(f"attention mode {mode!r}: use dense, sparse or auto")
    k = topk or default.topk
    if not has_indexers or k >= n_context or n_context < default.dense_threshold:
        return None
    faster = auto_sparse_range(device)
    if faster is None or n_context < faster[0] or k > n_context * faster[1]:
        return None
    return auto_dsa(k)


def sample(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Next token ids (B,): argmax when temperature == 0, else nucleus sampling at `temperature`."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return sorted_ids.gather(-1, choice).squeeze(-1)


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back incomplete multi-byte characters."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None] | None) -> None:
        self.decode, self.on_text = decode, on_text
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its remaining bytes
            return
        self.flush(text)

    def flush(self, text: str | None = None) -> str:
        text = self.decode(self.ids) if text is None else text
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            if self.on_text is not None:
                self.on_text(text[len(self.emitted) :])
            self.emitted = text
        return text


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    decode: Callable[[list[int]], str],
    stop_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 0.9,
    on_text: Callable[[str], None] | None = None,
    seed: int | None = None,
    dsa: DSAConfig | None = None,
) -> GenerationResult:
    """Prefill the prompt, then decode until a stop token or `max_new_tokens`; `on_text` gets text deltas.
    With `dsa`, the prefill uses DeepSeek Sparse Attention, and so does every decode step unless
    `dsa.sparse_decode` is False. On a GPU the decode steps replay a CUDA graph (`GraphedDecoder`)."""
    device = model.output.weight.device
    prompt_len = len(prompt_ids)
    total = prompt_len + max_new_tokens
    if prompt_len == 0:
        raise ValueError("empty prompt")
    if total > model.args.max_seq_len:
        raise ModelError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{model.args.max_seq_len}; lower the context budget or max_new_tokens"
        )
    model.setup_caches(max_batch_size=1, max_seq_len=total)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stream = TextStream(decode, on_text)

    started = time.perf_counter()
    prompt = torch.tensor([prompt_ids], device=device)
    logits = prefill(model, prompt, torch.arange(prompt_len, device=device), dsa)
    token = sample(logits, temperature, top_p, generator)
    prefill_s = time.perf_counter() - started

    started = time.perf_counter()
    step_dsa = dsa if dsa is not None and dsa.sparse_decode else None
    stop_reason, decode_steps, graphed = "max_new_tokens", 0, None
    for position in range(prompt_len, total):
        token_id = int(token)
        if token_id in stop_ids:
            stop_reason = "eos"
            break
        stream.push(token_id)
        if position == total - 1:
            break
        if device.type == "cuda":
            graphed = graphed or GraphedDecoder(model, 1, position, step_dsa)
            logits = graphed(token.view(1, 1), position)
        else:
            logits = decode_one_token(
                model, token.view(1, 1), torch.tensor([position], device=device), step_dsa
            )
        token = sample(logits, temperature, top_p, generator)
        decode_steps += 1
    text = stream.flush()
    return GenerationResult(
        text=text,
        token_ids=stream.ids,
        prompt_tokens=prompt_len,
        new_tokens=len(stream.ids),
        prefill_s=prefill_s,
        decode_s=time.perf_counter() - started,
        decode_steps=decode_steps,
        stop_reason=stop_reason,
        attention="dense" if dsa is None else "sparse",
        decode_attention="dense" if step_dsa is None else "sparse",
        topk=None if dsa is None else dsa.topk,
        dense_tail=0 if dsa is None else min(dsa.dense_tail, prompt_len),
        layer_topk=None if dsa is None else layer_topk(model, dsa),
    )


def layer_topk(model: Transformer, dsa: DSAConfig) -> list[int] | None:
    """Each layer's k under `dsa` (0 for a layer kept dense), or None when every layer keeps dsa.topk."""
    ks = [
        0 if number in dsa.dense_layers else dsa.for_layer(layer.attention.indexer.topk_scale).topk
        for number, layer in enumerate(model.layers)
    ]
    return None if all(k in (0, dsa.topk) for k in ks) else ks


def stop_token_ids(folder: Path, tokenizer: ChatTokenizer) -> set[int]:
    """EOS ids of config.json and generation_config.json, plus the chat end markers the vocabulary holds."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for token in END_OF_TURN_TOKENS + (tokenizer.special_tokens.get("eos_token", ""),):
        token_id = tokenizer.token_id(token) if token else None
        if token_id is not None:
            ids.add(token_id)
    return ids


class Generator:
    """A loaded generator: model, tokenizer, stop tokens, and how long loading took."""

    def __init__(
        self, name: str, folder: Path, model: Transformer, tokenizer: ChatTokenizer, load_s: float
    ) -> None:
        self.name, self.folder, self.model, self.tokenizer, self.load_s = (
            name,
            folder,
            model,
            tokenizer,
            load_s,
        )
        self.stop_ids = stop_token_ids(folder, tokenizer)
        self.max_context = model.args.max_seq_len
        self.indexer_checkpoint: Path | None = None

    def attach_trained_indexers(self) -> Path | None:
        """Attach the trained indexer checkpoint made for these exact weights, if there is one."""
        from indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint

        folder = find_checkpoint(weights_fingerprint(self.model))
        if folder is not None:
            args = self.model.args
            self.model.attach_indexers(load_checkpoint(folder, args.dim, args.n_layer))
            self.indexer_checkpoint = folder
        return folder

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in the model's chat template, ending with the assistant turn's opening."""
        return self.tokenizer.chat_ids(messages, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def answer(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
        top_p: float = 0.9,
        seed: int | None = 0,
        attention: str = "auto",
        topk: int | None = None,
    ) -> GenerationResult:
        """Generate the assistant's reply; `attention` is dense | sparse | auto (see choose_attention)."""
        prompt_ids = self.chat_prompt_ids(messages)
        device = self.model.tok_embeddings.weight.device.type
        dsa = choose_attention(attention, len(prompt_ids), topk, self.model.has_indexers, device)
        return generate(
            self.model,
            prompt_ids,
            max_new_tokens,
            self.tokenizer.decode,
            self.stop_ids,
            temperature=temperature,
            top_p=top_p,
            on_text=on_text,
            seed=seed,
            dsa=dsa,
        )


def load_generator(
    spec: str | None = None, dtype: torch.dtype | None = None, device: str = "cpu"
) -> Generator:
    """Resolve `spec` (see resolve_model) and load model + tokenizer (dtype None: weights.default_dtype)."""
    from indexer_model.provision import DEFAULT_GENERATOR, registry_model
    from indexer_model.resolve import resolve_model
    from indexer_model.weights import load_model

    started = time.perf_counter()
    folder = resolve_model(spec)
    model = load_model(folder, dtype=dtype, device=device)
    tokenizer = ChatTokenizer(folder)
    registered = registry_model(spec or DEFAULT_GENERATOR)
    name = registered.name if registered is not None else (spec or DEFAULT_GENERATOR)
    generator = Generator(name, folder, model, tokenizer, 0.0)
    generator.attach_trained_indexers()
    generator.load_s = time.perf_counter() - started
    return generator
