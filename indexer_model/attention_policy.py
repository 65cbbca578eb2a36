"""The attention policy: dense or DSA for one generation, which k, and whether the prompt's tail and the decode
steps attend densely. Each threshold names the results table it comes from.

An answer's attention is chosen in two steps: `topk_budget` turns the task's complexity and the prompt's length
into a k (or dense), and `choose_attention` keeps DSA only where it is measured faster on the model's backend.
"""

from dataclasses import dataclass

from dsarag.base.errors import ModelError
from dsarag.indexer_model.dsa import DSAConfig

# Selection ratio of the packed context per task complexity (docs/design.md, "Top-k budget from the task").
TOPK_RATIOS = {
    "keyword_lookup": 0.01,
    "document_qa": 0.03,
    "summarization": 0.04,
    "multi_hop": 0.06,
    "chain_of_thought": 0.09,  # the design gives 8–10 %: the middle
}
COMPLEXITIES = tuple(TOPK_RATIOS)
# k_min: NIAH as `auto` runs it loses clearly more below 512 (docs/dsa-quality.md, "k for look-ups, and the dense
# tail"). k_max is DeepSeek's k, beyond which the indexer's cost stops paying for itself on a 0.5B model.
TOPK_MIN = 512
TOPK_MAX = DSAConfig().topk
# Per backend (dsarag_kernels/backend.py), where a DSA prefill was measured faster than a dense one: (the shortest
# prompt, the largest k as a share of it), None where it never was (docs/benchmarks.md, "`--attention auto` on each
# device").
SPARSE_FASTER: dict[str, tuple[int, float] | None] = {
    "cpu-fp32": (8192, 1 / 8),
    "cpu-amx": (8192, 3 / 32),
    "cpu-bf16": (4096, 1 / 8),
    "torch": None,
    "triton": None,
    "triton-fp8": None,
}
# A DSA decode step is at best about a fifth faster than a dense one (docs/benchmarks.md, "CPU decode steps"), and
# auto's NIAH figures were measured with dense steps.
SPARSE_DECODE_FASTER = False
# The question and the template's end attend densely: their attention retrieves from the whole context; 128 kept no
# more NIAH answers than 32 (docs/dsa-quality.md, "k for look-ups, and the dense tail").
AUTO_DENSE_TAIL = 32


def min_attention_topk() -> int:
    """The smallest DSA k: every query keeps its sink tokens and its recent window."""
    return DSAConfig.n_sink + DSAConfig.window


@dataclass(frozen=True)
class TopkBudget:
    attention: str  # "dense" or "sparse"
    topk: int | None  # None when dense
    reason: str

    def to_json(self) -> dict:
        return {"attention": self.attention, "topk": self.topk, "reason": self.reason}


def topk_budget(
    complexity: str,
    prompt_tokens: int,
    override: int | None = None,
    critical: bool = False,
    dense_threshold: int = DSAConfig().dense_threshold,
    k_min: int = TOPK_MIN,
    k_max: int = TOPK_MAX,
) -> TopkBudget:
    """The attention and top-k for a prompt of `prompt_tokens` tokens and a task of `complexity`: the design's
    selection ratio of the prompt, clamped; dense below the DSA threshold (sparse would equal dense there) or for
    a question flagged critical (which also wins over `--topk`); `--topk` overrides the table."""
    if critical:
        return TopkBudget("dense", None, "question flagged critical: exact dense attention")
    if override is not None:
        return TopkBudget("sparse", override, f"--topk {override} overrides the complexity table")
    if prompt_tokens < dense_threshold:
        return TopkBudget(
            "dense",
            None,
            f"{prompt_tokens} tokens < dense threshold {dense_threshold}: DSA would equal dense",
        )
    ratio = TOPK_RATIOS[complexity]
    wanted = round(ratio * prompt_tokens)
    k = min(max(wanted, k_min), k_max)
    clamp = "" if k == wanted else f", clamped to [{k_min}, {k_max}]"
    reason = f"{complexity} → {ratio:.0%} of {prompt_tokens} tokens = {wanted}{clamp}"
    if k >= prompt_tokens:
        return TopkBudget("dense", None, f"{reason}; k ≥ context, so dense")
    return TopkBudget("sparse", k, reason)


def answer_mode(mode: str, budget: TopkBudget, critical: bool) -> str:
    """The `--attention` mode an answer runs: --critical wins, then an explicit dense or sparse; under auto a dense
    budget stays dense (a sparse one still needs a trained indexer and a faster backend: choose_attention)."""
    if critical or (mode == "auto" and budget.attention == "dense"):
        return "dense"
    return mode


def auto_dsa(topk: int, dense_threshold: int = DSAConfig.dense_threshold) -> DSAConfig:
    """The DSA `--attention auto` runs at `topk` once it chooses DSA: a sparse prefill with a dense tail, then
    dense decode steps while no sparse one is measured faster."""
    return DSAConfig(
        topk=topk,
        dense_threshold=dense_threshold,
        sparse_decode=SPARSE_DECODE_FASTER,
        dense_tail=AUTO_DENSE_TAIL,
    )


def sparse_faster_range(backend: str) -> tuple[int, float] | None:
    """Where `--attention auto` runs DSA on the backend named `backend`: (the shortest prompt, the largest k as a
    share of it), or None where it always runs dense."""
    return SPARSE_FASTER.get(backend)


def choose_attention(
    mode: str, n_context: int, topk: int | None, has_indexers: bool, backend: str
) -> DSAConfig | None:
    """The attention of one generation: None for dense, else the DSA config.

    dense: always dense. sparse: DSA even on short contexts (k below the context length). auto: DSA when a
    trained indexer is attached, the context reaches the dense threshold, and context and k lie where DSA is
    measured faster on the backend (SPARSE_FASTER)."""
    default = DSAConfig()
    if mode == "dense":
        return None
    if mode == "sparse":
        if not has_indexers:
            raise ModelError(
                "no trained indexer for this model — run `dsarag indexer train`, or use --attention dense"
            )
        k = topk or min(default.topk, max(min_attention_topk(), n_context // 2))
        return DSAConfig(topk=max(k, min_attention_topk()), dense_threshold=0)
    if mode != "auto":
        raise ValueError(f"attention mode {mode!r}: use dense, sparse or auto")
    k = topk or default.topk
    if not has_indexers or k >= n_context or n_context < default.dense_threshold:
        return None
    faster = sparse_faster_range(backend)
    if faster is None or n_context < faster[0] or k > n_context * faster[1]:
        return None
    return auto_dsa(k)
