"""DKIM signing: messages built by the product, sent by the product's SMTP code to a
real aiosmtpd server, and verified by dkimpy on the raw bytes the server received."""

from __future__ import annotations

import base64
import email.policy
import html
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path

import dkim
import pytest
from aiosmtpd.controller import Controller
from conftest import free_port

from nurture.dkim import (
    DKIMError,
    DKIMSigner,
    domain_of,
    generate_key,
    txt_strings,
)
from nurture.mailer import MESSAGE_POLICY, SMTPConnection, build_message, parse_smtp_url
from nurture.render import RenderedEmail

MAIL_FROM = "Course Team <course@example.com>"
SELECTOR = "nurture2024"
ALL_SIGNED = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
]


# --- Fixtures and helpers ----------------------------------------------------------


@pytest.fixture(scope="module")
def key_path(tmp_path_factory) -> Path:
    return generate_key(tmp_path_factory.mktemp("dkim") / "dkim.pem")


@pytest.fixture
def signer(key_path) -> DKIMSigner:
    return DKIMSigner.load(key_path, SELECTOR, domain_of(MAIL_FROM))


class RawHandler:
    """Keeps the DATA exactly as it arrived (after the server undid dot-stuffing)."""

    def __init__(self):
        self.received: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.received.append(envelope.original_content)
        return "250 OK"


@dataclass
class RawSMTP:
    url: str
    handler: RawHandler = field(repr=False)

    def send(self, message, signer=None) -> bytes:
        """Send with the product's SMTPConnection; return the bytes the server got."""
        before = len(self.handler.received)
        with SMTPConnection(parse_smtp_url(self.url)) as connection:
            connection.send(message, signer=signer)
        assert len(self.handler.received) == before + 1
        return self.handler.received[-1]


@pytest.fixture
def raw_smtp() -> Iterator[RawSMTP]:
    handler = RawHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    yield RawSMTP(f"smtp://127.0.0.1:{port}?timeout=5", handler)
    controller.stop()


def course_email(
    text: str = "Hello Ada,\n\nHere is lesson one.\n",
    html: str = "<p>Hello Ada,</p><p>Here is lesson one.</p>",
    subject: str = "Lesson 1: getting started",
    to_email: str = "ada@example.org",
    to_name: str = "Ada",
):
    return build_message(
        RenderedEmail(subject, "Lesson one is here", html, text),
        to_email=to_email,
        to_name=to_name,
        mail_from=MAIL_FROM,
        message_id="<d42.course@example.com>",
        step_label="six-month/day-1",
        date=datetime(2024, 5, 1, 9, 30, tzinfo=UTC),
        list_id="Six-month course <six-month.example.com>",
        unsubscribe_url="https://nurture.example.com/unsubscribe/abc.def",
    )


def confirmation_email():
    return build_message(
        RenderedEmail(
            "Please confirm your subscription",
            "One click and you're in",
            '<p><a href="https://nurture.example.com/confirm/xyz">Confirm</a></p>',
            "Confirm: https://nurture.example.com/confirm/xyz\n",
        ),
        to_email="ada@example.org",
        to_name="Ada",
        mail_from=MAIL_FROM,
        message_id="<d41.confirm@example.com>",
        step_label="confirmation",
        date=datetime(2024, 5, 1, 9, 0, tzinfo=UTC),
    )


def published_value(signer: DKIMSigner) -> bytes:
    """The TXT value a resolver returns for what `nurture dkim` tells operators to publish."""
    quoted = signer.dns_record_text().split(" IN TXT ", 1)[1]
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', quoted)).encode()


def verifies(signer: DKIMSigner, raw: bytes) -> bool:
    """dkimpy's verdict, with DNS answering only the record's own name."""
    name = f"{signer.selector}._domainkey.{signer.domain}".encode()
    value = published_value(signer)

    def dnsfunc(query: bytes, timeout: float = 5) -> bytes | None:
        return value if query.rstrip(b".") == name else None

    return dkim.verify(raw, dnsfunc=dnsfunc)


def signature_tags(raw: bytes) -> dict[str, str]:
    header = message_from_bytes(raw, policy=compat32)["DKIM-Signature"]
    tags = (part.split("=", 1) for part in re.sub(r"\s+", "", header).split(";") if part)
    return {name: value for name, value in tags}


def openssl(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, check=True).stdout


