"""Redaction of secrets from captured prompt and answer text before it is stored: credentials, and payment
data (card numbers that pass the Luhn check, IBANs that pass ISO 13616's mod-97 check; the checks keep
ordinary numbers such as phone numbers and order references as they are)."""

from __future__ import annotations

import re

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL),
        "[REDACTED PRIVATE KEY]",
    ),
    (re.compile(r"\bapk_[0-9a-f]{20}_[A-Za-z0-9_-]{43}\b"), "[REDACTED API KEY]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "[REDACTED TOKEN]"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"), "Bearer [REDACTED]"),
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{20,}\b"), "[REDACTED API KEY]"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "[REDACTED AWS KEY]"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), "[REDACTED TOKEN]"),
    (
        re.compile(
            r"(?i)\b(password|passwd|pwd|secret|api[_-]?key|access[_-]?token|client[_-]?secret)(\s*[:=]\s*)(\S+)"
        ),
        r"\1\2[REDACTED]",
    ),
]


# Two letters, two check digits, then 11-30 letters or digits, written in groups of four or unspaced.
_IBAN = re.compile(r"\b[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?\b")
# 13-19 digits, optionally grouped by single spaces or dashes, starting as the card networks' numbers do (2-6);
# not after a "+" (an international phone number).
_CARD = re.compile(r"(?<![0-9+])[2-6](?:[ -]?[0-9]){12,18}(?![0-9])")


def _iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in moved)) % 97 == 1


def _luhn_ok(candidate: str) -> bool:
    digits = [int(char) for char in candidate if char.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


# One scan for both: where a text is shaped like an IBAN it is judged as one (its digits are not then taken
# for a card number, whether or not it passes).
_PAYMENT = re.compile(f"(?P<iban>{_IBAN.pattern})|(?P<card>{_CARD.pattern})")


def _payment(match: re.Match[str]) -> str | None:
    """The label that replaces a payment number, or None when the candidate fails its check."""
    if match.group("iban") is not None:
        return "[REDACTED IBAN]" if _iban_ok(match.group(0)) else None
    return "[REDACTED CARD]" if _luhn_ok(match.group(0)) else None


def redact(text: str) -> tuple[str, int]:
    """(the text with secrets replaced, how many replacements were made)."""
    total = 0
    for pattern, replacement in _PATTERNS:
        text, count = pattern.subn(replacement, text)
        total += count
    hits = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal hits
        label = _payment(match)
        hits += label is not None
        return label or match.group(0)

    return _PAYMENT.sub(replace, text), total + hits
