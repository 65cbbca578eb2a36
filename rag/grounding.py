"""Is an answer supported by its sources? Overlap of the answer's content terms with the packed text.

Numbers, names and content words of the answer must appear in the sources; an answer that says it does
not know is unsupported by definition (the retrieval missed), so the agent retries it.
"""

import re
from dataclasses import dataclass

SUPPORT_THRESHOLD = 0.6
_TERM = re.compile(r"\$?\d[\d,.:]*\d|\$?\d|[A-Za-z][\w'-]{3,}")
_CITATION = re.compile(r"\[(\d+)\]")
_NOT_KNOWN = re.compile(
    r"\b(do(es)? not know|don't know|cannot (be )?(find|answer|determine)|no information|not (contain|mention|"
    r"provide|say)|not enough information|unable to)\b",
    re.I,
)
_STOPWORDS = frozenset(
    """about above after again also answer because been before being below between both could does doing
    each from have having here into itself just more most only other over same should some such than that
    their them then there these they this those through under until very were what when where which while
    whom will with would your yours source sources cited according based""".split()
)


@dataclass(frozen=True)
class Grounding:
    supported: bool
    support: float  # share of the answer's content terms found in the sources
    reason: str

    def to_json(self) -> dict:
        return {"supported": self.supported, "support": round(self.support, 3), "reason": self.reason}


def says_not_known(answer: str) -> bool:
    """The answer declines: it says the sources do not hold what was asked."""
    return bool(_NOT_KNOWN.search(answer))


def answer_terms(answer: str) -> list[str]:
    text = _CITATION.sub(" ", answer)
    terms = [term.lower().rstrip(".,:") for term in _TERM.findall(text)]
    return [term for term in dict.fromkeys(terms) if term not in _STOPWORDS]


def check_grounding(answer: str, sources_text: str, threshold: float = SUPPORT_THRESHOLD) -> Grounding:
    if not answer.strip():
        return Grounding(False, 0.0, "empty answer")
    if says_not_known(answer):
        return Grounding(False, 0.0, "the answer says the sources do not contain it")
    terms = answer_terms(answer)
    if not terms:
        return Grounding(True, 1.0, "no content terms to check")
    haystack = sources_text.lower()
    found = [term for term in terms if term.lstrip("$") in haystack]
    support = len(found) / len(terms)
    missing = [term for term in terms if term not in found][:5]
    reason = f"{len(found)}/{len(terms)} answer terms in the sources" + (
        f"; missing: {', '.join(missing)}" if missing else ""
    )
    return Grounding(support >= threshold, support, reason)


def add_citations(
    answer: str, source_texts: list[str], threshold: float = SUPPORT_THRESHOLD
) -> tuple[str, int | None, float]:
    """A small model often answers without the [n] it was asked for: cite the source that alone holds the
    most of the answer's content terms (the best-ranked one on a tie), when it holds at least `threshold`
    of them, and say in the text that the tool added it. Answers that cite already, or say the sources lack
    the answer, stay as they are. Returns the text, the added [n] (or None) and its share of the terms."""
    terms = answer_terms(answer)
    if not terms or not source_texts or _CITATION.search(answer) or says_not_known(answer):
        return answer, None, 0.0
    supports = [source_support(terms, text) for text in source_texts]
    best = max(range(len(supports)), key=lambda i: (supports[i], -i))
    if supports[best] < threshold:
        return answer, None, supports[best]
    number = best + 1
    note = f"[{number}] cited by dsarag: it holds {supports[best]:.0%} of the answer's terms"
    return f"{answer.rstrip()} [{number}]\n\n({note})", number, supports[best]


def source_support(terms: list[str], source_text: str) -> float:
    """Share of the answer's content terms found in one source."""
    text = source_text.lower()
    return sum(term.lstrip("$") in text for term in terms) / len(terms) if terms else 0.0


def cited_by_model(answer: str, source_texts: list[str], threshold: float = SUPPORT_THRESHOLD) -> list[dict]:
    """Each [n] the answer cites, checked: does source n alone hold `threshold` of the answer's terms?"""
    terms = answer_terms(answer)
    numbers = dict.fromkeys(int(n) for n in _CITATION.findall(answer))
    return [
        {
            "source": number,
            "by": "model",
            "verified": 1 <= number <= len(source_texts)
            and source_support(terms, source_texts[number - 1]) >= threshold,
        }
        for number in numbers
    ]
