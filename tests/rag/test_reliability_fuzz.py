"""Fuzzing (hypothesis) of the per-file path of ingest — walk, read, date, chunk — and of corpus files and
date parsing: random bytes, invalid UTF-8, huge lines, deep HTML, empty files, odd dates. Nothing may crash:
a file either gives chunks that point exactly into its text, or one clear per-file error naming it and the
fix. CI runs a few dozen cases per test; the recorded run (docs/reliability.md) sets DSARAG_FUZZ_EXAMPLES."""

import json
import os
import string
from datetime import date
from itertools import count
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsarag.corpora.corpus_files import BadRecord, CorpusColumns, CorpusRecord, iter_record_blocks
from dsarag.corpora.dates import date_in_file_name, find_date_phrases, front_matter_fields
from dsarag.corpora.readers import read_document
from dsarag.corpora.walk import walk_folder
from dsarag.rag.ingest import Source, WorkItem, chunk_work_item, init_worker

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("DSARAG_FUZZ_EXAMPLES", "25"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,  # shared CI machines: a slow case is not a failure
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
SUFFIXES = [".txt", ".md", ".rst", ".html", ".htm", ".pdf", ".py", ".json", ".csv", "", ".weird"]
_names = count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, embedder_tokenizer_json) -> Path:
    init_worker(embedder_tokenizer_json, "all-minilm-l6-v2")  # what every ingest worker process does
    return tmp_path_factory.mktemp("fuzz")


def ingest_one_file(folder: Path, name: str, data: bytes) -> None:
    """Walk, read, date and chunk one file as ingest does, and check the outcome."""
    case = folder / f"case-{next(_names)}"
    case.mkdir()
    path = case / name
    path.write_bytes(data)
    walk = walk_folder(case)
    if name.startswith("."):  # hidden files are passed over silently, like .git
        assert walk.files == walk.skipped == []
        return
    if not walk.files:  # skipped by the walk: one reason, naming the fix or the cause
        assert len(walk.skipped) == 1 and walk.skipped[0].reason
        return
    result = chunk_work_item(WorkItem(Source(name, path, corpus=False), "0" * 64))
    if result.failures:  # a clear per-file error: one line, naming the file (its path), saying what to do
        (failure,) = result.failures
        assert not result.rows and failure.path == name
        assert str(path) not in failure.reason and "—" in failure.reason and "\n" not in failure.reason
        return
    text = read_document(path)
    assert isinstance(result.record.date, str) and date.fromisoformat(result.record.date)
    for row in result.rows:
        assert row["text"] == text[row["char_start"] : row["char_end"]] and row["text"].strip()
        assert 1 <= row["line_start"] <= row["line_end"] <= text.count("\n") + 1
        assert row["n_tokens"] <= 256
    assert bool(result.rows) == bool(text.strip())  # text in, chunks out; nothing from nothing


@fuzz
@given(data=st.binary(max_size=4096), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_in_any_file_type(workdir, data, suffix):
    ingest_one_file(workdir, f"doc{suffix}", data)


def _spliced_text(draw_text: str, junk: bytes, position: float) -> bytes:
    encoded = draw_text.encode("utf-8", errors="surrogatepass")
    at = int(len(encoded) * position)
    return encoded[:at] + junk + encoded[at:]


@fuzz
@given(
    text=st.text(max_size=2000),
    junk=st.binary(max_size=64),
    position=st.floats(0, 1),
    suffix=st.sampled_from([".txt", ".md", ".html", ".rst", ""]),
    bom=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]),
)
def test_text_with_invalid_utf8_and_odd_byte_order_marks(workdir, text, junk, position, suffix, bom):
    ingest_one_file(workdir, f"note{suffix}", bom + _spliced_text(text, junk, position))


@fuzz
@given(
    unit=st.text(min_size=1, max_size=12),
    repeat=st.integers(1, 40_000),
    lines=st.integers(1, 3),
    suffix=st.sampled_from([".txt", ".md", ".py"]),
)
def test_huge_lines(workdir, unit, repeat, lines, suffix):
    line = (unit * repeat)[:300_000]
    ingest_one_file(
        workdir, f"long{suffix}", "\n".join([line] * lines).encode("utf-8", errors="surrogatepass")
    )


