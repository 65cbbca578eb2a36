"""Generation: prefill, one-token decode, sampling, and the streaming loop; `Generator` wraps a loaded model."""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dsarag.base.errors import ModelError
from dsarag.indexer_model.attention_policy import choose_attention
from dsarag.indexer_model.cuda_graph import GraphedDecoder
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.gguf_convert import END_OF_TURN_TOKENS
from dsarag.indexer_model.model import Transformer
from dsarag.indexer_model.tokenizer import ChatTokenizer


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
    backend: str = "torch"  # the model's AttentionBackend (dsarag_kernels/backend.py)

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
    constrain: Callable[[list[int], Tensor], Tensor] | None = None,
    after_prefill: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Prefill the prompt, then decode until a stop token or `max_new_tokens`; `on_text` gets text deltas.
    With `dsa`, the prefill uses DeepSeek Sparse Attention, and so does every decode step unless
    `dsa.sparse_decode` is False. On a GPU the decode steps replay a CUDA graph (`GraphedDecoder`).
    `constrain(ids so far, logits (V,))` returns the logits to sample from (e.g. -inf outside the tokens
    a copy of the sources allows). `after_prefill()` returning True stops before the first token (stop
    reason "declined": e.g. the answerability probe's verdict on the prefill)."""
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
    if constrain is not None:
        logits = constrain(stream.ids, logits[0])[None]
    token = sample(logits, temperature, top_p, generator)
    prefill_s = time.perf_counter() - started

    started = time.perf_counter()
    step_dsa = dsa if dsa is not None and dsa.sparse_decode else None
    stop_reason, decode_steps, graphed = "max_new_tokens", 0, None
    positions = range(prompt_len, total)
    if after_prefill is not None and after_prefill():
        stop_reason, positions = "declined", range(0)
    for position in positions:
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
        if constrain is not None:
            logits = constrain(stream.ids, logits[0])[None]
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
        backend=model.attention_backend().name,
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
        from dsarag.indexer_model.checkpoint import find_checkpoint, load_checkpoint, weights_fingerprint

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

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.chat_prompt_ids(messages))

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
        reply_start: str = "",
        constrain: Callable[[list[int], Tensor], Tensor] | None = None,
        after_prefill: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate the assistant's reply; `attention` is dense | sparse | auto (attention_policy.choose_attention).
        `reply_start` is text the reply begins with (not returned); `constrain` and `after_prefill` as in
        `generate`."""
        prompt_ids = self.chat_prompt_ids(messages) + (
            self.tokenizer.encode(reply_start) if reply_start else []
        )
        backend = self.model.attention_backend().name
        dsa = choose_attention(attention, len(prompt_ids), topk, self.model.has_indexers, backend)
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
            constrain=constrain,
            after_prefill=after_prefill,
        )


def load_generator(
    spec: str | None = None, dtype: torch.dtype | None = None, device: str = "cpu"
) -> Generator:
    """Resolve `spec` (see resolve_model) and load model + tokenizer (dtype None: weights.default_dtype)."""
    from dsarag.indexer_model.provision import DEFAULT_GENERATOR, registry_model
    from dsarag.indexer_model.resolve import resolve_model
    from dsarag.indexer_model.weights import load_model

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