# --- Signing and verifying ---------------------------------------------------------


def test_course_email_verifies_after_smtp_round_trip(signer, raw_smtp):
    message = course_email()

    first = raw_smtp.send(message, signer)
    again = raw_smtp.send(message, signer)  # what a retry after a dropped connection sends

    assert first.startswith(b"DKIM-Signature: ")
    assert verifies(signer, first) and verifies(signer, again)
    body = first.split(b"\r\nFrom: ", 1)[1]
    assert again.split(b"\r\nFrom: ", 1)[1] == body, "a retry sends the same message"
    tags = signature_tags(first)
    assert tags["h"].lower().split(":") == ALL_SIGNED
    assert (tags["d"], tags["s"], tags["c"]) == ("example.com", SELECTOR, "relaxed/simple")
    assert b"DKIM-Signature" not in message.data, "signing must not change the message"


def test_confirmation_email_signs_only_the_headers_it_has(signer, raw_smtp):
    raw = raw_smtp.send(confirmation_email(), signer)

    assert b"List-Unsubscribe" not in raw
    assert signature_tags(raw)["h"].lower().split(":") == ALL_SIGNED[:5]
    assert verifies(signer, raw)


def test_tampering_after_signing_fails_verification(signer, raw_smtp):
    raw = raw_smtp.send(course_email(), signer)
    assert verifies(signer, raw)

    subject = b"Subject: Lesson 1: getting started\r\n"
    assert subject in raw
    assert not verifies(signer, raw.replace(subject, b"Subject: Lesson 1: get rich quick\r\n"))
    assert not verifies(signer, raw.replace(b"Here is lesson one.", b"Here is lesson two."))
    # X-Nurture-Step is not among the signed headers, so changing it is allowed.
    assert verifies(signer, raw.replace(b"six-month/day-1", b"six-month/day-9"))


def test_non_ascii_text_and_long_html_lines_verify(signer, raw_smtp):
    long_line = "<p>" + "Café — naïve résumé 🚀 " * 150 + "</p>"  # one line of ~3,500 characters
    message = course_email(
        subject="Leçon 1 — café 🚀",
        text="Bonjour Zoë,\n\nVoici la leçon — avec un café ☕ et une fusée 🚀.\n",
        html=long_line,
        to_name="Zoë Brontë",
    )

    raw = raw_smtp.send(message, signer)

    assert b"=?utf-8?" in raw, "the display name and subject should be RFC 2047 encoded"
    assert re.search(rb"Content-Transfer-Encoding: (quoted-printable|base64)", raw)
    assert verifies(signer, raw)
    received = message_from_bytes(raw, policy=MESSAGE_POLICY)
    assert received["Subject"] == "Leçon 1 — café 🚀"
    # Non-ASCII in the HTML goes as character references, which show the same.
    assert html.unescape(received.get_body(("html",)).get_content()).strip() == long_line


def test_body_lines_starting_with_from_or_a_dot_verify(signer, raw_smtp):
    # The mailer serialises the message itself, so a line starting "From " is sent as
    # written (smtplib.send_message would turn it into ">From "), and the server undoes
    # the dot-stuffing of lines starting with ".".
    text = "Hi Ada,\n\nFrom the team: thanks!\n.hidden starts with a dot\n.\n"
    raw = raw_smtp.send(course_email(text=text), signer)

    assert b"\r\nFrom the team" in raw, "a body line starting with 'From ' is kept as written"
    assert b"\r\n.hidden starts with a dot\r\n" in raw
    assert verifies(signer, raw)


def test_a_message_parsed_from_bytes_can_be_signed(signer, raw_smtp):
    # E.g. an .eml from the outbox sent again. Its Subject arrives folded at 78 columns,
    # which MESSAGE_POLICY (998) would write differently once the header is touched.
    subject = "Lesson 1: " + " ".join(["a long subject that goes on and on"] * 4)
    source = course_email(subject=subject).message().as_bytes(policy=email.policy.default)
    assert b"that goes\n on and on" in source, "the Subject should be folded in the source"
    parsed = message_from_bytes(source, policy=MESSAGE_POLICY)

    raw = raw_smtp.send(parsed, signer)

    assert verifies(signer, raw)
    assert message_from_bytes(raw, policy=MESSAGE_POLICY)["Subject"] == subject


