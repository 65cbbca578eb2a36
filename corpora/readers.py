"""Turn one document file into plain text: text and code as on disk, HTML and PDF as extracted text.

Text files are returned exactly as decoded from disk (no newline translation, front matter kept) so that
character offsets and line numbers of chunks point into the real file. The only change is a dropped UTF-8
byte-order mark, which editors do not show either.
"""

import io
import logging
import re
from pathlib import Path

from dsarag.base.errors import EXIT_MISSING_INPUT, DsaragError

# The one table of file types: extension -> how to read it. An extension not listed is read as text if the
# file is UTF-8 (README, Makefile, .cfg, ...); walk.py sniffs those before they get here.
_TEXT = """
    .txt .text .md .markdown .mdown .mkd .rst .adoc .org .tex .csv .tsv .ini .cfg .conf .properties
    .py .pyi .js .jsx .mjs .cjs .ts .tsx .go .rs .java .kt .kts .scala .c .h .cc .cpp .cxx .hpp .hh .cs
    .rb .php .swift .m .mm .lua .pl .pm .r .jl .hs .ml .ex .exs .erl .clj .dart .vue .svelte .zig .nim
    .sh .bash .zsh .fish .ps1 .bat .cmd .mk .cmake .gradle .toml .yaml .yml .json .jsonl .xml .sql .proto
    .graphql .css .scss .sass .less .tf .hcl .nix .dockerfile
"""
# Known non-documents: skipped with a reason the user can act on instead of a generic "binary file".
_UNSUPPORTED = """
    .png .jpg .jpeg .gif .bmp .ico .webp .svg .tif .tiff .zip .gz .tgz .bz2 .xz .zst .7z .rar .tar .whl
    .doc .docx .xls .xlsx .ppt .pptx .odt .ods .odp .epub .mp3 .wav .flac .ogg .mp4 .mkv .mov .avi .webm
    .exe .dll .so .dylib .o .a .class .jar .pyc .wasm .db .sqlite .parquet .npy .npz .pkl .pt .safetensors
    .gguf .bin .ttf .otf .woff .woff2 .ipynb
"""
EXTENSION_KINDS: dict[str, str] = {
    **dict.fromkeys(_TEXT.split(), "text"),
    **dict.fromkeys([".html", ".htm", ".xhtml"], "html"),
    ".pdf": "pdf",
    **dict.fromkeys(_UNSUPPORTED.split(), "unsupported"),
}

