"""Token-aware chunking with overlap that keeps exact character offsets and line numbers.

The text is tokenised once; every later step is index arithmetic on numpy arrays. A window of `max_tokens`
tokens is cut at the best boundary in its last quarter (paragraph > sentence end > line > word), and the next
window starts `overlap_tokens` back, snapped to a good boundary too. Chunks never start or end in whitespace,
so `document[chunk.char_start:chunk.char_end] == chunk.text` and the lines are those of its first and last
character.
"""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

TokenSpans = Callable[[str], Sequence[tuple[int, int]]]

BOUNDARY_SEARCH_FRACTION = 0.25  # look for a cut point in the last quarter of a full window

# Boundary quality of a cut between two tokens, best first.
_PARAGRAPH, _SENTENCE_AND_LINE, _SENTENCE, _LINE, _WORD, _NONE = 5, 4, 3, 2, 1, 0

# Every code point for which str.isspace() is true.
_WHITESPACE = np.array(
    [*range(0x09, 0x0E), *range(0x1C, 0x21), 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029]
    + [0x202F, 0x205F, 0x3000],
    dtype=np.uint32,
)
_SENTENCE_END = np.array([ord(c) for c in ".!?…。！？"], dtype=np.uint32)
_CLOSERS = np.array([ord(c) for c in "\"')]”’»"], dtype=np.uint32)  # a sentence may end as: ... end."


@dataclass(frozen=True)
class Chunk:
    text: str
    char_start: int
    char_end: int  # exclusive: text == document[char_start:char_end]
    line_start: int  # 1-based, inclusive
    line_end: int


def chunk_text(
    text: str, token_spans: TokenSpans, max_tokens: int = 200, overlap_tokens: int = 40
) -> list[Chunk]:
    """Cut `text` into chunks of at most `max_tokens` tokens, consecutive chunks sharing ~`overlap_tokens`."""
    if max_tokens < 1 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"need max_tokens >= 1 and 0 <= overlap_tokens < max_tokens, got {max_tokens}, {overlap_tokens}"
        )
    if not text or text.isspace():
        return []
    layout = _Layout(text)
    starts, ends = _clean_spans(token_spans(text), len(text))
    n = len(starts)
    if n == 0:  # the tokenizer saw nothing it keeps (control characters only, say): one plain chunk
        chunk = layout.chunk(0, len(text))
        return [chunk] if chunk else []
    scores = _boundary_scores(layout, starts)
    search = max(1, int(max_tokens * BOUNDARY_SEARCH_FRACTION))

    # Windows start at the next token with something in it: a window never begins with whitespace tokens
    # (newlines in byte-level BPE), which would waste its budget or repeat the previous chunk's start.
    solid_token = layout.solid_start[starts] < ends
    next_solid = np.minimum.accumulate(np.where(solid_token, np.arange(n), n)[::-1])[::-1]

    chunks: list[Chunk] = []
    first = 0
    while True:
        first = int(next_solid[first]) if first < n else n
        if first >= n:
            return chunks
        last = first + max_tokens  # candidate cut: tokens [first, cut) form the chunk
        if last >= n:
            cut = n
        else:
            lowest = max(first + 1, last - search + 1)
            window = scores[lowest : last + 1]
            cut = last - int(np.argmax(window[::-1]))  # best boundary, the latest among equals
        chunk = layout.chunk(int(starts[first]), int(ends[cut - 1]))
        if chunk:  # always, as the first token has text; kept as a guard
            chunks.append(chunk)
        if cut >= n:
            return chunks
        first = _next_start(scores, first, cut, overlap_tokens)


def _next_start(scores: np.ndarray, first: int, cut: int, overlap_tokens: int) -> int:
    """Where the next window starts: `overlap_tokens` before the cut, moved up to half of that later to a
    better boundary; always after `first`, so every window makes progress."""
    if overlap_tokens == 0:
        return cut
    lowest = max(first + 1, cut - overlap_tokens)
    highest = max(lowest, cut - overlap_tokens // 2)
    return lowest + int(np.argmax(scores[lowest : highest + 1]))  # the earliest among equals: more overlap


class _Layout:
    """Per-character arrays of one text: where non-whitespace starts and ends, and newline counts."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        size = len(self.codes)
        index = np.int32 if size < 2**31 - 1 else np.int64  # half the memory for any real document
        solid = ~np.isin(self.codes, _WHITESPACE)
        positions = np.arange(size, dtype=index)
        # solid_end[p]: end of the last non-whitespace character before p (0 if none) — an rstrip of text[:p]
        self.solid_end = np.zeros(size + 1, dtype=index)
        self.solid_end[1:] = np.maximum.accumulate(np.where(solid, positions + 1, index(0)))
        # solid_start[p]: the first non-whitespace character at or after p (len if none) — an lstrip of text[p:]
        self.solid_start = np.full(size + 1, size, dtype=index)
        self.solid_start[:size] = np.minimum.accumulate(np.where(solid, positions, index(size))[::-1])[::-1]
        # newlines[p]: how many "\n" there are in text[:p]
        self.newlines = np.zeros(size + 1, dtype=index)
        self.newlines[1:] = np.cumsum(self.codes == 10, dtype=index)

    def chunk(self, start: int, end: int) -> Chunk | None:
        """The chunk of text[start:end] without its surrounding whitespace; None if nothing is left."""
        start, end = int(self.solid_start[start]), int(self.solid_end[end])
        if end <= start:
            return None
        return Chunk(
            text=self.text[start:end],
            char_start=start,
            char_end=end,
            line_start=int(self.newlines[start]) + 1,
            line_end=int(self.newlines[end - 1]) + 1,
        )


def _clean_spans(spans: Sequence[tuple[int, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token starts and ends, in text order, without empty spans (padding, special tokens)."""
    if isinstance(spans, np.ndarray):
        flat = spans.astype(np.int64, copy=False).ravel()
    else:  # several times faster than np.asarray on a long list of tuples
        flat = np.fromiter(itertools.chain.from_iterable(spans), dtype=np.int64, count=2 * len(spans))
    array = flat.reshape(-1, 2).clip(0, size)
    array = array[array[:, 1] > array[:, 0]]
    if len(array) > 1 and np.any(np.diff(array[:, 0]) < 0):
        array = array[np.argsort(array[:, 0], kind="stable")]
    starts = array[:, 0].copy()
    ends = np.maximum.accumulate(array[:, 1]) if len(array) else array[:, 1].copy()  # cover every token
    return starts, ends


def _boundary_scores(layout: _Layout, starts: np.ndarray) -> np.ndarray:
    """scores[k]: how good a cut right before token k is (k = 1 … n-1; the ends score best)."""
    before = layout.solid_end[starts]  # end of the text before the gap around the cut
    after = layout.solid_start[starts]  # start of the text after it
    has_space = after > before
    newlines = layout.newlines[after] - layout.newlines[before]
    codes = layout.codes
    last_char = codes[np.maximum(before - 1, 0)]
    char_before_last = codes[np.maximum(before - 2, 0)]
    ends_sentence = (before > 0) & (
        np.isin(last_char, _SENTENCE_END)
        | (np.isin(last_char, _CLOSERS) & (before > 1) & np.isin(char_before_last, _SENTENCE_END))
    )
    scores = np.select(
        [
            newlines >= 2,
            ends_sentence & (newlines == 1),
            ends_sentence & has_space,
            newlines == 1,
            has_space,
        ],
        [_PARAGRAPH, _SENTENCE_AND_LINE, _SENTENCE, _LINE, _WORD],
        default=_NONE,
    ).astype(np.int8)
    scores[0] = _PARAGRAPH
    return scores
