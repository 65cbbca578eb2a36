"""Answerability from the answer prompt itself: a linear probe of the model's hidden state.

The probe reads a few layers' hidden states at the last position of the answer prompt's prefill (the state the
reply starts from) and scores answerable against not; below its threshold the agent declines before writing
a word, so the decision costs no extra forward pass. A probe is trained for one model's weights
(evals/answerability_fit.py) and ships beside its indexer checkpoint as `answerability.json`.
"""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
from torch import Tensor, nn

from dsarag.base.atomic import atomic_write_json
from dsarag.base.errors import ModelError
from dsarag.indexer_model.generate import Generator

PROBE_FILE = "answerability.json"


@dataclass(frozen=True)
class AnswerabilityProbe:
    """score(h) = w · (h - mean) / scale + bias, h the probed layers' states end to end: the log-odds that the
    packed sources answer the question."""

    layers: tuple[int, ...]  # the blocks whose outputs are read
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weight: tuple[float, ...]
    bias: float
    threshold: float  # decline below this score
    fitted_on: str = ""  # which questions chose the weights and the threshold

    def score(self, hidden: Tensor) -> float:
        """The log-odds of answerable for the probed layers' (dim,) states laid end to end."""
        h = hidden.detach().float().cpu()
        if h.shape != (len(self.weight),):
            raise ModelError(
                f"answerability probe expects a hidden state of {len(self.weight)}, got {tuple(h.shape)}"
            )
        mean, scale, weight = (torch.tensor(values) for values in (self.mean, self.scale, self.weight))
        return float(((h - mean) / scale) @ weight) + self.bias

    def save(self, path: Path) -> None:
        atomic_write_json(path, vars(self))

    @classmethod
    def load(cls, path: Path) -> "AnswerabilityProbe":
        try:
            fields = json.loads(path.read_text())
            vectors = {name: tuple(fields[name]) for name in ("layers", "mean", "scale", "weight")}
            probe = cls(**{**fields, **vectors})
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ModelError(
                f"{path}: not an answerability probe ({error}); delete it or retrain it"
            ) from None
        if not len(probe.mean) == len(probe.scale) == len(probe.weight) or not math.isfinite(probe.bias):
            raise ModelError(f"{path}: the probe's vectors differ in length; delete it or retrain it")
        return probe

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator["ProbeGate"]:
        """Record the probed layers' last-position outputs while the block is open (a prefill in parts: the
        last part's), for `ProbeGate.declines` to score after the prefill."""
        gate = ProbeGate(self)
        handles = [
            model.layers[layer].register_forward_hook(partial(gate.record, layer)) for layer in self.layers
        ]
        try:
            yield gate
        finally:
            for handle in handles:
                handle.remove()


class ProbeGate:
    """The answer prompt's verdict, taken between prefill and decoding."""

    def __init__(self, probe: AnswerabilityProbe) -> None:
        self.probe = probe
        self.hidden: dict[int, Tensor] = {}
        self.score: float | None = None
        self.recording = True

    def record(self, layer: int, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self.recording:
            self.hidden[layer] = output[0, -1]

    def declines(self) -> bool:
        """Score the prefill's last position (decode steps are not recorded); True: stop and decline."""
        self.recording = False
        if len(self.hidden) < len(self.probe.layers):
            return False
        self.score = self.probe.score(torch.cat([self.hidden[layer] for layer in self.probe.layers]))
        return self.score < self.probe.threshold


def find_probe(checkpoint: Path | None) -> AnswerabilityProbe | None:
    """The probe shipped beside an indexer checkpoint, if there is one."""
    if checkpoint is None or not (checkpoint / PROBE_FILE).is_file():
        return None
    return AnswerabilityProbe.load(checkpoint / PROBE_FILE)


@cache
def _probe_beside(checkpoint: Path | None) -> AnswerabilityProbe | None:
    return find_probe(checkpoint)


def answer_probe(generator: object) -> AnswerabilityProbe | None:
    """The probe of an in-process generator's weights; None for a model without one or a served model (whose
    hidden states are out of reach)."""
    if not isinstance(generator, Generator):
        return None
    return _probe_beside(generator.indexer_checkpoint)
