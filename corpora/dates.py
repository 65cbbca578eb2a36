"""The date a document speaks for, and dates in free text.

A document's date comes from, in order: its front matter (`date:`, then `updated:`, then `effective:`; in
reStructuredText the docinfo fields `:Date:` … under the title), a date in its file name, its modification
time (UTC). A value that is not a real date (2024-13-45) is passed over and the next source is tried;
nothing here raises on odd input.
"""

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

FRONT_MATTER_DATE_KEYS = ("date", "updated", "effective")
_FRONT_MATTER_SCAN_CHARS = 65_536  # front matter sits at the top; never scan a whole book for it

# English names, spelled out here: calendar.month_name follows the process locale.
_MONTH_NAMES = "january february march april may june july august september october november december".split()
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, start=1)}
_MONTHS |= {name[:3]: number for number, name in enumerate(_MONTH_NAMES, start=1)}
_MONTHS["sept"] = 9
_MONTH = r"(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(?P<day>\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(?P<year>\d{4})"

# (regex, precision); leftmost-longest match wins, so the order here does not matter.
_PHRASES = [
    (r"(?<![\d.])(?P<year>\d{4})(?P<sep>[-/.])(?P<month>\d{1,2})(?P=sep)(?P<day>\d{1,2})(?!\d)", "day"),
    (rf"\b{_MONTH}\s+{_DAY},?\s+{_YEAR}(?!\d)", "day"),  # March 15, 2024
    (rf"(?<![\d.]){_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}(?!\d)", "day"),  # 15 March 2024
    (rf"\b{_MONTH},?\s+(?:of\s+)?{_YEAR}(?!\d)", "month"),  # March 2024
    (r"(?<![\d.])(?P<year>\d{4})[-/](?P<month>\d{1,2})(?![-/.]?\d)", "month"),  # 2024-03
    (r"(?<![\d.,$/-])(?P<year>(?:19|20)\d\d)(?![\d,]|[-/.]\d)", "year"),  # 2024, only when standing alone
]
_PHRASE_PATTERNS = [(re.compile(pattern, re.IGNORECASE), precision) for pattern, precision in _PHRASES]

# File names: 2023-11-02, 2023_11_02, 2023.11.02, 20231102, then 2024-06 (first of the month).
_NAME_DAY = re.compile(r"(?<!\d)(?P<year>\d{4})(?P<sep>[-_.]?)(?P<month>\d{2})(?P=sep)(?P<day>\d{2})(?!\d)")
_NAME_MONTH = re.compile(r"(?<!\d)(?P<year>\d{4})[-_.](?P<month>\d{2})(?![-_.]?\d)")
_NAME_YEARS = range(1900, 2101)  # an 8-digit id in a file name is not a date

_FRONT_MATTER = re.compile(
    r"\A\ufeff?---[ \t]*\r?\n(?P<body>.*?)^(?:---|\.\.\.)[ \t]*\r?$", re.DOTALL | re.MULTILINE
)
# reStructuredText docinfo: a field list (":Date: 2024-03-15") right after the title, before the body.
_RST_FIELD = re.compile(r"^:(?P<key>[^:\s][^:]*):(?:[ \t]+(?P<value>.*?))?[ \t]*$")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}$")
_RST_TITLE_LINES = 2  # a title and a subtitle may come before the docinfo; a paragraph may not
_FIELD = re.compile(r"^(?P<key>[A-Za-z_][\w-]*)[ \t]*:[ \t]*(?P<value>.*?)[ \t]*\r?$", re.MULTILINE)


@dataclass(frozen=True)
class DatePhrase:
    """A date found in text: the period it names (one day, month or year), and where it stands."""

    start: date
    end: date  # inclusive: "March 2024" -> 2024-03-01 .. 2024-03-31
    precision: str  # "day", "month" or "year"
    span: tuple[int, int]


