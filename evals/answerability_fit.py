"""Fit the answerability probe (rag/answerability.py) of a model on a development set's questions.

    python -m dsarag.evals.answerability_fit --devset sq-fit --devset hp-fit [--out answerability.json]

A development set is a folder made by `dsarag eval prepare` (qa.jsonl, docs/); its store and the questions'
prompt states are kept in it, so a refit with other options reads them back.

Each question is retrieved and packed as the agent packs a semantic route (6 chunks, bridge documents, dedup,
3,072 tokens), and the answer prompt's prefill gives the probed layers' last-position states; a logistic
regression (L2, standardized states) separates the answerable questions from the rest. The threshold declines
`--false-decline` of the answerable questions, read from 5-fold out-of-fold scores so that it is not set on
the questions that fitted the weights. Fit on a train split's `fit` half only; report on the `report` half.
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import Tensor

from dsarag.base.atomic import atomic_write
from dsarag.evals.datasets import load_qa
from dsarag.indexer_model.generate import Generator, load_generator
from dsarag.rag.answerability import PROBE_FILE, AnswerabilityProbe
from dsarag.rag.ask_options import AskOptions
from dsarag.rag.bridge import with_bridge_documents
from dsarag.rag.dedup import dedup_rankings
from dsarag.rag.embed import load_embedder
from dsarag.rag.ingest import IngestOptions, ingest
from dsarag.rag.pack import build_messages, pack_sources
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore

DEFAULT_LAYERS = (12, 20)  # chosen by cross-validation on the SQuAD 2.0 fit half (docs/evals.md)
ASK_DEFAULTS = AskOptions(question="", store=None)  # the agent's chunks and context budget, as `ask` packs


@torch.inference_mode()
def prompt_states(
    generator: Generator, retriever: Retriever, question: str, layers: tuple[int, ...]
) -> Tensor:
    """The probed layers' states at the last position of the agent's answer prompt for `question`."""
    k = ASK_DEFAULTS.chunks
    ranking, _ = with_bridge_documents(question, retriever.semantic(question, k), retriever, k)
    kept = dedup_rankings([ranking], retriever.embedding).kept[:k]
    packed = pack_sources(kept, generator.count_tokens, ASK_DEFAULTS.context_tokens)
    ids = generator.chat_prompt_ids(build_messages(question, packed))
    probe = AnswerabilityProbe(layers, (), (), (), 0.0, 0.0)
    model = generator.model
    model.setup_caches(1, len(ids))
    with probe.watch(model) as gate:
        model(torch.tensor([ids]), torch.arange(len(ids)), last_logits_only=True)
    return torch.cat([gate.hidden[layer].float() for layer in layers])


def logistic_fit(x: Tensor, y: Tensor, c: float) -> tuple[Tensor, float]:
    """Weights and bias minimizing mean log-loss + |w|² / (2 c n) (scikit-learn's C = c) on standardized x."""
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    x, y = x.double(), y.double()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
        value = value + weight.square().sum() / (2 * c * len(y))
        value.backward()
        return value

    optimizer.step(loss)
    return weight.detach(), float(bias.detach())


def fit_probe(
    states: Tensor,
    answerable: Tensor,
    layers: tuple[int, ...],
    c: float,
    false_decline: float,
    fitted_on: str,
) -> tuple[AnswerabilityProbe, dict]:
    """The probe on every question, its threshold from out-of-fold scores; with the out-of-fold rates."""
    mean, scale = states.mean(0), states.std(0).clamp_min(1e-6)
    x = (states - mean) / scale
    order = list(range(len(x)))
    random.Random(0).shuffle(order)
    out_of_fold = torch.empty(len(x), dtype=torch.float64)
    for fold in range(5):
        held = torch.tensor(order[fold::5])
        kept = torch.tensor(sorted(set(order) - set(order[fold::5])))
        weight, bias = logistic_fit(x[kept], answerable[kept], c)
        out_of_fold[held] = x[held].double() @ weight + bias
    threshold = float(torch.quantile(out_of_fold[answerable.bool()], false_decline))
    weight, bias = logistic_fit(x, answerable, c)
    declined = out_of_fold < threshold
    rates = {
        "questions": len(x),
        "answerable": int(answerable.sum()),
        "out_of_fold_declined_unanswerable": float(declined[~answerable.bool()].double().mean()),
        "out_of_fold_declined_answerable": float(declined[answerable.bool()].double().mean()),
    }
    probe = AnswerabilityProbe(
        layers,
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(weight.tolist()),
        bias,
        threshold,
        fitted_on,
    )
    return probe, rates


def devset_states(
    devset: Path, items: list, layers: tuple[int, ...], model: str | None, generator: list[Generator]
) -> Tensor:
    """The prompt states of a development set's questions, cached in its folder beside its store."""
    cache = devset / f"prompt-states-{model or 'default'}-L{'-'.join(map(str, layers))}.npz"
    if cache.exists():
        return torch.from_numpy(np.load(cache)["states"])
    if not generator:
        generator.append(load_generator(model))
        generator[0].attach_trained_indexers()
    embedder = load_embedder()
    store = ChunkStore(devset / "store")
    ingest([devset / "docs"], store, embedder, IngestOptions())
    retriever = Retriever(store, embedder)
    console = Console(stderr=True)
    rows = []
    for number, item in enumerate(items, start=1):
        rows.append(prompt_states(generator[0], retriever, item.question, layers))
        if number % 50 == 0 or number == len(items):
            console.log(f"{devset.name}: [{number}/{len(items)}] prompt states")
    states = torch.stack(rows)
    atomic_write(cache, lambda tmp: _save_states(tmp, states))
    return states


def _save_states(path: Path, states: Tensor) -> None:
    with path.open("wb") as handle:  # a handle: np.savez would append .npz to the temporary name
        np.savez(handle, states=states.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devset", type=Path, action="append", required=True, help="repeatable")
    parser.add_argument(
        "--out", type=Path, help=f"default: {PROBE_FILE} beside the model's indexer checkpoint"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)))
    parser.add_argument("--c", type=float, default=0.003, help="inverse L2 strength")
    parser.add_argument("--false-decline", type=float, default=0.07, help="answerable share to decline")
    args = parser.parse_args()
    layers = tuple(int(n) for n in args.layers.split(","))
    generator: list[Generator] = []  # loaded once, when some development set's states are not cached yet
    states, labels = [], []
    for devset in args.devset:
        items = load_qa(devset / "qa.jsonl")
        labels += [float(item.meta.get("answerable", True) and bool(item.answers)) for item in items]
        states.append(devset_states(devset, items, layers, args.model, generator))
    states, labels = torch.cat(states), torch.tensor(labels)
    probe, rates = fit_probe(
        states, labels, layers, args.c, args.false_decline, ", ".join(map(str, args.devset))
    )
    out = args.out
    if out is None:
        loaded = generator[0] if generator else load_generator(args.model)
        checkpoint = loaded.indexer_checkpoint or loaded.attach_trained_indexers()
        if checkpoint is None:
            raise SystemExit("the model has no indexer checkpoint to put the probe beside: pass --out")
        out = checkpoint / PROBE_FILE
    probe.save(out)
    print(json.dumps({"probe": str(out), "layers": layers, "threshold": probe.threshold, **rates}, indent=1))


if __name__ == "__main__":
    main()
