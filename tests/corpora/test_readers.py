"""read_document: text as on disk, HTML and PDF as clean text, clear errors for what cannot be read."""

from pathlib import Path

import pytest
from pypdf import PdfWriter

from dsarag.base.errors import DsaragError
from dsarag.corpora.readers import UnreadableDocumentError, read_document


def minimal_pdf(page_texts: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page, built byte by byte (with a correct xref)."""
    page_ids = [4 + 2 * index for index in range(len(page_texts))]
    kids = b" ".join(b"%d 0 R" % page_id for page_id in page_ids)
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids)),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for page_id, text in zip(page_ids, page_texts, strict=True):
        stream = b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % text.encode("latin-1")
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (page_id + 1)
        )
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[number] for number in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


def test_text_is_returned_exactly_as_on_disk_including_front_matter_and_crlf(tmp_path):
    raw = "---\r\ndate: 2024-03-15\r\n---\r\n# Title\r\n\r\nBody with ünïcode.\r\n"
    path = tmp_path / "note.md"
    path.write_bytes(raw.encode("utf-8"))
    assert read_document(path) == raw


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert read_document(path) == "hello"


def test_utf16_text_with_byte_order_mark_is_decoded(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("Grüße aus Wien".encode("utf-16"))
    assert read_document(path) == "Grüße aus Wien"


def test_a_few_invalid_bytes_are_replaced_but_another_encoding_is_refused(tmp_path):
    mostly_fine = tmp_path / "stray.txt"
    mostly_fine.write_bytes(b"plain ascii text " * 20 + b"\xff" + b" more text")
    assert "\ufffd" in read_document(mostly_fine)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("été à côté, déjà vu".encode("latin-1"))
    with pytest.raises(
        UnreadableDocumentError, match=r"latin1\.txt: not UTF-8 text .*iconv -f latin1"
    ) as caught:
        read_document(latin1)
    assert isinstance(caught.value, DsaragError) and caught.value.path == latin1


def test_html_drops_script_and_style_and_keeps_title_and_paragraphs(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>Kitchen  news</title><style>p { color: red }</style>"
        "<script>var hidden = 'tracking code';</script></head><body>"
        "<p>The kitchen serves <b>soup</b>\n on Fridays.</p><p>Second<br>paragraph.</p>"
        "<script>alert('x')</script></body></html>"
    )
    text = read_document(path)
    assert text == "Kitchen news\n\nThe kitchen serves soup on Fridays.\n\nSecond\nparagraph."
    assert "tracking" not in text and "color" not in text and "alert" not in text


def test_pdf_text_is_extracted_with_pages_joined_by_blank_lines(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(minimal_pdf(["Solar panels produce 42 kWh.", "The depot roof faces south."]))
    assert read_document(path) == "Solar panels produce 42 kWh.\n\nThe depot roof faces south."


def test_broken_pdf_raises_a_clear_error(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(minimal_pdf(["Some text"])[:80])
    with pytest.raises(UnreadableDocumentError, match=r"broken\.pdf: broken PDF .*re-export or repair it"):
        read_document(path)


def test_password_protected_pdf_raises_a_clear_error(tmp_path):
    plain = tmp_path / "plain.pdf"
    plain.write_bytes(minimal_pdf(["Confidential minutes"]))
    writer = PdfWriter(clone_from=plain)
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    locked = tmp_path / "locked.pdf"
    writer.write(locked)
    with pytest.raises(UnreadableDocumentError, match="password-protected"):
        read_document(locked)


def test_pdf_locked_with_an_empty_password_is_read(tmp_path):
    plain = tmp_path / "plain.pdf"
    plain.write_bytes(minimal_pdf(["Open minutes"]))
    writer = PdfWriter(clone_from=plain)
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    restricted = tmp_path / "restricted.pdf"
    writer.write(restricted)
    assert read_document(restricted) == "Open minutes"


def test_pdf_without_text_layer_says_to_run_ocr(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(minimal_pdf([""]))
    with pytest.raises(UnreadableDocumentError, match="no text layer"):
        read_document(path)


def test_unsupported_and_missing_files_raise_unreadable_document_error(tmp_path):
    docx = tmp_path / "memo.docx"
    docx.write_bytes(b"PK\x03\x04")
    with pytest.raises(UnreadableDocumentError, match=r"memo\.docx: unsupported file type \.docx"):
        read_document(docx)
    with pytest.raises(UnreadableDocumentError, match="file not found"):
        read_document(Path(tmp_path / "gone.md"))