# A text file may carry a few stray bytes (one bad paste); more than this and it is another encoding.
MAX_INVALID_FRACTION = 0.01

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class UnreadableDocumentError(DsaragError):
    """A document that exists but cannot be turned into text; the message says why and what to do."""

    exit_code = EXIT_MISSING_INPUT

    def __init__(self, path: Path | str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{path}: {reason}", path)


def kind_of(path: Path) -> str | None:
    """'text', 'html', 'pdf' or 'unsupported' for a known extension; None for an unknown one."""
    return EXTENSION_KINDS.get(path.suffix.lower())


def read_document(path: Path) -> str:
    """The plain text of one document file."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "unsupported":
        raise UnreadableDocumentError(path, f"unsupported file type {path.suffix} — export it to PDF or text")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableDocumentError(
            path, "file not found — it was moved or deleted; run ingest again"
        ) from None
    except OSError as error:
        raise UnreadableDocumentError(
            path, f"cannot read ({error.strerror}) — check its permissions"
        ) from None
    if kind == "pdf":
        return _pdf_text(path, data)
    if kind == "html":
        return _html_text(data)
    return decode_text(path, data)


def decode_text(path: Path, data: bytes) -> str:
    """UTF-8 text as on disk; a few invalid bytes become U+FFFD, a file in another encoding is refused."""
    if data.startswith(UTF16_BOMS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise UnreadableDocumentError(path, "broken UTF-16 text — re-save it as UTF-8") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") / max(len(text), 1)
    if invalid > MAX_INVALID_FRACTION:
        raise UnreadableDocumentError(
            path,
            f"not UTF-8 text ({invalid:.0%} of it is invalid) — convert it, e.g. `iconv -f latin1 -t utf-8`",
        )
    return text


# --- HTML -------------------------------------------------------------------------------------------------

# Private-use characters mark the breaks we insert, so they survive the whitespace collapse below.
_PARAGRAPH = "\ue000"
_LINE = "\ue001"
_BLOCK_TAGS = {
    "p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "blockquote", "pre",
    "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd", "table", "tr", "figure",
    "figcaption", "hr", "address", "details", "summary", "form", "fieldset",
}  # fmt: skip
_LINE_TAGS = {"br", "td", "th"}
_DROP_TAGS = {"script", "style", "noscript", "template", "iframe", "object", "svg", "canvas"}


def _html_text(data: bytes) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")  # bytes: bs4 picks the encoding from <meta charset> or content
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if title_tag else ""
    flat = " ".join(_html_pieces(soup.body or soup, skip=title_tag).split())
    paragraphs = []
    for paragraph in flat.split(_PARAGRAPH):
        lines = [line.strip() for line in paragraph.split(_LINE)]
        text = "\n".join(line for line in lines if line)
        if text:
            paragraphs.append(text)
    if title and not (paragraphs and paragraphs[0] == title):
        paragraphs.insert(0, title)
    return "\n\n".join(paragraphs)


def _html_pieces(root: object, skip: object) -> str:
    """The visible text of the tree with break marks around block tags and after line tags. An explicit stack,
    one visit per node: deeply nested HTML (thousands of levels) costs linear time and no recursion."""
    from bs4 import CData, NavigableString, Tag

    pieces: list[str] = []
    pre_depth = 0
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if isinstance(node, NavigableString):
            if type(node) in (NavigableString, CData):  # not comments, doctypes, processing instructions
                pieces.append(str(node).replace("\n", _LINE) if pre_depth else str(node))
            continue
        if not isinstance(node, Tag) or node is skip or node.name in _DROP_TAGS:
            continue
        if leaving:
            pre_depth -= node.name == "pre"
            if node.name in _BLOCK_TAGS:
                pieces.append(_PARAGRAPH)
            elif node.name in _LINE_TAGS:
                pieces.append(_LINE)
            continue
        if node.name in _BLOCK_TAGS:
            pieces.append(_PARAGRAPH)
        pre_depth += node.name == "pre"
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(node.contents))
    return "".join(pieces)


# --- PDF --------------------------------------------------------------------------------------------------


def _pdf_text(path: Path, data: bytes) -> str:
    if b"%PDF-" not in data[:1024]:
        raise UnreadableDocumentError(
            path, "not a PDF (no %PDF header) — rename it or remove it from the folder"
        )
    # pypdf logs every repair it makes on a damaged file; the user gets our one-line error instead.
    pypdf_logger = logging.getLogger("pypdf")
    saved_level = pypdf_logger.level
    pypdf_logger.setLevel(logging.ERROR)
    try:
        return _pdf_pages_text(path, data)
    finally:
        pypdf_logger.setLevel(saved_level)


def _pdf_pages_text(path: Path, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # many PDFs only carry an empty-password lock
            raise UnreadableDocumentError(path, "PDF is password-protected — save a decrypted copy instead")
        pages = list(reader.pages)
    except UnreadableDocumentError:
        raise
    except DependencyError:
        raise UnreadableDocumentError(
            path, "PDF uses AES encryption — `pip install cryptography` or save a decrypted copy"
        ) from None
    except Exception as error:  # pypdf raises many types on malformed input
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:160]
        raise UnreadableDocumentError(path, f"broken PDF ({detail}) — re-export or repair it") from None
    texts = []
    failed_pages = 0
    for page in pages:
        try:
            page_text = page.extract_text() or ""
        except Exception:  # one bad page should not lose the rest of the document
            failed_pages += 1
            continue
        page_text = _strip_trailing_spaces(page_text).strip("\n")
        if page_text.strip():
            texts.append(page_text)
    if not texts:
        if pages and failed_pages == len(pages):
            raise UnreadableDocumentError(path, "broken PDF (no page could be read) — re-export or repair it")
        raise UnreadableDocumentError(
            path, "PDF has no text layer (scanned?) — run OCR on it, e.g. `ocrmypdf`"
        )
    return "\n\n".join(texts)


def _strip_trailing_spaces(text: str) -> str:
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