def test_signed_bytes_verify_without_email_message(signer):
    message = b"From: course@example.com\r\nTo: ada@example.org\r\nSubject: hi\r\n\r\nhello\r\n"

    header = signer.sign(message)

    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    assert verifies(signer, header + message)
    assert signature_tags(header + message)["h"].lower().split(":") == ["from", "to", "subject"]


# --- Configuration errors ------------------------------------------------------------


def _write_public_key(path: Path, key_path: Path) -> None:
    path.write_bytes(openssl("pkey", "-in", str(key_path), "-pubout"))


def _write_encrypted_key(path: Path, key_path: Path) -> None:
    path.write_bytes(
        openssl("pkcs8", "-topk8", "-in", str(key_path), "-v2", "aes256", "-passout", "pass:x")
    )


def _write_short_key(path: Path, key_path: Path) -> None:
    path.write_bytes(openssl("genrsa", "512"))


def _write_damaged_key(path: Path, key_path: Path) -> None:
    """A well-formed PKCS#1 key with one byte of its modulus changed."""
    der = bytearray(openssl("rsa", "-in", str(key_path), "-traditional", "-outform", "DER"))
    der[100] ^= 0x01  # inside the 257-byte modulus, which starts at byte 11
    body = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    path.write_bytes(
        b"-----BEGIN RSA PRIVATE KEY-----\n" + lines + b"\n-----END RSA PRIVATE KEY-----\n"
    )


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (None, r"DKIM_PRIVATE_KEY .*missing\.pem does not exist"),
        ("directory", r"DKIM_PRIVATE_KEY .* cannot be read: Is a directory"),
        (b"", r"not an RSA private key in PEM format"),
        (b"SECRET_KEY=hunter2\n", r"not an RSA private key in PEM format"),
        (_write_public_key, r"not an RSA private key in PEM format"),
        (_write_encrypted_key, r"encrypted; DKIM needs it unencrypted"),
        (_write_short_key, r"has 512 bits; receivers need at least 1024"),
        (_write_damaged_key, r"damaged: its signatures do not verify"),
    ],
    ids=["missing", "directory", "empty", "not-a-key", "public", "encrypted", "short", "damaged"],
)
def test_bad_key_files_fail_at_load_with_a_clear_message(tmp_path, key_path, make, error):
    path = tmp_path / "missing.pem"
    if make == "directory":
        path.mkdir()
    elif isinstance(make, bytes):
        path.write_bytes(make)
    elif make is not None:
        make(path, key_path)

    with pytest.raises(DKIMError, match=error) as raised:
        DKIMSigner.load(path, SELECTOR, "example.com")
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("selector", ["", "my selector", "-sel", "sel-", "sel_1", "a" * 64, "a..b"])
def test_bad_selector_is_refused(key_path, selector):
    with pytest.raises(DKIMError, match=r"DKIM_SELECTOR .* is not a valid DNS label"):
        DKIMSigner.load(key_path, selector, "example.com")


def test_domain_comes_from_mail_from():
    assert domain_of("Course Team <course@Example.COM>") == "example.com"
    assert domain_of("course@mail.example.co.uk") == "mail.example.co.uk"
    assert domain_of("Kurs <kurs@bücher.example>") == "xn--bcher-kva.example"
    for bad in ("Course Team", "course@", ""):
        with pytest.raises(DKIMError, match="MAIL_FROM"):
            domain_of(bad)


# --- Keys and DNS --------------------------------------------------------------------


def test_dns_record_publishes_the_public_key(signer, key_path):
    name, value = signer.dns_record()

    assert name == "nurture2024._domainkey.example.com"
    assert value == f"v=DKIM1; k=rsa; p={signer.public_key_b64()}"
    openssl_der = openssl("pkey", "-in", str(key_path), "-pubout", "-outform", "DER")
    assert base64.b64decode(signer.public_key_b64()) == openssl_der

    text = signer.dns_record_text()
    assert text.startswith('nurture2024._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', text)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == value
    assert txt_strings("a" * 510) == f'"{"a" * 255}" "{"a" * 255}"'

    # dkimpy reads the record and checks a signature with it.
    message = b"From: course@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
    record = published_value(signer)
    assert dkim.verify(signer.sign(message) + message, dnsfunc=lambda n, timeout=5: record)
    other = DKIMSigner.load(generate_key(key_path.parent / "other.pem"), SELECTOR, "example.com")
    assert not dkim.verify(other.sign(message) + message, dnsfunc=lambda n, timeout=5: record)


