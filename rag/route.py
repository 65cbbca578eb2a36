"""The agent's decisions: whether to retrieve, which strategy, how complex the task is.

Each decision adds the local LLM's calibrated label log-probabilities (rag/label_choice.py: one short forward pass
per decision) to evidence from cheap query features (rag/query_features.py) and, for retrieval, the
question's best cosine against the store. The feature weights are in log-probability units: a weight of 3
means "this feature alone outweighs the model preferring another label twenty to one" — features decide clear
cases, the model decides the rest.
"""

from dataclasses import dataclass

from dsarag.indexer_model.generate import Generator
from dsarag.rag.label_choice import LabelChoice
from dsarag.rag.query_features import QueryFeatures
from dsarag.rag.remote_generator import RemoteGenerator

STRATEGIES = ("semantic", "multi-query", "temporal", "hybrid")

RETRIEVAL_CHOICE = LabelChoice(
    instruction=(
        "You route questions for an assistant that has a private document collection of one organisation "
        "(its people, prices, policies, events, tickets, codes). Reply 'documents' when the answer must come "
        "from those documents, 'general' when it is general knowledge, arithmetic, coding, translation or "
        "small talk that needs no documents."
    ),
    labels=("documents", "general"),
)
STRATEGY_CHOICE = LabelChoice(
    instruction=(
        "You choose how to search documents for a question. 'lookup': one fact about a topic. 'latest': the "
        "answer depends on time (current, latest, as of a date, in a year). 'compare': two things, periods "
        "or values must be found and compared. 'exact': the question quotes a code, ticket number, part "
        "number or config key that must match exactly."
    ),
    labels=("lookup", "latest", "compare", "exact"),
)
LABEL_STRATEGY = {"lookup": "semantic", "latest": "temporal", "compare": "multi-query", "exact": "hybrid"}
COMPLEXITY_CHOICE = LabelChoice(
    instruction=(
        "You judge how much reasoning a question over documents needs. 'keyword': find one value or name. "
        "'question': answer from one passage. 'summary': summarize documents. 'multi': combine facts from "
        "several passages. 'reasoning': explain or reason step by step."
    ),
    labels=("keyword", "question", "summary", "multi", "reasoning"),
)
CHOICES = {"retrieval": RETRIEVAL_CHOICE, "strategy": STRATEGY_CHOICE, "complexity": COMPLEXITY_CHOICE}
LABEL_COMPLEXITY = {
    "keyword": "keyword_lookup",
    "question": "document_qa",
    "summary": "summarization",
    "multi": "multi_hop",
    "reasoning": "chain_of_thought",
}

# Retrieval: cosine of all-MiniLM-L6-v2 between the question and its best chunk. Measured on the routing set
# (docs/evals.md): questions about the corpus ≥ 0.35, general ones ≤ 0.25 — the midpoint is neutral.
CORPUS_COSINE_MIDPOINT = 0.30
CORPUS_COSINE_WEIGHT = 20.0  # 0.1 of cosine above the midpoint ≈ 2 nats for "documents"
FEATURE_WEIGHT = 3.0
# A label whose feature is absent ("latest" without any date or recency word) needs the model to prefer it
# by this margin; measured: at 1.5 the calibrated 135M model still picked 'latest'/'exact' for plain look-ups
# (routing 81 %, margins 2–2.4 nats).
ABSENT_FEATURE_PENALTY = 2.5
COMPARISON_WEIGHT = 4.0  # "in 2023 compared with 2025" names dates, but both periods must be fetched
NAMED_SIDES_WEIGHT = 4.0  # "Are A and B …?" names both sides: each must be found, so multi-query wins


@dataclass(frozen=True)
class Decision:
    choice: str
    reason: str
    scores: dict[str, float]

    def to_json(self) -> dict:
        return {"choice": self.choice, "reason": self.reason, "scores": self.scores}


