"""Cheap features of a question (no model): date window, recency words, identifiers, comparison, length.

They are evidence for the agent's decisions, combined there with the local LLM's label scores.
"""

import calendar
import re
from dataclasses import dataclass
from datetime import date

from dsarag.corpora.dates import DatePhrase, find_date_phrases

# "as of March 2024" bounds the period from above; "in 2023" names the period itself.
_UPPER_BOUND_WORDS = re.compile(r"\b(as of|as at|from|since|starting|effective|by|until|before)\s*$", re.I)
_RECENCY_WORDS = re.compile(
    r"\b(latest|current(ly)?|now|today|newest|most recent(ly)?|these days|nowadays|still|at present|"
    r"right now|up[- ]to[- ]date)\b",
    re.I,
)
_SEASON = re.compile(
    r"\b(?P<season>spring|summer|autumn|fall|winter)\s+(?:of\s+)?(?P<year>(?:19|20)\d\d)\b", re.I
)
_SEASON_MONTHS = {"spring": (3, 5), "summer": (6, 8), "autumn": (9, 11), "fall": (9, 11), "winter": (12, 2)}
# Codes people look up verbatim: LHC-4471, SPK-BB-6803, RW-2.14, idle_timeout_minutes, LHC_STOCK_CSV,
# version numbers (3.8.1), e-mail addresses, and anything in quotes or backticks.
_IDENTIFIER = re.compile(
    r"\b[A-Z][A-Z0-9]*(?:[-_][A-Z0-9.]*[A-Z0-9])+\b"  # LHC-4471, SPK-BB-6803, RW-2.14, LHC_STOCK_CSV
    r"|\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b"  # snake_case config keys
    r"|\b\d+\.\d+\.\d+\b"  # versions
    r"|\b[\w.+-]+@[\w-]+\.[\w.]+\b"  # e-mail addresses
    r"|\b[A-Z][a-z]+[A-Z]\w*(?:-\w+)*"  # CamelCase names (HarborGuest-Ropewalk)
)
_QUOTED = re.compile(r"[\"“`'‘]([^\"”`'’\s]{2,60})[\"”`'’]")  # one quoted token: a name, not a phrase
_COMPARISON = re.compile(
    r"\b(compare[sd]?|comparison|versus|vs\.?|difference between|differ|change[sd]? (from|between|since)|"
    r"rose|fell|increase[sd]?|decrease[sd]?|than|higher|lower|both|between .+ and)\b",
    re.I,
)
# The sides of a comparison, named in the question: "between A and B", "Are A and B …?", "…, A or B?".
_NAME = r"[A-Z0-9\"'“][^,?]*?"
_COMPARED = [
    re.compile(rf"\b(?i:between) (?P<a>{_NAME}) and (?P<b>{_NAME})(?=[,?]|$)"),
    re.compile(
        rf"^(?:are|were|is|was|do|did|does|have|has|had)\s+(?:both\s+)?(?P<a>{_NAME}) and (?P<b>{_NAME})\s+(?=(?:both|the same|of the same|in the same|from the same|each|members|located|situated|from|considered|known|still|[a-z]+ed|[a-z]+s)\b)",
        re.I,
    ),
    re.compile(rf",\s*(?:the\s+)?(?P<a>{_NAME}) or (?:the\s+)?(?P<b>{_NAME})\s*\?\s*$"),
    # "Which band was formed first The Exies or Circus Diablo?": no comma before the sides.
    re.compile(
        rf"^(?i:which)\b[^,?]*?\b(?i:first|earlier|later|older|younger|larger|bigger|smaller|longer|shorter|taller|"
        rf"more|fewer)\s+(?:the\s+)?(?P<a>{_NAME}) or (?:the\s+)?(?P<b>{_NAME})\s*\?\s*$"
    ),
    re.compile(rf"^(?i:what do|what did) (?P<a>{_NAME}) and (?P<b>{_NAME}) (?i:have in common)"),
]
_SUMMARY = re.compile(r"\b(summari[sz]e|summary|overview|outline|main points|key points|tl;?dr)\b", re.I)
_REASONING = re.compile(r"\b(why|explain|step by step|reason|how would|what if|should)\b", re.I)
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class TimeWindow:
    """The period a question asks about; `start` None means open to the past ("as of …", "latest")."""

    start: date | None
    end: date | None  # None: up to now ("latest", "current")
    phrase: str

    def describe(self) -> str:
        if self.end is None:
            return f"newest available ({self.phrase!r})"
        start = self.start.isoformat() if self.start else "…"
        return f"{start} … {self.end.isoformat()} ({self.phrase!r})"


