"""chunk_text and token spans: exact offsets and lines, overlap, token limits, boundaries, speed."""

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsarag.corpora import tokens
from dsarag.corpora.chunking import Chunk, chunk_text
from dsarag.corpora.tokens import token_spans_from_tokenizer_json

WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")
WITH_SPACE_TOKENS = re.compile(r"\n|[^\S\n]+|\w+|[^\w\s]")  # like byte-level BPE: each newline is a token


def word_spans(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in WORD_OR_MARK.finditer(text)]


def spans_with_whitespace(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in WITH_SPACE_TOKENS.finditer(text)]


def tokens_in(chunk: Chunk, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [span for span in spans if chunk.char_start <= span[0] and span[1] <= chunk.char_end]


def prose(paragraphs: int, sentences: int = 4, words: int = 12) -> str:
    sentence = " ".join(f"word{index}" for index in range(words)) + "."
    return "\n\n".join(" ".join([sentence] * sentences) for _ in range(paragraphs))


def check_invariants(text: str, chunks: list[Chunk], spans: list[tuple[int, int]], max_tokens: int) -> None:
    for chunk in chunks:
        assert chunk.text == text[chunk.char_start : chunk.char_end]
        assert chunk.text.strip() == chunk.text != ""
        assert chunk.line_start == text.count("\n", 0, chunk.char_start) + 1
        assert chunk.line_end == text.count("\n", 0, chunk.char_end - 1) + 1
        assert len(tokens_in(chunk, spans)) <= max_tokens
    starts = [chunk.char_start for chunk in chunks]
    assert starts == sorted(set(starts))
    for span in spans:  # nothing is lost: every token that is not whitespace lies in a chunk
        if text[span[0] : span[1]].strip():
            assert any(chunk.char_start <= span[0] and span[1] <= chunk.char_end for chunk in chunks), span


def test_empty_or_whitespace_text_gives_no_chunks():
    assert chunk_text("", word_spans) == []
    assert chunk_text(" \n\n\t \n", word_spans) == []


def test_short_text_is_one_chunk_without_surrounding_whitespace():
    text = "\n\n  Hello there.\nSecond line.  \n"
    assert chunk_text(text, word_spans) == [Chunk("Hello there.\nSecond line.", 4, 29, 3, 4)]


def test_offsets_reproduce_the_text_and_lines_are_correct():
    text = prose(30)
    spans = word_spans(text)
    chunks = chunk_text(text, word_spans, max_tokens=50, overlap_tokens=10)
    assert len(chunks) > 10
    check_invariants(text, chunks, spans, 50)


def test_max_tokens_is_respected_and_windows_are_mostly_full():
    text = prose(40)
    spans = word_spans(text)
    chunks = chunk_text(text, word_spans, max_tokens=64, overlap_tokens=16)
    counts = [len(tokens_in(chunk, spans)) for chunk in chunks]
    assert max(counts) <= 64
    assert min(counts[:-1]) >= 48  # cuts are searched only in the last quarter of a window


def test_consecutive_chunks_overlap_by_about_overlap_tokens():
    text = prose(40)
    spans = word_spans(text)
    chunks = chunk_text(text, word_spans, max_tokens=64, overlap_tokens=16)
    for previous, current in zip(chunks, chunks[1:], strict=False):
        assert current.char_start < previous.char_end
        shared = set(tokens_in(previous, spans)) & set(tokens_in(current, spans))
        assert 8 <= len(shared) <= 16


def test_no_overlap_when_overlap_is_zero():
    text = prose(20)
    chunks = chunk_text(text, word_spans, max_tokens=40, overlap_tokens=0)
    for previous, current in zip(chunks, chunks[1:], strict=False):
        assert current.char_start >= previous.char_end


def test_cut_prefers_a_paragraph_break_in_the_last_quarter():
    # Paragraphs of 45 tokens (3 sentences of 14 words and a full stop): one ends in every window's last quarter.
    text = prose(12, sentences=3, words=14)
    chunks = chunk_text(text, word_spans, max_tokens=100, overlap_tokens=0)
    for chunk in chunks[:-1]:
        assert text[chunk.char_end : chunk.char_end + 2] == "\n\n"


def test_cut_prefers_a_sentence_end_to_a_line_break_inside_a_sentence():
    # Hard-wrapped prose: a line break every 4 words, a sentence end (11 tokens) every 10 words.
    words = [f"w{index}" + ("." if index % 10 == 9 else "") for index in range(400)]
    text = "\n".join(" ".join(words[start : start + 4]) for start in range(0, len(words), 4))
    chunks = chunk_text(text, word_spans, max_tokens=60, overlap_tokens=0)
    for chunk in chunks[:-1]:
        assert chunk.text.endswith(".")


def test_whitespace_tokens_never_make_whitespace_chunks():
    text = "First paragraph here.\n\n" + "\n" * 300 + "Second paragraph after many blank lines."
    spans = spans_with_whitespace(text)
    chunks = chunk_text(text, spans_with_whitespace, max_tokens=20, overlap_tokens=5)
    assert [chunk.text for chunk in chunks] == [
        "First paragraph here.",
        "Second paragraph after many blank lines.",
    ]
    check_invariants(text, chunks, spans, 20)


def test_invalid_window_settings_are_refused():
    with pytest.raises(ValueError):
        chunk_text("text", word_spans, max_tokens=10, overlap_tokens=10)
    with pytest.raises(ValueError):
        chunk_text("text", word_spans, max_tokens=0, overlap_tokens=0)


# Pieces rather than characters, so that runs of spaces, blank lines and long words are common.
text_strategy = st.lists(
    st.sampled_from(
        ["a", "b", "Z", " ", "  ", ".", "!", "?", ",", "\n", "\n\n", "\t", "\r\n", "é", "😀", "—", "xyz "]
    ),
    max_size=300,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    text=text_strategy,
    max_tokens=st.integers(min_value=1, max_value=40),
    overlap_fraction=st.floats(min_value=0, max_value=0.95),
    whitespace_tokens=st.booleans(),
)
def test_property_offsets_always_slice_back_to_the_chunk_text(
    text, max_tokens, overlap_fraction, whitespace_tokens
):
    overlap = min(int(max_tokens * overlap_fraction), max_tokens - 1)
    spans_of = spans_with_whitespace if whitespace_tokens else word_spans
    chunks = chunk_text(text, spans_of, max_tokens=max_tokens, overlap_tokens=overlap)
    check_invariants(text, chunks, spans_of(text), max_tokens)
    assert (chunks == []) == (text.strip() == "")


def test_a_megabyte_chunks_in_well_under_a_second():
    text = prose(2500, sentences=5, words=14)  # ~1 MB
    assert len(text) > 1_000_000
    spans = word_spans(text)
    started = time.perf_counter()
    chunks = chunk_text(text, lambda _text: spans, max_tokens=200, overlap_tokens=40)
    elapsed = time.perf_counter() - started
    assert len(chunks) > 1000
    assert elapsed < 1.0, f"chunking 1 MB took {elapsed:.2f}s"


def test_real_tokenizer_spans_chunk_within_the_embedder_limit(embedder_tokenizer_json):
    from tokenizers import Tokenizer

    spans_of = token_spans_from_tokenizer_json(embedder_tokenizer_json)
    text = "# Café notes\n\n" + prose(20, sentences=3) + "\n\nNaïve Straße — 😀 ünïcödé at the end."
    spans = spans_of(text)
    assert len(spans) > 128  # the shipped tokenizer.json truncates at 128: that must be switched off
    assert all(start < end for start, end in spans)
    assert text[slice(*spans[-1])] == "."
    chunks = chunk_text(text, spans_of, max_tokens=200, overlap_tokens=40)
    check_invariants(text, chunks, spans, 200)
    tokenizer = Tokenizer.from_file(str(embedder_tokenizer_json))
    tokenizer.no_truncation()
    for chunk in chunks:  # encoded on its own, as the embedder will see it, the chunk still fits
        assert len(tokenizer.encode(chunk.text, add_special_tokens=False).ids) <= 200


def test_long_text_encoded_in_slices_gives_the_same_spans_as_in_one_go(embedder_tokenizer_json, monkeypatch):
    text = prose(60, sentences=3)
    whole = token_spans_from_tokenizer_json(embedder_tokenizer_json)(text)
    monkeypatch.setattr(tokens, "SLICE_CHARS", 1000)
    monkeypatch.setattr(tokens, "SLICES_PER_BATCH", 3)
    assert len(tokens._slice_bounds(text, tokens.SLICE_CHARS)) > 10
    assert token_spans_from_tokenizer_json(embedder_tokenizer_json)(text) == whole


def test_slices_cover_the_text_and_start_at_whitespace():
    text = prose(40) + " " + "x" * 5000 + " end"
    bounds = tokens._slice_bounds(text, 1000)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(text)
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:], strict=False))
    assert all(500 <= end - start <= 1000 for start, end in bounds[:-1])
    assert all(text[start].isspace() for start, _ in bounds[1:] if start < len(prose(40)))
