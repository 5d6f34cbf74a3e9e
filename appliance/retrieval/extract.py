"""Text out of an uploaded document: plain text, Markdown, HTML and PDF. Refuses what it cannot read."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

from appliance.lib.errors import InvalidRequestError, UnsupportedMediaTypeError

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


def extract_text(raw: bytes, media_type: str) -> str:
    """The document's text, whitespace tidied; an empty result is refused."""
    if not raw:
        raise InvalidRequestError("The document is empty.", param="file", code="empty_document")
    if media_type == "application/pdf":
        text = _pdf_text(raw)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidRequestError(
                "The document is not valid UTF-8 text.", param="file", code="invalid_encoding"
            ) from None
        if media_type == "text/html":
            text = html_text(text)
    text = _tidy(text)
    if not text:
        raise InvalidRequestError("The document has no text in it.", param="file", code="empty_document")
    return text


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _pdf_text(raw: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted:
            raise InvalidRequestError("The PDF is encrypted.", param="file", code="encrypted_document")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
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
