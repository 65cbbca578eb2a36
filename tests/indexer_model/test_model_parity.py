"""Our Transformer against Hugging Face transformers, KV-cache decoding, generation and the chat prompt (tiny model)."""

import subprocess
import sys

import pytest
import torch

from dsarag.base.errors import ModelError
from dsarag.indexer_model.generate import TextStream, generate, load_generator, sample
from dsarag.indexer_model.gguf_convert import read_gguf
from dsarag.indexer_model.model import ModelArgs
from dsarag.indexer_model.provision import generator_path, pull
from dsarag.indexer_model.weights import build_model, load_model, our_name

TINY = "smollm2-135m-instruct"
MESSAGES = [
    {"role": "system", "content": "You answer questions about a city's public kitchens."},
    {
        "role": "user",
        "content": "Who runs the Harbor Street Kitchen, and since when? Answer in one short sentence.",
    },
]


@pytest.fixture(scope="module")
def tiny_folder():
    pull([TINY, "all-minilm-l6-v2"])
    return generator_path(TINY)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_folder):
    return tiny_folder.parent / "source" / f"{TINY}.gguf"


@pytest.fixture(scope="module")
def gguf_float32(tiny_gguf):
    """(config, HF-named float32 state dict) read straight from the GGUF."""
    return read_gguf(tiny_gguf, torch.float32)


@pytest.fixture(scope="module")
def tiny_generator(tiny_folder):
    return load_generator("tiny")