@dataclass(frozen=True)
class QueryFeatures:
    window: TimeWindow | None
    recency: bool  # asks for the newest state ("latest", "current", "as of …")
    identifiers: tuple[str, ...]
    comparison: bool
    compared: tuple[str, ...]  # the named sides of a comparison ("Marian Gold", "Jung Eun-ji"), else ()
    summary: bool
    reasoning: bool
    n_words: int

    def to_json(self) -> dict:
        return {
            "window": self.window.describe() if self.window else None,
            "recency": self.recency,
            "identifiers": list(self.identifiers),
            "comparison": self.comparison,
            "compared": list(self.compared),
            "summary": self.summary,
            "reasoning": self.reasoning,
            "words": self.n_words,
        }


def query_features(question: str) -> QueryFeatures:
    window = time_window(question)
    identifiers = [match.group(0) for match in _IDENTIFIER.finditer(question)]
    identifiers += [match.group(1) for match in _QUOTED.finditer(question)]
    compared = compared_sides(question)
    return QueryFeatures(
        window=window,
        recency=bool(_RECENCY_WORDS.search(question)) or (window is not None and window.start is None),
        identifiers=tuple(dict.fromkeys(identifiers)),
        comparison=bool(_COMPARISON.search(question)) or bool(compared),
        compared=compared,
        summary=bool(_SUMMARY.search(question)),
        reasoning=bool(_REASONING.search(question)),
        n_words=len(_WORD.findall(question)),
    )


def compared_sides(question: str) -> tuple[str, ...]:
    """The two things a comparison question names, each searched on its own by multi-query retrieval."""
    for pattern in _COMPARED:
        match = pattern.search(question.strip())
        if match:
            sides = tuple(side.strip(" \"'“”‘’") for side in (match["a"], match["b"]))
            if all(len(side) >= 2 for side in sides):
                return sides
    return ()


def time_window(question: str) -> TimeWindow | None:
    """The date window a question names: "as of March 2024" → (…, 2024-03-31); "in 2023" → the year;
    "in spring 2024" → March–May 2024; "latest"/"current" → open-ended (newest available)."""
    season = _SEASON.search(question)
    if season:
        first, last = _SEASON_MONTHS[season["season"].lower()]
        year = int(season["year"])
        start = date(year, first, 1)
        end_year = year + 1 if last < first else year
        end = _month_end(end_year, last)
        return TimeWindow(None if _bounded_above(question, season.start()) else start, end, season.group(0))
    phrases: list[DatePhrase] = [
        phrase for phrase in find_date_phrases(question) if not _in_a_name(question, phrase)
    ]
    if phrases:
        phrase = phrases[-1]  # "compared with 2023 … in 2025": the period asked about comes last
        text = question[phrase.span[0] : phrase.span[1]]
        start = None if _bounded_above(question, phrase.span[0]) else phrase.start
        return TimeWindow(start, phrase.end, text)
    recency = _RECENCY_WORDS.search(question)
    if recency:
        return TimeWindow(None, None, recency.group(0))
    return None


_DETERMINER_BEFORE = re.compile(r"\b(the|a|an|which|what|whose)\s*$", re.I)  # "the 2007 …", "Which 1988 …"


def _in_a_name(question: str, phrase: DatePhrase) -> bool:
    """A bare year that is part of a name or title is not a period asked about: "the 2007 FIFA U-20 Golden
    Shoe", "Kiss and Tell (1945 film)", "the album 'Live 1975'", "Which 1988 Telugu comedy …"."""
    if phrase.precision != "year":
        return False
    start, end = phrase.span
    before, after = question[:start], question[end:]
    if re.match(r"\s*[A-Z]", after) or (_DETERMINER_BEFORE.search(before) and re.match(r"\s+[a-z]", after)):
        return True
    inside_quotes = before.count('"') % 2 == 1 or before.count("“") > before.count("”")
    inside_parentheses = before.count("(") > before.count(")")
    return inside_quotes or inside_parentheses or bool(re.search(r"[A-Z][\w'-]*\s+$", before))


def _bounded_above(question: str, phrase_start: int) -> bool:
    return bool(_UPPER_BOUND_WORDS.search(question[:phrase_start]))


def _month_end(year: int, month: int) -> date:
    return date(year, month, calendar.monthrange(year, month)[1])