@fuzz
@given(
    depth=st.integers(0, 6000),
    tag=st.sampled_from(["div", "p", "b", "span", "li", "table", "td", "pre", "script", "a"]),
    inner=st.text(max_size=200),
    close=st.booleans(),
    unclosed_junk=st.sampled_from(["", "<", "<!--", "<![CDATA[", "&#x110000;", "&bogus;", "<br/" * 50]),
)
def test_deeply_nested_and_broken_html(workdir, depth, tag, inner, close, unclosed_junk):
    html = (
        f"<html><head><title>{inner[:20]}</title></head><body>" + f"<{tag}>" * depth + inner + unclosed_junk
    )
    if close:
        html += f"</{tag}>" * depth + "</body></html>"
    ingest_one_file(workdir, "page.html", html.encode("utf-8", errors="surrogatepass"))


DATE_PIECES = st.sampled_from(
    ["2024-02-30", "2024-13-45", "0000-00-00", "9999-12-31", "1-1-1", "31 February 2023", "May 2024",
     "March 15, 99999", "2024/06", "20240615", "July 4th, 1776", "---", ":", "'", "2024-06-15T25:61:00Z", "",
     "sept. 3 2021", "１２３４-05-06", "2024\u20136\u201315"]
)  # fmt: skip


@fuzz
@given(
    value=st.one_of(DATE_PIECES, st.text(max_size=40)),
    key=st.sampled_from(["date", "updated", "effective", "Date", "title"]),
    name_date=st.one_of(DATE_PIECES, st.text(alphabet=string.digits + "-_.", max_size=12)),
    style=st.sampled_from(["front matter", "rst", "none"]),
    body=st.text(max_size=300),
)
def test_odd_dates_in_front_matter_docinfo_and_file_names(workdir, value, key, name_date, style, body):
    head = {
        "front matter": f"---\n{key}: {value}\n---\n",
        "rst": f"Title\n=====\n\n:{key}: {value}\n\n",
        "none": "",
    }[style]
    suffix = ".rst" if style == "rst" else ".md"
    safe_name = "".join(c for c in name_date if c not in "/\0") or "x"
    ingest_one_file(
        workdir, f"{safe_name}-note{suffix}"[:200], (head + body).encode("utf-8", "surrogatepass")
    )


@fuzz
@given(text=st.text(max_size=500), name=st.text(max_size=60))
def test_date_parsing_of_free_text_never_raises(text, name):
    for phrase in find_date_phrases(text):
        assert phrase.start <= phrase.end and 0 <= phrase.span[0] < phrase.span[1] <= len(text)
    found = date_in_file_name(name)
    assert found is None or 1900 <= found.year <= 2100
    assert isinstance(front_matter_fields(text), dict)


@fuzz
@given(
    lines=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.builds(
                lambda text, extra: json.dumps({"text": text, "id": extra}).encode(),
                st.text(max_size=80),
                st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
            ),
            st.sampled_from(
                [b"{}", b"[]", b"null", b'{"text": null}', b'{"text": 5}', b'"text"', b"{" * 3000]
            ),
        ),
        max_size=20,
    ),
    kind=st.sampled_from(["jsonl", "csv"]),
)
def test_corpus_files_give_records_or_per_record_errors(workdir, lines, kind):
    path = workdir / f"corpus-{next(_names)}.{kind}"
    payload = b"\n".join(lines)
    path.write_bytes((b"text,id\n" + payload) if kind == "csv" else payload)
    try:
        for block in iter_record_blocks(path, CorpusColumns(id="id"), 0, 7):
            for record in block:
                assert isinstance(record, CorpusRecord | BadRecord)
                if isinstance(record, BadRecord):
                    assert record.reason and "\n" not in record.reason
                else:
                    assert isinstance(record.text, str) and record.text
    except (ValueError, OSError, pa.ArrowException) as error:  # what ingest reports as a per-file failure
        assert str(error)
