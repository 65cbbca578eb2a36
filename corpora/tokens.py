"""Character spans of tokens, from a Hugging Face tokenizer.json, for chunk_text."""

from collections.abc import Callable
from pathlib import Path

from dsarag.base.errors import ModelError

SLICE_CHARS = 100_000  # long texts are encoded a slice at a time, so memory stays bounded
SLICES_PER_BATCH = 8  # slices encoded together, in parallel threads by the tokenizers library


def token_spans_from_tokenizer_json(path: Path) -> Callable[[str], list[tuple[int, int]]]:
    """A function giving the (start, end) character span of every token of a text, in text order."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: tokenizer.json not found — run `dsarag models pull`", path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception on a bad file
        raise ModelError(
            f"{path}: not a valid tokenizer.json ({error}) — run `dsarag models pull` again", path
        ) from None
    # Model files often ship with truncation (to the model's context) and padding on: both would lose or
    # invent tokens here.
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def token_spans(text: str) -> list[tuple[int, int]]:
        slices = _slice_bounds(text, SLICE_CHARS)
        spans: list[tuple[int, int]] = []
        for first in range(0, len(slices), SLICES_PER_BATCH):
            batch = slices[first : first + SLICES_PER_BATCH]
            encodings = tokenizer.encode_batch(
                [text[start:end] for start, end in batch], add_special_tokens=False
            )
            for (offset, _), encoding in zip(batch, encodings, strict=True):
                spans.extend((offset + start, offset + end) for start, end in encoding.offsets if end > start)
        return spans

    return token_spans


def _slice_bounds(text: str, slice_chars: int) -> list[tuple[int, int]]:
    """Slices of about `slice_chars` that begin at a whitespace run (a line break where there is one), so no
    token is cut in two and a leading space stays with the word it belongs to."""
    bounds = []
    start = 0
    while len(text) - start > slice_chars:
        limit = start + slice_chars
        cut = text.rfind("\n", start + slice_chars // 2, limit)
        if cut < 0:
            cut = max(
                text.rfind(" ", start + slice_chars // 2, limit),
                text.rfind("\t", start + slice_chars // 2, limit),
            )
        if cut < 0:
            cut = limit  # one enormous "word": cutting it can only change the tokens right at the cut
        while cut > start + slice_chars // 2 and text[cut - 1].isspace():
            cut -= 1
        bounds.append((start, cut))
        start = cut
    bounds.append((start, len(text)))
    return bounds
