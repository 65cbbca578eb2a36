"""document_date and parse_date_phrase: each source, their order, and odd dates that must not crash."""

import os
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from dsarag.corpora.dates import date_in_file_name, document_date, find_date_phrases, parse_date_phrase

MTIME = datetime(2021, 7, 4, 23, 30, tzinfo=UTC)  # 23:30 UTC: a local-time date could be the 5th


def doc(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    os.utime(path, (MTIME.timestamp(), MTIME.timestamp()))
    return path


@pytest.mark.parametrize(
    "value",
    [
        "2024-03-15",
        "2024/03/15",
        "'2024-03-15'",
        '"March 15, 2024"',
        "March 15, 2024",
        "15 March 2024",
        "2024-03-15T09:00:00Z",
    ],
)
def test_front_matter_date_in_each_format(tmp_path, value):
    path = doc(tmp_path, "note.md", f"---\ntitle: Bikes\ndate: {value}\n---\n# Bikes\n")
    assert document_date(path, path.read_text()) == date(2024, 3, 15)


def test_front_matter_updated_and_effective_are_fallbacks_for_date(tmp_path):
    updated = doc(tmp_path, "a.md", "---\nupdated: 2024-05-01\neffective: 2024-06-01\n---\nText\n")
    assert document_date(updated, updated.read_text()) == date(2024, 5, 1)
    effective = doc(tmp_path, "b.md", "---\nEffective: 2024-06-01\n---\nText\n")
    assert document_date(effective, effective.read_text()) == date(2024, 6, 1)
    both = doc(tmp_path, "c.md", "---\nupdated: 2024-05-01\ndate: 2023-01-09\n---\nText\n")
    assert document_date(both, both.read_text()) == date(2023, 1, 9)


def test_front_matter_wins_over_file_name_which_wins_over_mtime(tmp_path):
    with_both = doc(tmp_path, "2023-11-02-minutes.md", "---\ndate: 2024-03-15\n---\nMinutes\n")
    assert document_date(with_both, with_both.read_text()) == date(2024, 3, 15)
    name_only = doc(tmp_path, "2022-11-02-minutes.md", "Minutes\n")
    assert document_date(name_only, name_only.read_text()) == date(2022, 11, 2)
    neither = doc(tmp_path, "minutes.md", "Minutes of a meeting held on 1 May 2020.\n")
    assert document_date(neither, neither.read_text()) == MTIME.date()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("2023-11-02-minutes.md", date(2023, 11, 2)),
        ("minutes_2023_11_02.txt", date(2023, 11, 2)),
        ("report-20231102.pdf", date(2023, 11, 2)),
        ("2024-06 budget.md", date(2024, 6, 1)),
        ("v2.0-notes.md", None),
        ("id-12345678.txt", None),
    ],
)
def test_date_in_file_name(name, expected):
    assert date_in_file_name(name) == expected


def test_invalid_dates_fall_through_to_the_next_source(tmp_path):
    bad_front_matter = doc(
        tmp_path, "2023-11-02.md", "---\ndate: 2024-13-45\nupdated: not a date\n---\nText\n"
    )
    assert document_date(bad_front_matter, bad_front_matter.read_text()) == date(2023, 11, 2)
    bad_name = doc(tmp_path, "2024-13-45-notes.md", "No front matter.\n")
    assert document_date(bad_name, bad_name.read_text()) == MTIME.date()
    feb_30 = doc(tmp_path, "x.md", "---\ndate: February 30, 2024\n---\n")
    assert document_date(feb_30, feb_30.read_text()) == MTIME.date()


def test_front_matter_must_be_at_the_top_and_closed(tmp_path):
    later = doc(tmp_path, "later.md", "Intro\n---\ndate: 2024-03-15\n---\n")
    assert document_date(later, later.read_text()) == MTIME.date()
    unclosed = doc(tmp_path, "open.md", "---\ndate: 2024-03-15\nno closing line\n")
    assert document_date(unclosed, unclosed.read_text()) == MTIME.date()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("March 2024", date(2024, 3, 1)),
        ("as of 2024-03-15, the lead is", date(2024, 3, 15)),
        ("on 15 March 2024", date(2024, 3, 15)),
        ("on the 3rd of May 2022", date(2022, 5, 3)),
        ("Sept. 3, 2021", date(2021, 9, 3)),
        ("budget for 2024-06", date(2024, 6, 1)),
        ("Who leads the project as of 2025?", date(2025, 1, 1)),
        ("no date here, just 42 kWh", None),
        ("2024-13-45", None),
        ("", None),
    ],
)
def test_parse_date_phrase(text, expected):
    assert parse_date_phrase(text) == expected


def test_find_date_phrases_gives_the_period_and_position_of_each():
    text = "Between March 2023 and 15 June 2024"
    phrases = find_date_phrases(text)
    assert [(phrase.start, phrase.end, phrase.precision) for phrase in phrases] == [
        (date(2023, 3, 1), date(2023, 3, 31), "month"),
        (date(2024, 6, 15), date(2024, 6, 15), "day"),
    ]
    assert [text[slice(*phrase.span)] for phrase in phrases] == ["March 2023", "15 June 2024"]


def test_rst_docinfo_date_under_the_title_is_used(tmp_path):
    dated = doc(
        tmp_path, "report.rst", "Site report\n===========\n\n:Author: Ros\n:Date: 2024-03-15\n\nBody.\n"
    )
    assert document_date(dated, dated.read_text()) == date(2024, 3, 15)
    in_body = doc(
        tmp_path, "body.rst", "Title\n=====\n\nA paragraph.\nMore of it.\nAnd more.\n\n:Date: 2024-03-15\n"
    )
    assert document_date(in_body, in_body.read_text()) == MTIME.date()
