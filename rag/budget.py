"""Task complexity → DSA top-k budget: the design's selection ratio of the packed context, clamped.

Dense attention when the prompt is shorter than the DSA threshold (sparse would equal dense there) or the
question is flagged critical (which also wins over `--topk`); `--topk` overrides the table.
"""

from dataclasses import dataclass

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
    """The attention and top-k for a prompt of `prompt_tokens` tokens and a task of `complexity`."""
    if critical:  # before --topk: a critical question is never answered from a selection
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