def document_date(path: Path, text: str) -> date:
    """The date of a document: front matter, else file name, else modification time (UTC)."""
    fields = front_matter_fields(text)
    if not fields and Path(path).suffix.lower() == ".rst":
        fields = rst_docinfo_fields(text)
    for key in FRONT_MATTER_DATE_KEYS:
        found = parse_date_phrase(fields.get(key, ""))
        if found:
            return found
    found = date_in_file_name(Path(path).name)
    if found:
        return found
    return datetime.fromtimestamp(Path(path).stat().st_mtime, tz=UTC).date()


def front_matter_fields(text: str) -> dict[str, str]:
    """Top-level `key: value` pairs of a YAML front-matter block (--- … --- at the very top), keys lowercased."""
    match = _FRONT_MATTER.match(text[:_FRONT_MATTER_SCAN_CHARS])
    if not match:
        return {}
    fields: dict[str, str] = {}
    for line in _FIELD.finditer(match["body"]):
        value = re.sub(r"\s+#.*$", "", line["value"]).strip().strip("'\"").strip()
        fields.setdefault(line["key"].lower(), value)
    return fields


def rst_docinfo_fields(text: str) -> dict[str, str]:
    """The `:Key: value` fields of a reStructuredText docinfo block under the title, keys lowercased."""
    fields: dict[str, str] = {}
    title_lines = 0
    for line in text[:_FRONT_MATTER_SCAN_CHARS].splitlines()[:50]:
        field = _RST_FIELD.match(line.rstrip())  # at column 0: an indented ":local:" is a directive option
        if field:
            fields.setdefault(field["key"].strip().lower(), field["value"] or "")
        elif fields or line.startswith(".. "):
            break  # the field list has ended, or the body (a directive) has begun
        elif line.strip() and not _RST_ADORNMENT.match(line.strip()):
            title_lines += 1
            if title_lines > _RST_TITLE_LINES:
                break
    return fields


def date_in_file_name(name: str) -> date | None:
    """A date written in a file name (2023-11-02, 2023_11_02, 20231102, 2024-06), if any."""
    for pattern in (_NAME_DAY, _NAME_MONTH):
        for match in pattern.finditer(name):
            year = int(match["year"])
            day = int(match.groupdict().get("day") or 1)
            found = _valid_date(year, int(match["month"]), day)
            if found and year in _NAME_YEARS:
                return found
    return None


def parse_date_phrase(text: str) -> date | None:
    """The first date named in free text ("March 2024", "2024-03-15", "15 March 2024"); its first day."""
    phrases = find_date_phrases(text)
    return phrases[0].start if phrases else None


def find_date_phrases(text: str) -> list[DatePhrase]:
    """Every date phrase in `text`, left to right, the longest where two overlap. A phrase that is not a
    real date ("February 30, 2024") is dropped whole: its year alone does not count as a date either."""
    matches: list[tuple[tuple[int, int], DatePhrase | None]] = []
    for pattern, precision in _PHRASE_PATTERNS:
        matches.extend((match.span(), _phrase(match, precision)) for match in pattern.finditer(text))
    matches.sort(key=lambda item: (item[0][0], item[0][0] - item[0][1]))
    phrases: list[DatePhrase] = []
    taken_until = 0
    for (start, end), phrase in matches:
        if start >= taken_until:
            taken_until = end
            if phrase:
                phrases.append(phrase)
    return phrases


def _phrase(match: re.Match, precision: str) -> DatePhrase | None:
    year = int(match["year"])
    month_text = match.groupdict().get("month") or "1"
    if month_text == "may":
        return None  # "you may 2024 …": the verb, not the month (which is written May)
    month = int(month_text) if month_text.isdigit() else _MONTHS[month_text.lower()]
    day = int(match.groupdict().get("day") or 1)
    start = _valid_date(year, month, day)
    if start is None or year < 1000:
        return None
    if precision == "day":
        end = start
    elif precision == "month":
        end = start.replace(day=calendar.monthrange(year, month)[1])
    else:
        end = date(year, 12, 31)
    return DatePhrase(start=start, end=end, precision=precision, span=match.span())


def _valid_date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None
