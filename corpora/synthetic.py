"""A synthetic corpus for benchmarks: deterministic (by seed) records of plausible English prose.

Sentences are drawn from a fixed vocabulary with sentence templates, so chunk counts, token counts and
embeddings are realistic enough to measure throughput, memory and index quality at any size without data
downloads. Each record has an id, a title, a date and a text of a few paragraphs.
"""

import json
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import numpy as np


def _words(text: str) -> list[str]:
    return [word.strip() for word in " ".join(text.split()).split(",")]


_SUBJECTS = _words("""the committee, the workshop, the kitchen team, our volunteers, the treasurer, the board,
the library, the solar cooperative, the bike mechanics, the newsletter, the garden group, the tenants, the
coordinator, the city council, the youth club, the repair cafe, the food bank, the harbor office, the school,
the orchestra, the night shift, the caretaker, the chess club, the choir, the press office""")
_VERBS = _words("""approved, reviewed, postponed, announced, organised, repaired, funded, discussed, cancelled,
extended, published, measured, replaced, cleaned, rented, borrowed, welcomed, trained, scheduled, recorded,
questioned, simplified, doubled, inspected, painted""")
_ADJECTIVES = _words("""new, old, shared, broken, seasonal, yearly, temporary, larger, cheaper, quiet, public,
second, electric, wooden, upstairs, outdoor""")
_OBJECTS = _words("""budget, roof, spring market, membership fee, heating system, tool deposit, opening hours,
volunteer rota, insurance policy, bicycle trailer, community fridge, rainwater tank, meeting minutes, event
calendar, solar panels, kitchen freezer, wifi network, parking rules, paint supplies, first aid kit, bread
oven, storage room, website, key cabinet, cargo bike, sound system, compost heap, notice board""")
_TAILS = _words("""after a long debate, before the winter, for the next two years, with support from the city,
at the last general meeting, despite the rain, on short notice, as agreed in March, to save energy, because
prices rose, without any objection, for the first time, until further notice, in the east wing, by the end of
the month""")
_NUMBERS = ["twelve", "forty", "three hundred", "nine", "sixty-five", "two thousand", "eighteen"]


def synthetic_records(n_records: int, seed: int = 0, sentences: tuple[int, int] = (6, 30)) -> Iterator[dict]:
    """`n_records` records; the same seed always gives the same records."""
    rng = np.random.default_rng(seed)
    first_day = date(2019, 1, 1)
    for number in range(n_records):
        n_sentences = int(rng.integers(*sentences))
        paragraphs, paragraph = [], []
        for _ in range(n_sentences):
            paragraph.append(_sentence(rng))
            if len(paragraph) >= 4 and rng.random() < 0.3:
                paragraphs.append(" ".join(paragraph))
                paragraph = []
        paragraphs.append(" ".join(paragraph))
        subject = _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
        yield {
            "id": f"rec-{seed}-{number}",
            "title": f"Notes {number}: {subject} and the {_OBJECTS[int(rng.integers(len(_OBJECTS)))]}",
            "date": (first_day + timedelta(days=int(rng.integers(0, 2500)))).isoformat(),
            "text": "\n\n".join(p for p in paragraphs if p),
        }


def _sentence(rng: np.random.Generator) -> str:
    subject = _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
    verb = _VERBS[int(rng.integers(len(_VERBS)))]
    obj = (
        f"the {_ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]} {_OBJECTS[int(rng.integers(len(_OBJECTS)))]}"
    )
    tail = _TAILS[int(rng.integers(len(_TAILS)))]
    if rng.random() < 0.3:
        tail += f", with {_NUMBERS[int(rng.integers(len(_NUMBERS)))]} people attending"
    return f"{subject.capitalize()} {verb} {obj} {tail}."


def write_synthetic_jsonl(path: Path, n_records: int, seed: int = 0) -> Path:
    """Write a synthetic corpus as JSONL (columns id, title, date, text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in synthetic_records(n_records, seed):
            handle.write(json.dumps(record) + "\n")
    return path