@pytest.mark.slow
@torch.inference_mode()
def test_logits_match_transformers_gguf_loader(tiny_gguf, gguf_float32, tiny_generator):
    """Same GGUF, both in float32, a 40-token chat prompt: max |Δlogit| ≤ 1e-3 · max |logit| and the same
    argmax at every position. A wrong Q/K un-permutation for the llama layout fails this by ~40 % of the scale."""
    from transformers import AutoModelForCausalLM

    config, state_dict = gguf_float32
    ours = build_model(
        ModelArgs.from_config(config), {our_name(k): v for k, v in state_dict.items()}, tiny_gguf
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    ids = tiny_generator.chat_prompt_ids(MESSAGES)[:40]
    assert len(ids) == 40
    prompt = torch.tensor([ids])
    our_logits = ours(prompt, torch.arange(len(ids)), last_logits_only=False)
    their_logits = theirs.eval()(prompt).logits
    scale = their_logits.abs().max()
    assert (our_logits - their_logits).abs().max() <= 1e-3 * scale
    assert torch.equal(our_logits.argmax(-1), their_logits.argmax(-1))


def test_cached_weights_are_the_gguf_weights_in_bf16(tiny_folder, gguf_float32):
    """model.safetensors in the cache holds exactly the dequantized GGUF tensors rounded to bf16."""
    from safetensors.torch import load_file

    config, state_dict = gguf_float32
    cached = load_file(tiny_folder / "model.safetensors")
    expected = {
        k: v for k, v in state_dict.items() if not (config["tie_word_embeddings"] and k == "lm_head.weight")
    }
    assert cached.keys() == expected.keys()
    for name, tensor in cached.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


@torch.inference_mode()
def test_cached_folder_loads_in_transformers(tiny_folder, tiny_generator):
    """The converted folder is a valid HF model folder: transformers loads it and predicts the same next token."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.bfloat16).eval()
    ids = tiny_generator.chat_prompt_ids(MESSAGES)
    prompt = torch.tensor([ids])
    ours = tiny_generator.model
    ours.clear_caches()
    assert torch.equal(
        theirs(prompt).logits[:, -1].argmax(-1), ours(prompt, torch.arange(len(ids)))[:, -1].argmax(-1)
    )


@torch.inference_mode()
def test_loading_a_model_leaves_torch_dynamo_unimported(tiny_folder):
    # The meta-device build must not run nn.Embedding's init, which imports torch._dynamo (2-3 s an ask).
    script = (
        "import sys; from indexer_model.weights import load_model; "
        f"load_model({str(tiny_folder)!r}); print('torch._dynamo' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (run.returncode, run.stdout.strip()) == (0, "False"), run.stderr


@pytest.mark.slow
def test_kv_cache_decode_matches_full_forward(tiny_folder, tiny_generator):
    model = load_model(tiny_folder, dtype=torch.float32)
    ids = torch.tensor([tiny_generator.chat_prompt_ids(MESSAGES)[:24]])
    full = model(ids, torch.arange(24), last_logits_only=False)[0]

    model.setup_caches(max_batch_size=1, max_seq_len=32)
    steps = [model(ids[:, :8], torch.arange(8), last_logits_only=False)[0]]  # prefill: causal SDPA
    steps.append(model(ids[:, 8:16], torch.arange(8, 16), last_logits_only=False)[0])  # chunk: explicit mask
    steps += [model(ids[:, i : i + 1], torch.tensor([i]))[0] for i in range(16, 24)]  # one token at a time
    incremental = torch.cat(steps)
    assert (incremental - full).abs().max() <= 1e-4 * full.abs().max()


@pytest.mark.slow
def test_greedy_generation_is_deterministic(tiny_generator):
    first = tiny_generator.answer(MESSAGES, max_new_tokens=12, temperature=0.0)
    second = tiny_generator.answer(MESSAGES, max_new_tokens=12, temperature=0.0)
    assert first.token_ids == second.token_ids and first.text == second.text
    assert first.new_tokens > 0 and first.prompt_tokens == len(tiny_generator.chat_prompt_ids(MESSAGES))
    assert first.prefill_s > 0 and first.decode_s > 0


@pytest.mark.slow
def test_streamed_text_equals_final_text(tiny_generator):
    deltas: list[str] = []
    result = tiny_generator.answer(MESSAGES, max_new_tokens=12, on_text=deltas.append)
    assert "".join(deltas) == result.text


def test_stream_holds_back_split_multibyte_characters(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    text = "naïve café — 你好 🙂 done"
    ids = tokenizer.encode(text)
    deltas: list[str] = []
    stream = TextStream(tokenizer.decode, deltas.append)
    for token_id in ids:
        stream.push(token_id)
    stream.flush()
    assert len(ids) > len(text.split())  # the CJK characters and the emoji span several byte-level tokens
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


@pytest.mark.slow
def test_generation_stops_on_a_stop_token(tiny_generator):
    ids = tiny_generator.chat_prompt_ids(MESSAGES)
    first = tiny_generator.answer(MESSAGES, max_new_tokens=4).token_ids[0]
    result = generate(tiny_generator.model, ids, 4, tiny_generator.tokenizer.decode, stop_ids={first})
    assert result.stop_reason == "eos" and result.new_tokens == 0 and result.text == ""


def test_prompt_longer_than_the_context_is_refused(tiny_generator):
    too_long = [1] * tiny_generator.max_context
    with pytest.raises(ModelError, match="exceeds the model's context"):
        generate(tiny_generator.model, too_long, 8, tiny_generator.tokenizer.decode, stop_ids=set())


def test_chat_prompt_uses_the_template(tiny_generator):
    from transformers import AutoTokenizer

    ids = tiny_generator.chat_prompt_ids(MESSAGES)
    text = tiny_generator.tokenizer.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>system\nYou answer questions" in text
    assert "<|im_start|>user\nWho runs the Harbor Street Kitchen, and since when?" in text
    assert text.endswith("<|im_start|>assistant\n")
    reference = AutoTokenizer.from_pretrained(tiny_generator.folder).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(reference)


def test_count_tokens(tiny_generator):
    assert tiny_generator.count_tokens("") == 0
    assert (
        tiny_generator.count_tokens("hello world") == len(tiny_generator.tokenizer.encode("hello world")) > 0
    )


def test_sampling_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0]])
    assert sample(logits, temperature=0.0).item() == 1
    rng = torch.Generator().manual_seed(0)
    # token 1 holds ≈ 97 % of the mass: a 0.5 nucleus contains nothing else
    assert {sample(logits, temperature=1.0, top_p=0.5, generator=rng).item() for _ in range(50)} == {1}
    spread = {sample(logits, temperature=5.0, top_p=1.0, generator=rng).item() for _ in range(200)}
    assert spread == {0, 1, 2, 3}
