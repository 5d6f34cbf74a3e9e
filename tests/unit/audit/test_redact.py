import pytest

from appliance.audit.redact import redact


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("key apk_0123456789abcdef0123_" + "a" * 43, "a" * 43),
        ("Authorization: Bearer abcdefghijklmnop.qrs", "abcdefghijklmnop"),
        ("token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "eyJzdWIiOiJ4In0"),
        ("use sk-proj1234567890abcdefghijkl", "sk-proj1234567890"),
        ("aws AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
        ("password=hunter2", "hunter2"),
        ("client_secret: s3cr3t-value", "s3cr3t-value"),
        ("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----", "MIIB"),
    ],
)
def test_secrets_are_replaced(text: str, hidden: str) -> None:
    redacted, count = redact(text)
    assert hidden not in redacted and count >= 1


def test_ordinary_text_is_left_alone() -> None:
    text = "The capital of France is Paris. A token of appreciation; my password manager is great."
    assert redact(text) == (text, 0)


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111111",  # Visa test number
        "4111 1111 1111 1111",
        "5500-0000-0000-0004",  # Mastercard
        "378282246310005",  # American Express, 15 digits
        "6011 0009 9013 9424",  # Discover
    ],
)
def test_payment_card_numbers_that_pass_luhn_are_replaced(number: str) -> None:
    redacted, count = redact(f"Charge card {number}, expiry 12/29.")
    assert count == 1 and number not in redacted and "[REDACTED CARD]" in redacted
    assert redacted.endswith(", expiry 12/29.")


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 00",
        "GB82WEST12345698765432",
        "FR14 2004 1010 0505 0001 3M02 606",
        "nl91abna0417164300",
    ],
)
def test_ibans_that_pass_mod_97_are_replaced(iban: str) -> None:
    redacted, count = redact(f"Pay to {iban} today")
    assert count == 1 and redacted == "Pay to [REDACTED IBAN] today"


@pytest.mark.parametrize(
    "text",
    [
        "Order 4111111111111112 shipped",  # fails the Luhn check
        "Call +49 30 1234 5678 9012 or ref 2024 0101 1234",  # numbers that are not cards
        "Account DE89 3704 0044 0532 0130 01",  # fails mod 97
        "Serial GB00WEST12345698765432",
        "ISBN 978-3-16-148410-0 and 1234",
    ],
)
def test_numbers_that_fail_their_check_are_left_alone(text: str) -> None:
    assert redact(text) == (text, 0)