def label_scores(
    question: str, generator: "Generator | RemoteGenerator", decisions: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """The LLM's calibrated label log-probabilities for each of `decisions` ("retrieval", "strategy",
    "complexity"): one short forward pass each, over the question (label_choice.py). Where a served model
    offers no log-probabilities, every label scores the same and the features decide."""
    return {name: CHOICES[name].scores(generator, question) or CHOICES[name].uniform() for name in decisions}


def model_voted(generator: "Generator | RemoteGenerator") -> bool:
    """Whether the decisions include the model's label scores (a server may offer no log-probabilities)."""
    return getattr(generator, "offers_logprobs", True)


def decide_retrieval(features: QueryFeatures, corpus_cosine: float, llm: dict[str, float]) -> Decision:
    """ "retrieve" or "no_retrieve": LLM log-odds + the store's best cosine + identifiers/dates as evidence."""
    llm_log_odds = llm["documents"] - llm["general"]
    cosine_evidence = CORPUS_COSINE_WEIGHT * (corpus_cosine - CORPUS_COSINE_MIDPOINT)
    dated = features.window is not None and features.window.end is not None  # "today" alone is small talk
    feature_evidence = FEATURE_WEIGHT * (bool(features.identifiers) + dated)
    total = llm_log_odds + cosine_evidence + feature_evidence
    choice = "retrieve" if total > 0 else "no_retrieve"
    reason = (
        f"LLM documents-vs-general {llm_log_odds:+.2f} + corpus cosine {corpus_cosine:.2f} "
        f"({cosine_evidence:+.2f}) + features {feature_evidence:+.1f} = {total:+.2f}"
    )
    return Decision(choice, reason, _rounded({"retrieve": total, "no_retrieve": -total}))


def choose_strategy(features: QueryFeatures, llm: dict[str, float], dated_documents: bool = True) -> Decision:
    """semantic | multi-query | temporal | hybrid: LLM label log-probs + feature evidence, the best wins. Where
    no document states its own date (`dated_documents` False), a date or recency word is no evidence for
    'latest' (fitted on SQuAD / HotpotQA train questions, docs/evals.md)."""
    dated_question = features.window is not None or features.recency
    timed = dated_question and dated_documents
    evidence = {
        "lookup": 0.0,
        "latest": _evidence(timed, FEATURE_WEIGHT),
        "compare": _evidence(features.comparison, COMPARISON_WEIGHT)
        + NAMED_SIDES_WEIGHT * bool(features.compared),
        "exact": _evidence(bool(features.identifiers), FEATURE_WEIGHT),
    }
    totals = {label: llm[label] + evidence[label] for label in evidence}
    best = max(totals, key=totals.__getitem__)
    fired = [f"{label} {weight:+.1f}" for label, weight in evidence.items() if weight]
    reason = (
        f"LLM prefers {max(llm, key=llm.__getitem__)!r}; features {', '.join(fired)} "
        f"→ {best!r} ({totals[best]:+.2f})"
    )
    if dated_question and not dated_documents:
        reason += "; no document states its own date, so the question's date is not a time window"
    return Decision(LABEL_STRATEGY[best], reason, _rounded({LABEL_STRATEGY[k]: v for k, v in totals.items()}))


def choose_complexity(features: QueryFeatures, llm: dict[str, float]) -> Decision:
    """The task complexity that sets the top-k ratio (indexer_model/attention_policy.py)."""
    evidence = {
        "keyword": _evidence(bool(features.identifiers), FEATURE_WEIGHT),
        "question": 0.0,
        "summary": _evidence(features.summary, FEATURE_WEIGHT),
        "multi": _evidence(features.comparison, FEATURE_WEIGHT),
        "reasoning": _evidence(features.reasoning, FEATURE_WEIGHT),
    }
    totals = {label: llm[label] + evidence[label] for label in evidence}
    best = max(totals, key=totals.__getitem__)
    fired = [f"{label} {weight:+.1f}" for label, weight in evidence.items() if weight]
    reason = (
        f"LLM prefers {max(llm, key=llm.__getitem__)!r}; features {', '.join(fired)} "
        f"→ {LABEL_COMPLEXITY[best]}"
    )
    return Decision(
        LABEL_COMPLEXITY[best], reason, _rounded({LABEL_COMPLEXITY[k]: v for k, v in totals.items()})
    )


def _evidence(present: bool, weight: float) -> float:
    return weight if present else -ABSENT_FEATURE_PENALTY


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in scores.items()}
