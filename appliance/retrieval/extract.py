"""Text out of an uploaded document: plain text, Markdown, HTML and PDF. Refuses what it cannot read, and what
would cost more to read than a document may (:class:`ExtractionLimits`): a few kilobytes of PDF can declare
thousands of pages or streams that inflate a thousandfold."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from appliance.lib.errors import ApplianceError, InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExtractionLimits:
    """The most one document may make the extraction do (RetrievalSettings holds the node's values)."""

    max_pages: int = 2000  # PDF pages
    max_characters: int = 8_000_000  # extracted text, any type
    max_stream_bytes: int = 32 * 1024 * 1024  # one PDF stream, decompressed (pypdf stops there)
    max_content_bytes: int = 256 * 1024 * 1024  # every page's content streams together, decompressed


DEFAULT_LIMITS = ExtractionLimits()

MEDIA_TYPES = {
    "text/plain": "text/plain",
    "text/markdown": "text/markdown",
    "text/x-markdown": "text/markdown",
    "text/html": "text/html",
    "application/xhtml+xml": "text/html",
    "application/pdf": "application/pdf",
}
_SUFFIXES = {".txt": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown", ".html": "text/html",
             ".htm": "text/html", ".pdf": "application/pdf"}  # fmt: skip


def media_type_of(content_type: str | None, filename: str | None) -> str:
    """The document's type from its Content-Type, or from its file name when the type says nothing."""
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if declared in MEDIA_TYPES:
        return MEDIA_TYPES[declared]
    if declared in ("", "application/octet-stream") and filename:
        suffix = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
        if suffix in _SUFFIXES:
            return _SUFFIXES[suffix]
    shown = declared or "none"
    raise UnsupportedMediaTypeError(
        f"Unsupported document type `{shown}`: send text/plain, text/markdown, text/html or application/pdf.",
        param="content-type",
    )


def extract_text(raw: bytes, media_type: str, limits: ExtractionLimits = DEFAULT_LIMITS) -> str:
    """The document's text, whitespace tidied; an empty result is refused (400), one past the limits too (413)."""
    if not raw:
        raise InvalidRequestError("The document is empty.", param="file", code="empty_document")
    if media_type == "application/pdf":
        text = _pdf_text(raw, limits)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidRequestError(
                "The document is not valid UTF-8 text.", param="file", code="invalid_encoding"
            ) from None
        if media_type == "text/html":
            text = html_text(text)
    _check_characters(len(text), limits)
    text = _tidy(text)
    if not text:
        raise InvalidRequestError("The document has no text in it.", param="file", code="empty_document")
    return text


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _check_characters(count: int, limits: ExtractionLimits) -> None:
    if count > limits.max_characters:
        raise PayloadTooLargeError(
            f"The document has more than {limits.max_characters} characters of text; split it.",
            param="file",
            code="too_much_text",
        )


def _pdf_text(raw: bytes, limits: ExtractionLimits) -> str:
    """Page by page, within the limits. Every failure of the parser is the file's (400), whatever pypdf raised;
    past a limit of ours it is 413."""
    from pypdf import PdfReader, apply_configuration, get_configuration
    from pypdf.errors import LimitReachedError

    stream = limits.max_stream_bytes
    configuration = {
        "zlib_maximum_output_length": stream,
        "lzw_maximum_output_length": stream,
        "run_length_maximum_output_length": stream,
        "brotli_maximum_output_length": stream,
        "jbig2_maximum_output_length": stream,
        "array_based_stream_maximum_output_length": stream,
        "image_maximum_buffer_size": stream,
        "stream_decoding_work_maximum_length": 4 * stream,
    }
    try:
        with apply_configuration(get_configuration().with_overwrites(**configuration)):
            reader = PdfReader(io.BytesIO(raw))
            if reader.is_encrypted:
                raise InvalidRequestError("The PDF is encrypted.", param="file", code="encrypted_document")
            pages = len(reader.pages)
            if pages > limits.max_pages:
                raise PayloadTooLargeError(
                    f"The PDF has {pages} pages; at most {limits.max_pages} are accepted.",
                    param="file",
                    code="too_many_pages",
                )
            texts: list[str] = []
            characters = content = 0
            for page in reader.pages:
                contents = page.get_contents()  # decompressed here, where a stream past the limit stops
                content += len(contents.get_data()) if contents is not None else 0
                if content > limits.max_content_bytes:
                    raise PayloadTooLargeError(
                        f"The PDF's pages decompress to more than {limits.max_content_bytes} bytes.",
                        param="file",
                        code="too_much_content",
                    )
                texts.append(page.extract_text() or "")
                characters += len(texts[-1]) + 2
                _check_characters(characters, limits)
            return "\n\n".join(texts)
    except ApplianceError:
        raise
    except LimitReachedError as exc:
        raise InvalidRequestError(
            f"The PDF goes past a limit of the reader: {exc}", param="file", code="invalid_document"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # a malformed file can make the parser raise anything
        log.info("unreadable PDF: %s: %s", type(exc).__name__, exc)
        raise InvalidRequestError(f"The PDF cannot be read: {exc}", param="file", code="invalid_document") from None


_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "h1",
               "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dt", "dd", "hr", "title"}  # fmt: skip
_SKIPPED_TAGS = {"script", "style", "noscript", "template", "svg", "head"}


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0
        self._title: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIPPED_TAGS:
            self._skipping += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIPPED_TAGS and self._skipping:
            self._skipping -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)
        elif not self._skipping:
            self.parts.append(data)

    def text(self) -> str:
        title = "".join(self._title).strip()
        body = "".join(self.parts)
        return f"{title}\n\n{body}" if title else body


def html_text(markup: str) -> str:
    """The visible text of an HTML page (scripts, styles and the head left out, but its title kept)."""
    parser = _TextParser()
    parser.feed(markup)
    parser.close()
    return parser.text()
