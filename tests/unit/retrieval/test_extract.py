from __future__ import annotations

import pytest

from appliance.lib.errors import InvalidRequestError, UnsupportedMediaTypeError
from appliance.retrieval.extract import extract_text, html_text, media_type_of
from tests.support.pdf import text_pdf


def test_media_type_from_the_header_or_else_the_file_name() -> None:
    assert media_type_of("text/plain; charset=utf-8", None) == "text/plain"
    assert media_type_of("text/x-markdown", "a.txt") == "text/markdown"
    assert media_type_of("application/octet-stream", "Report.PDF") == "application/pdf"
    assert media_type_of(None, "page.htm") == "text/html"
    with pytest.raises(UnsupportedMediaTypeError, match="application/msword"):
        media_type_of("application/msword", "a.doc")
    with pytest.raises(UnsupportedMediaTypeError):
        media_type_of(None, "archive.zip")


def test_html_keeps_the_title_and_visible_text_only() -> None:
    page = (
        "<html><head><title>Tides &amp; times</title><style>p{}</style></head><body>"
        "<script>secret()</script><h1>High water</h1><p>At 06:12 <b>today</b>.</p><noscript>x</noscript></body></html>"
    )
    text = extract_text(page.encode(), "text/html")
    assert text == "Tides & times\n\nHigh water\n\nAt 06:12 today."
    assert "secret" not in html_text(page)


def test_pdf_text_is_extracted() -> None:
    assert extract_text(text_pdf(["First line.", "Second (line)."]), "application/pdf") == "First line.\nSecond (line)."


@pytest.mark.parametrize(
    ("raw", "media_type", "code"),
    [
        (b"", "text/plain", "empty_document"),
        (b" \n\t \r\n", "text/plain", "empty_document"),
        (b"<html><script>x()</script></html>", "text/html", "empty_document"),
        (b"\xff\xfe\x00bad", "text/plain", "invalid_encoding"),
        (b"%PDF-1.4 truncated", "application/pdf", "invalid_document"),
    ],
)
def test_unreadable_documents_are_refused(raw: bytes, media_type: str, code: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        extract_text(raw, media_type)
    assert info.value.code == code


def test_whitespace_is_tidied_but_paragraphs_kept() -> None:
    assert extract_text(b"\xef\xbb\xbfA  b\r\n\r\n\r\n\r\nc\t d \n", "text/markdown") == "A b\n\nc d"
