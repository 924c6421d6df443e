"""The tokens in every email are made without itsdangerous' per-token set-up; they must
still be exactly what our itsdangerous serializer writes (and plain itsdangerous reads), or
links already sent would break."""

import pytest
from itsdangerous import URLSafeSerializer

from nurture import tokens

SECRET = "a-secret-key-for-tokens"


@pytest.mark.parametrize(
    ("salt", "payload", "make", "read"),
    [
        ("unsubscribe", 7, tokens.make_unsubscribe_token, tokens.read_unsubscribe_token),
        ("unsubscribe", 2**40, tokens.make_unsubscribe_token, tokens.read_unsubscribe_token),
        ("open", 123456789, tokens.make_open_token, tokens.read_open_token),
        (
            "click",
            [42, 'https://example.com/päth?q="a b"&x=1#frag\u2028'],
            tokens.make_click_token,
            tokens.read_click_token,
        ),
    ],
)
def test_email_tokens_are_itsdangerous_tokens(salt, payload, make, read):
    args = payload if isinstance(payload, list) else [payload]
    token = make(SECRET, *args)
    # What a plain itsdangerous serializer (zlib and all) reads, and what ours writes.
    assert URLSafeSerializer(SECRET, salt=salt).loads(token) == payload
    assert token == tokens._serializer(SECRET, salt).dumps(payload)
    assert read(SECRET, token) == (tuple(payload) if isinstance(payload, list) else payload)


def test_a_token_is_refused_with_another_key_or_by_another_route():
    token = tokens.make_open_token(SECRET, 5)
    with pytest.raises(tokens.TokenError):
        tokens.read_open_token("another-key", token)
    with pytest.raises(tokens.TokenError):
        tokens.read_unsubscribe_token(SECRET, token)
    with pytest.raises(tokens.TokenError):
        tokens.read_open_token(SECRET, token[:-1] + ("A" if token[-1] != "A" else "B"))
