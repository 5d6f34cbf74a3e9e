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