def test_a_pkcs1_key_with_windows_line_ends_loads(signer, key_path, tmp_path, raw_smtp):
    pkcs1 = openssl("rsa", "-in", str(key_path), "-traditional")
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    path = tmp_path / "opendkim.private"
    path.write_bytes(pkcs1.replace(b"\n", b"\r\n"))

    loaded = DKIMSigner.load(path, SELECTOR, "example.com")

    assert loaded.dns_record() == signer.dns_record()
    assert verifies(signer, raw_smtp.send(course_email(), loaded))


def test_generate_key_is_private_and_never_overwrites(tmp_path, key_path):
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    before = key_path.read_bytes()
    with pytest.raises(DKIMError, match="already exists"):
        generate_key(key_path)
    assert key_path.read_bytes() == before
    with pytest.raises(DKIMError, match="at least 1024 bits"):
        generate_key(tmp_path / "small.pem", bits=512)
    assert not (tmp_path / "small.pem").exists()


def test_the_private_key_stays_out_of_repr(signer):
    assert "PRIVATE" not in repr(signer)
    assert repr(signer) == "DKIMSigner(selector='nurture2024', domain='example.com')"


# --- Wired into the service ----------------------------------------------------------


def test_the_service_signs_every_email_it_sends(stack, key_path, raw_smtp):
    """Through the real path: settings, the due-scan, send_batch, SMTP."""
    from sqlalchemy import select

    from nurture.config import ConfigError, load_settings
    from nurture.db import session_scope
    from nurture.delivery import send_batch
    from nurture.models import Subscriber, utcnow
    from nurture.scheduler import dispatch
    from nurture.sequences import first_steps, load_sequences
    from nurture.subscribers import SignupRequest, confirm, signup

    settings = stack.with_env(
        DKIM_PRIVATE_KEY=str(key_path),
        DKIM_SELECTOR=SELECTOR,
        MAIL_FROM=MAIL_FROM,
        SMTP_URL=raw_smtp.url,
    ).settings
    sequences = load_sequences(settings.templates_path)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        request = SignupRequest("ada@example.org", "Ada", "UTC", "product-vs-project", "api")
        signup(session, settings, request, first_steps=first_steps(sequences), now=now)
        session.commit()
        ids: list[int] = []
        dispatch(session, settings, sequences, now=now, publish=ids.extend)  # the confirmation
        send_batch(session, settings, sequences, ids)
        subscriber_id = session.scalar(select(Subscriber.id))
        confirm(session, subscriber_id, now=now, first_steps=first_steps(sequences))
        session.commit()
        ids = []
        dispatch(session, settings, sequences, now=now, publish=ids.extend)
        send_batch(session, settings, sequences, ids)

    confirmation, welcome = raw_smtp.handler.received
    signer = DKIMSigner.load(key_path, SELECTOR, domain_of(MAIL_FROM))
    assert verifies(signer, confirmation) and verifies(signer, welcome)
    assert signature_tags(welcome)["h"].lower().split(":") == ALL_SIGNED

    with pytest.raises(ConfigError, match="DKIM_SELECTOR"):
        load_settings({**stack.environ, "DKIM_PRIVATE_KEY": str(key_path)})
    with pytest.raises(ConfigError, match="DKIM_PRIVATE_KEY"):
        load_settings(
            {**stack.environ, "DKIM_PRIVATE_KEY": "/nonexistent.pem", "DKIM_SELECTOR": "s1"}
        )


def test_nurture_dkim_prints_the_record(stack, key_path):
    import sys

    from nurture import ROOT

    env = stack.with_env(
        DKIM_PRIVATE_KEY=str(key_path), DKIM_SELECTOR=SELECTOR, MAIL_FROM=MAIL_FROM
    ).process_env()
    result = subprocess.run(
        [sys.executable, "-m", "nurture", "dkim"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    signer = DKIMSigner.load(key_path, SELECTOR, domain_of(MAIL_FROM))
    assert result.stdout.strip() == signer.dns_record_text()
    off = subprocess.run(
        [sys.executable, "-m", "nurture", "dkim"],
        cwd=ROOT,
        env=stack.process_env(),
        capture_output=True,
        text=True,
    )
    assert off.returncode != 0 and "DKIM_PRIVATE_KEY" in off.stderr
