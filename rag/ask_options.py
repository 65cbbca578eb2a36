"""`dsarag ask`'s options and result, apart from rag/ask.py so that a client of `dsarag serve` reads them
without importing the model (torch)."""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class AskOptions:
    question: str
    store: Path | None  # None only with strategy "none": the model answers alone
    docs: Path | None = None
    model: str | None = None
    chunks: int = 6  # chunks to retrieve (--chunks)
    context_tokens: int = 3072
    max_new_tokens: int = 256
    temperature: float = 0.0
    attention: str = "auto"  # dense | sparse | auto
    attention_topk: int | None = None  # DSA top-k; None: from the task's complexity (attention_policy.py)
    strategy: str | None = None  # force one of STRATEGY_CHOICES; None: the agent decides
    critical: bool = False  # always dense attention
    reader: str = "auto"  # one of READERS: how the sources are read (rag/reader.py reading_mode)
    abstain: bool = True  # decline where the answerability probe judges the sources silent (--no-abstain)
    compare_dense: bool = False  # also answer in the other attention mode and compare (rag/cost.py)
    price_per_hour: float = 2.0  # GPU $/hour of the cost meter
    record_cost: bool = True  # append the cost meter's row to the ledger (rag/cost_ledger.py)


@dataclass
class AskResult:
    question: str
    answer: str
    sources: list[dict]
    model: str
    attention: str
    attention_topk: int | None
    timings: dict[str, float]
    tokens: dict[str, int]
    attention_layer_topk: list[int] | None = None  # per-layer k, when the indexer checkpoint spreads k
    attention_decode: str = "dense"  # the decode steps' attention (auto: dense after a sparse prefill)
    attention_dense_tail: int = 0  # the prompt's last positions that attended densely (auto: the question)
    ingest: dict | None = None
    extra: dict = field(default_factory=dict)
    strategy: str = "semantic"  # the strategy of the final answer ("none": answered without retrieval)
    # False: declined (by the reader or the answerability probe); None: not judged.
    answerable: bool | None = None
    answerability: float | None = None  # log-odds of answerable: the constrained reader's or the probe's
    short_answer: str | None = None  # the constrained reader's answer alone (a span of a source, yes, no)
    citations: list[dict] = field(default_factory=list)  # each [n]: by model | reader | tool, and verified
    trace: list[dict] = field(default_factory=list)  # every node's decision and reason, in order
    cost: dict = field(default_factory=dict)  # the cost meter: sparse vs dense, measured and analytic

    def to_json(self) -> dict:
        return dict(vars(self))
