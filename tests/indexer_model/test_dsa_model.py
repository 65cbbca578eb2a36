"""DSA inside the model: trained indexers found by fingerprint, sparse generation, recall against a random indexer."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dsarag.base.errors import ModelError
from dsarag.evals.niah import greedy_continue
from dsarag.indexer_model import attention_policy, weights
from dsarag.indexer_model.attention_policy import AUTO_DENSE_TAIL, auto_dsa, choose_attention
from dsarag.indexer_model.checkpoint import load_checkpoint
from dsarag.indexer_model.dsa import DSAConfig
from dsarag.indexer_model.generate import decode_one_token, generate, load_generator, prefill
from dsarag.indexer_model.train import TrainConfig, attention_mass_recall, make_indexers
from dsarag.kernels import cpu_dsa
from dsarag.kernels.backend import TORCH, resolve_backend
from dsarag.rag.doctor import DoctorReport, _check_cpu_kernels

TEXT = Path(__file__).parents[2] / "corpora" / "demo" / "docs"


@pytest.fixture(scope="module")
def tiny():
    return load_generator("tiny")


@pytest.fixture(scope="module")
def long_prompt(tiny) -> list[int]:
    text = "\n\n".join(path.read_text() for path in sorted(TEXT.glob("*.md")))
    return tiny.tokenizer.encode(text)[:320]


def count_projections(monkeypatch, model, indexer) -> list[int]:
    """Tokens per index projection of `indexer`, in PyTorch calls or in the compiled decode-step kernel."""
    projected = []
    backend = model.attention_backend()

    def counted(layer_indexer, x, positions):
        if layer_indexer is indexer:
            projected.append(x.shape[1])
        return backend.project_index(layer_indexer, x, positions)

    counting = dataclasses.replace(backend, project_index=counted)
    for layer in model.layers:
        monkeypatch.setattr(layer.attention, "backend", counting)
    return projected


def test_the_shipped_indexer_of_the_tiny_model_is_found_by_its_weights(tiny):
    assert tiny.indexer_checkpoint is not None
    assert tiny.indexer_checkpoint.name == "smollm2-135m-instruct"
    assert tiny.model.has_indexers


@pytest.mark.slow
def test_dsa_with_k_covering_the_context_generates_exactly_the_dense_tokens(tiny, long_prompt):
    dense = generate(tiny.model, long_prompt, 8, tiny.tokenizer.decode, set())
    sparse = generate(
        tiny.model, long_prompt, 8, tiny.tokenizer.decode, set(), dsa=DSAConfig(topk=512, dense_threshold=0)
    )
    assert sparse.attention == "sparse" and sparse.topk == 512
    assert sparse.token_ids == dense.token_ids


@pytest.mark.slow
def test_a_sparse_prefill_can_decode_densely_without_the_indexer(tiny, long_prompt, monkeypatch):
    projected = count_projections(monkeypatch, tiny.model, tiny.model.layers[0].attention.indexer)
    prompt = long_prompt[:300]
    runs = {}
    for sparse_decode in (False, True):
        dsa = DSAConfig(topk=128, dense_threshold=0, sparse_decode=sparse_decode)
        runs[sparse_decode] = generate(tiny.model, prompt, 4, tiny.tokenizer.decode, set(), dsa=dsa)
    assert runs[False].attention == "sparse" and runs[False].decode_attention == "dense"
    assert runs[True].decode_attention == "sparse"
    # The dense decode steps never project index keys; the sparse ones project one token each.
    assert projected == [300] + [300, 1, 1, 1]
    # What auto runs: the prompt's last 32 positions attend densely in a second pass (which still writes index keys).
    projected.clear()
    auto = generate(tiny.model, prompt, 4, tiny.tokenizer.decode, set(), dsa=auto_dsa(128, dense_threshold=0))
    assert projected == [300 - AUTO_DENSE_TAIL, AUTO_DENSE_TAIL] and auto.dense_tail == AUTO_DENSE_TAIL == 32
    assert auto.attention == "sparse" and auto.decode_attention == "dense"
    # The NIAH evaluations decode the same way.
    projected.clear()
    with torch.inference_mode():
        tiny.model.setup_caches(1, 310)
        dsa = DSAConfig(topk=128, dense_threshold=0, sparse_decode=False)
        logits = tiny.model(torch.tensor([prompt]), torch.arange(300), dsa=dsa)[:, -1]
        greedy_continue(tiny.model, logits, 300, 4, set(), dsa)
    tiny.model.clear_caches()
    assert projected == [300]


@pytest.mark.slow
def test_a_dense_tail_attends_to_every_key_and_keeps_the_index_keys_for_sparse_decode(tiny, long_prompt):
    model, n, tail = tiny.model, 300, 16
    prompt, positions = torch.tensor([long_prompt[:n]]), torch.arange(n)

    def run(dsa: DSAConfig | None, length: int = n) -> tuple[torch.Tensor, torch.Tensor]:
        """Last prompt logits and layer 1's keys (which hold layer 0's attention output at each position)."""
        with torch.inference_mode():
            model.setup_caches(1, n + 1)
            logits = prefill(model, prompt[:, :length], positions[:length], dsa)
            keys = model.layers[1].attention.kv_cache.k_cache[0, :, :length].float().clone()
            if dsa is not None:  # a sparse decode step after the tail finds every index key current
                assert torch.isfinite(
                    decode_one_token(model, logits.argmax(-1, keepdim=True), torch.tensor([length]), dsa)
                ).all()
        model.clear_caches()
        return logits.float(), keys

    sparse = DSAConfig(topk=128, dense_threshold=0)
    dense_logits, dense_keys = run(None)
    sparse_logits, sparse_keys = run(sparse)
    tail_logits, tail_keys = run(dataclasses.replace(sparse, dense_tail=tail))
    whole_logits, _ = run(dataclasses.replace(sparse, dense_tail=n))
    body = slice(0, n - tail)
    # The tail positions are where pure DSA differs from dense, and there the tail now attends densely.
    assert not torch.allclose(sparse_keys[:, -tail:], dense_keys[:, -tail:], atol=1e-3)
    assert torch.allclose(tail_keys[:, -tail:], dense_keys[:, -tail:], atol=1e-4)
    # The body still runs sparse: exactly as a sparse prefill of the body alone (the same call shape, so the
    # same rounding on every CPU).
    _, body_keys = run(sparse, length=n - tail)
    assert torch.equal(tail_keys[:, body], body_keys)
    assert not torch.allclose(tail_logits, sparse_logits, atol=1e-3)
    assert torch.allclose(whole_logits, dense_logits, atol=1e-3)  # a tail covering the prompt is dense


def test_sparse_prefill_and_decode_logits_stay_close_to_dense_at_small_k(tiny, long_prompt):
    model = tiny.model
    prompt = torch.tensor([long_prompt])
    positions = torch.arange(len(long_prompt))
    with torch.inference_mode():
        model.setup_caches(1, len(long_prompt) + 2)
        dense = model(prompt, positions).float()
        model.clear_caches()
        model.setup_caches(1, len(long_prompt) + 2)
        sparse = model(prompt, positions, dsa=DSAConfig(topk=128, dense_threshold=0)).float()
        next_token = sparse.argmax(-1)
        step = model(next_token, torch.tensor([len(long_prompt)]), dsa=DSAConfig(topk=128, dense_threshold=0))
    assert not torch.equal(dense, sparse)  # the sparse path really ran
    kl = torch.nn.functional.kl_div(
        sparse.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="sum"
    )
    assert float(kl) < 0.5
    assert torch.isfinite(step).all()


@pytest.mark.slow
def test_dense_steps_skip_the_indexer_and_a_sparse_step_after_them_is_refused(tiny, long_prompt, monkeypatch):
    model, sparse = tiny.model, DSAConfig(topk=128, dense_threshold=0)
    calls = count_projections(monkeypatch, model, model.layers[0].attention.indexer)
    prompt, positions = torch.tensor([long_prompt[:200]]), torch.arange(200)
    with torch.inference_mode():
        model.clear_caches()
        model.setup_caches(1, 202)
        model(prompt, positions)
        assert not calls  # dense attention never reads index keys, so none are computed
        with pytest.raises(RuntimeError, match="index keys of positions 0-199 are missing"):
            model(prompt[:, :1], torch.tensor([200]), dsa=sparse)
        model(prompt, positions, dsa=sparse)  # a sparse prefill makes them current again
        model(prompt[:, :1], torch.tensor([200]), dsa=sparse)
    assert len(calls) == 3  # the refused step, the sparse prefill and the decode step
    model.clear_caches()


def compiled_and_pytorch_step(
    tiny, prompt, monkeypatch, kernel: str, check: str, dsa=None
) -> tuple[dict, dict]:
    """One decode step after a prefill, with cpu_dsa's `kernel` and with it off (its `check` answering False):
    returns each run's step logits and how often the kernel ran in each run's prefill and step."""
    model, length = tiny.model, len(prompt)
    calls = []
    compiled = getattr(cpu_dsa, kernel)
    monkeypatch.setattr(cpu_dsa, kernel, lambda *args: calls.append(1) or compiled(*args))
    steps, counts = {}, {}
    with torch.inference_mode():
        for run in ("compiled", "pytorch"):
            if run == "pytorch":
                monkeypatch.setattr(cpu_dsa, check, lambda *args: False)
            calls.clear()
            model.clear_caches()
            model.setup_caches(1, length + 1)
            logits = model(torch.tensor([prompt]), torch.arange(length), dsa=dsa)
            in_prefill = len(calls)
            steps[run] = model(logits[:, -1:].argmax(-1), torch.tensor([length]), dsa=dsa).float()
            counts[run] = (in_prefill, len(calls) - in_prefill)
    model.clear_caches()
    return steps, counts


@pytest.mark.slow
@pytest.mark.needs_compiler
def test_a_sparse_decode_step_projects_its_index_in_one_compiled_call(tiny, long_prompt, monkeypatch):
    dsa = DSAConfig(topk=128, dense_threshold=0)
    steps, counts = compiled_and_pytorch_step(
        tiny, long_prompt, monkeypatch, "index_projection", "projects_natively", dsa
    )
    torch.testing.assert_close(steps["compiled"], steps["pytorch"], atol=0.02, rtol=0.02)
    # A prefill projects in PyTorch; the step once a layer.
    assert counts == {"compiled": (0, len(tiny.model.layers)), "pytorch": (0, 0)}


@pytest.mark.slow
@pytest.mark.needs_avx512_bf16
def test_a_bf16_decode_step_runs_its_linears_in_compiled_calls(tiny, long_prompt, monkeypatch):
    assert tiny.model.output.weight.dtype == torch.bfloat16  # an AVX512-BF16 CPU runs the model in bf16
    backend = tiny.model.attention_backend()
    tiny.model.use_backend(resolve_backend("cpu", torch.bfloat16, decode_weights="model"))  # not int8 copies
    compiled = cpu_dsa.linear_rows

    def checked(x, weight, bias):  # each product is PyTorch's to within bf16 rounding
        result = compiled(x, weight, bias)
        torch.testing.assert_close(result, torch.nn.functional.linear(x, weight, bias))
        return result

    monkeypatch.setattr(cpu_dsa, "linear_rows", checked)
    try:
        steps, counts = compiled_and_pytorch_step(
            tiny, long_prompt, monkeypatch, "linear_rows", "runs_linear_rows"
        )
    finally:
        tiny.model.use_backend(backend)
    # A prefill's products stay PyTorch's but for its last logits; the step's 7 a layer and the output head.
    assert counts == {"compiled": (1, 7 * len(tiny.model.layers) + 1), "pytorch": (0, 0)}
    # Where PyTorch sums in another order (a Zen 4 EPYC), a product's last bit differs now and then and 30 layers
    # grow that to 0.5 in a logit, as any bf16 rounding would: the two steps must still rank the tokens alike.
    assert steps["compiled"].topk(5).indices.equal(steps["pytorch"].topk(5).indices)


@pytest.mark.slow
@pytest.mark.parametrize("dsa", [None, DSAConfig(topk=128, dense_threshold=0)])
def test_a_whole_cache_decode_step_matches_the_eager_step(tiny, long_prompt, dsa):
    """The step a CUDA graph captures (whole cache masked by a device position, no host sync) computes what
    the eager step computes; DSA runs the Triton kernels (under the interpreter on the CPU)."""
    # fp32: in bf16 the masked whole-cache kernels round differently from the eager ones on some CPUs (AMX).
    model = copy.deepcopy(tiny.model).float()
    prompt, n = torch.tensor([long_prompt[:200]]), 200
    token, position = prompt[:, :1], torch.tensor([n])
    with torch.inference_mode():
        model.clear_caches()
        model.setup_caches(1, n + 40)  # cache slots past the step hold zeros the mask must hide
        # The prefill runs the PyTorch path (the interpreted kernels would take minutes); it fills the same caches.
        model.use_backend(TORCH)
        model(prompt, torch.arange(n), dsa=dsa)
        if dsa is not None:
            model.use_backend(resolve_backend("cpu", torch.float32, "triton"))
        eager = model(token, position, dsa=dsa).float()
        whole = model(token, position, dsa=dsa, whole_cache=True).float()
    model.clear_caches()
    torch.testing.assert_close(whole, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_dense_layers_run_dense_and_the_others_stay_sparse(tiny, long_prompt):
    model = tiny.model
    prompt = torch.tensor([long_prompt])
    positions = torch.arange(len(long_prompt))

    def logits(dsa: DSAConfig | None) -> torch.Tensor:
        with torch.inference_mode():
            model.setup_caches(1, len(long_prompt) + 1)
            return model(prompt, positions, dsa=dsa).float()

    sparse = DSAConfig(topk=128, dense_threshold=0)
    every_layer = tuple(range(model.args.n_layer))
    assert torch.equal(logits(DSAConfig(topk=128, dense_threshold=0, dense_layers=every_layer)), logits(None))
    edges = logits(DSAConfig(topk=128, dense_threshold=0, dense_layers=(0, model.args.n_layer - 1)))
    assert not torch.equal(edges, logits(None)) and not torch.equal(edges, logits(sparse))


@pytest.mark.slow
def test_trained_indexer_keeps_more_attention_mass_than_a_random_one(tiny, long_prompt):
    dtype = tiny.model.output.weight.dtype
    model = tiny.model.float()
    try:
        tokens = np.array(long_prompt)
        trained = [layer.attention.indexer for layer in model.layers]
        trained_recall = attention_mass_recall(
            model, torch.nn.ModuleList(trained), tokens, ks=(96,), query_rows=64
        )
        random_indexers = make_indexers(model, TrainConfig())
        random_recall = attention_mass_recall(model, random_indexers, tokens, ks=(96,), query_rows=64)
    finally:
        model.to(dtype)
    assert trained_recall["indexer_mean"]["96"] > random_recall["indexer_mean"]["96"] + 0.03
    assert trained_recall["indexer_mean"]["96"] <= trained_recall["oracle_mean"]["96"] + 1e-6


def test_checkpoint_with_another_rope_layout_is_refused(tmp_path, tiny):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny.indexer_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["indexer"]["layout"] = "interleaved"
    (folder / "config.json").write_text(json.dumps(config))
    args = tiny.model.args
    with pytest.raises(ModelError, match="layout"):
        load_checkpoint(folder, args.dim, args.n_layer)


def test_attention_modes_pick_dense_or_sparse_as_documented(monkeypatch):
    assert choose_attention("dense", 10_000, None, True, "cpu-fp32") is None
    # auto: DSA where it was measured faster on the backend: long enough prompts, small enough k.
    monkeypatch.setitem(attention_policy.SPARSE_FASTER, "cpu-fp32", (8_192, 1 / 8))
    assert choose_attention("auto", 8_000, 512, True, "cpu-fp32") is None  # below where DSA pays
    assert choose_attention("auto", 1_000, None, True, "cpu-fp32") is None  # below the dense threshold
    assert choose_attention("auto", 10_000, 512, False, "cpu-fp32") is None  # no trained indexer
    auto = choose_attention("auto", 10_000, 512, True, "cpu-fp32")
    assert auto.topk == 512 and not auto.sparse_decode  # a DSA decode step is slower: dense over the cache
    assert auto.dense_tail == AUTO_DENSE_TAIL  # and the question reads the whole context
    assert choose_attention("auto", 10_000, None, True, "cpu-fp32") is None  # k = 2048: a fifth, no faster
    assert choose_attention("auto", 16_384, None, True, "cpu-fp32").topk == 2048
    assert choose_attention("auto", 10_000, 20_000, True, "cpu-fp32") is None  # k covers the context: dense
    assert choose_attention("auto", 20_000, None, True, "triton") is None  # slower at every length measured
    # The AVX512-BF16 kernels pay from 4K at k up to an eighth; with AMX from 8K, k up to 3/32.
    assert choose_attention("auto", 16_384, None, True, "cpu-bf16").topk == 2048
    assert choose_attention("auto", 4_096, 512, True, "cpu-bf16").topk == 512  # the agent's smallest k
    assert choose_attention("auto", 4_000, 512, True, "cpu-bf16") is None
    assert choose_attention("auto", 16_384, None, True, "cpu-amx") is None  # k = 2048: an eighth, no faster
    assert choose_attention("auto", 16_384, 1536, True, "cpu-amx").topk == 1536
    assert choose_attention("auto", 8_192, 737, True, "cpu-amx").topk == 737  # the agent's largest k at 8K
    assert choose_attention("auto", 16_384, None, True, "torch") is None  # no compiler: the PyTorch path
    forced = choose_attention("sparse", 600, None, True, "torch")
    assert (
        forced.topk < 600 and forced.dense_threshold == 0 and forced.sparse_decode and not forced.dense_tail
    )
    with pytest.raises(ModelError, match="indexer"):
        choose_attention("sparse", 600, None, False, "torch")


def test_the_backend_is_named_for_the_kernels_that_run(monkeypatch):
    monkeypatch.setattr(cpu_dsa, "native_library", lambda: object())  # the compiled CPU kernels build here
    monkeypatch.setattr(cpu_dsa, "avx512_bf16_ready", lambda: True)
    monkeypatch.setattr(cpu_dsa, "amx_ready", lambda: False)
    assert resolve_backend("cpu", torch.float32).name == "cpu-fp32"
    bf16 = resolve_backend("cpu", torch.bfloat16)
    assert bf16.name == "cpu-bf16" and bf16.linear is cpu_dsa.linear  # and a decode step's products compiled
    monkeypatch.setattr(cpu_dsa, "amx_ready", lambda: True)
    assert resolve_backend("cpu", torch.bfloat16).name == "cpu-amx"
    assert resolve_backend("cpu", torch.bfloat16, "torch") is TORCH
    assert resolve_backend("cpu", torch.float32, "triton").name == "triton"  # the interpreter, off the GPU
    monkeypatch.setattr(cpu_dsa, "native_library", lambda: None)  # no compiler
    assert resolve_backend("cpu", torch.bfloat16) is TORCH
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        resolve_backend("cpu", torch.bfloat16, "native")
    with pytest.raises(ValueError, match="kernels 'fast'"):
        resolve_backend("cpu", torch.bfloat16, "fast")


def test_doctor_says_where_auto_runs_sparse_attention_on_this_cpu(monkeypatch):
    def kernels_detail(dtype: torch.dtype, amx: bool) -> str:
        monkeypatch.setattr(cpu_dsa, "native_library", lambda: object())
        monkeypatch.setattr(cpu_dsa, "amx_ready", lambda: amx)
        monkeypatch.setattr(cpu_dsa, "avx512_bf16_ready", lambda: dtype == torch.bfloat16)
        monkeypatch.setattr(weights, "default_dtype", lambda device: dtype)
        report = DoctorReport()
        _check_cpu_kernels(report)
        return report.checks[0].detail

    assert (
        "(backend cpu-fp32: float32); --attention auto runs DSA from 8,192 tokens with k up to 12.5%"
        in kernels_detail(torch.float32, False)
    )
    assert (
        "(backend cpu-amx: bf16 on AMX, and bf16 decode steps' weight products); --attention auto runs DSA from 8,192"
        " tokens with k"
        " up to 9.4%" in kernels_detail(torch.bfloat16, True)
    )
    assert (
        "(backend cpu-bf16: bf16 on AVX512-BF16, and bf16 decode steps' weight products); --attention auto runs DSA"
        " from 4,096 tokens with k up to"
        " 12.5%" in kernels_detail(torch.bfloat16, False)
    )
    monkeypatch.setitem(attention_policy.SPARSE_FASTER, "cpu-bf16", None)  # a path where DSA never paid
    assert "auto stays dense" in kernels_detail(torch.bfloat16, False)


@pytest.mark.slow
def test_ask_with_sparse_attention_reports_the_mode_and_k(tmp_path, run_cli):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "kitchen.md").write_text("# Kitchen\n\nThe community kitchen serves lunch at noon on weekdays.\n")
    code, out, _ = run_cli(
        "ask", "When does the kitchen serve lunch?", "--docs", str(docs), "--model", "tiny",
        "--attention", "sparse", "--topk", "96", "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["attention"] == "sparse" and result["attention_topk"] == 96
    assert result["attention_decode"] == "sparse"  # forced sparse: the decode steps select top-k too
    assert result["cost"]["sparse_decode"]  # and the cost meter's sparse side decodes sparsely too
    # Every prompt position selected: no dense tail, in the answer or in the meter.
    assert result["attention_dense_tail"] == 0 == result["cost"]["dense_tail"]
