from __future__ import annotations

import pytest

from appliance.lib.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from appliance.retrieval.extract import DEFAULT_LIMITS, ExtractionLimits, extract_text, html_text, media_type_of
from tests.support.pdf import bomb_pdf, many_pages_pdf, text_pdf, wide_page_tree_pdf


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


def test_a_pdf_with_too_many_pages_is_413() -> None:
    raw = many_pages_pdf(DEFAULT_LIMITS.max_pages + 1)
    assert len(raw) < 1024 * 1024, "a small file"
    with pytest.raises(PayloadTooLargeError) as info:
        extract_text(raw, "application/pdf")
    assert info.value.status_code == 413 and info.value.code == "too_many_pages"
    assert str(DEFAULT_LIMITS.max_pages) in info.value.message
    assert extract_text(many_pages_pdf(3), "application/pdf") == "A page.\n\nA page.\n\nA page."


def test_a_pdf_over_one_of_pypdfs_own_limits_is_400_not_500() -> None:
    raw = wide_page_tree_pdf(100_001)  # over pypdf's array limit: its LimitReachedError escaped (a 500)
    with pytest.raises(InvalidRequestError) as info:
        extract_text(raw, "application/pdf")
    assert info.value.status_code == 400 and info.value.code == "invalid_document"


def test_a_decompression_bomb_is_refused_as_such() -> None:
    raw = bomb_pdf(100 * 1024 * 1024)  # pypdf alone gave up silently on it: "no text in it"
    assert len(raw) < 1024 * 1024
    with pytest.raises(InvalidRequestError) as info:
        extract_text(raw, "application/pdf")
    assert info.value.status_code == 400 and info.value.code == "invalid_document"
    assert "decompress" in info.value.message.lower()


def test_decompressed_content_is_bounded_for_the_whole_document() -> None:
    limits = ExtractionLimits(max_content_bytes=200)  # each page draws a 40-byte stream
    assert extract_text(many_pages_pdf(4), "application/pdf", limits)
    with pytest.raises(PayloadTooLargeError) as info:
        extract_text(many_pages_pdf(6), "application/pdf", limits)
    assert info.value.code == "too_much_content"


def test_a_stream_over_the_decompression_limit_is_refused_before_it_is_parsed() -> None:
    limits = ExtractionLimits(max_stream_bytes=4 * 1024 * 1024)
    with pytest.raises(InvalidRequestError) as info:
        extract_text(bomb_pdf(8 * 1024 * 1024), "application/pdf", limits)
    assert info.value.code == "invalid_document"


@pytest.mark.parametrize("media_type", ["text/plain", "text/html", "application/pdf"])
def test_extracted_text_over_the_limit_is_413(media_type: str) -> None:
    limits = ExtractionLimits(max_characters=1000)
    words = ["word"] * 400
    raw = {
        "text/plain": " ".join(words).encode(),
        "text/html": ("<p>" + " ".join(words) + "</p>").encode(),
        "application/pdf": many_pages_pdf(200, "x" * 20),
    }[media_type]
    with pytest.raises(PayloadTooLargeError) as info:
        extract_text(raw, media_type, limits)
    assert info.value.code == "too_much_text"
