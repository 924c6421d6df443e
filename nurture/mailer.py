"""Building MIME messages and sending them over SMTP.

`build_message` makes the multipart/alternative message with every header the
contract promises. `SMTPConnection` is one pooled connection for a batch, and
sorts failures into temporary (try again later) and permanent (never again),
which is all the delivery code needs to know about SMTP.
"""

from __future__ import annotations

import binascii
import functools
import re
import smtplib
import ssl
import uuid
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes, policy
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, parseaddr
from urllib.parse import parse_qs, unquote, urlsplit

from nurture.dkim import DKIMSigner
from nurture.render import RenderedEmail

#: Headers are not folded below SMTP's own 998-character limit: a folded
#: List-Unsubscribe URL trips up some receivers' parsers.
MAX_LINE = 998
MESSAGE_POLICY = policy.default.clone(max_line_length=MAX_LINE)
#: What `build_message` accepts as an address: ASCII (signup refuses SMTPUTF8), no
#: spaces, brackets or quotes that could make the header mean something else.
ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[^\s<>()\[\]\\,;:\"@]+", re.ASCII)


class SMTPURLError(ValueError):
    pass


@dataclass(frozen=True)
class SMTPSettings:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: str | None = None  # None, "starttls" or "ssl"
    timeout: float = 30.0


def parse_smtp_url(url: str) -> SMTPSettings:
    """`smtp://[user:pass@]host:port[?tls=starttls|ssl]` into settings."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise SMTPURLError(f"SMTP_URL must look like smtp://host:port, not {url!r}")
    query = parse_qs(parts.query)
    tls = query.get("tls", ["ssl" if parts.scheme == "smtps" else ""])[0] or None
    if tls not in (None, "starttls", "ssl"):
        raise SMTPURLError(f"SMTP_URL's tls must be starttls or ssl, not {tls!r}")
    default_port = 465 if tls == "ssl" else 587 if tls == "starttls" else 25
    return SMTPSettings(
        host=parts.hostname,
        port=parts.port or default_port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
        timeout=float(query.get("timeout", ["30"])[0]),
    )


@dataclass(frozen=True)
class OutgoingEmail:
    """An email ready for SMTP: the envelope and the exact bytes to send."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes

    def message(self) -> EmailMessage:
        """The email parsed back, for previews, lint and inspection."""
        return message_from_bytes(self.data.replace(b"\r\n", b"\n"), policy=MESSAGE_POLICY)

    @classmethod
    def from_message(cls, message: EmailMessage) -> OutgoingEmail:
        """An email built or edited with the `email` package (a test send, an .eml)."""
        return cls(
            sender=message["From"].addresses[0].addr_spec,
            recipients=tuple(address.addr_spec for address in message["To"].addresses),
            data=wire_bytes(message),
        )


def build_message(
    email: RenderedEmail,
    *,
    to_email: str,
    to_name: str,
    mail_from: str,
    message_id: str,
    step_label: str,
    date: datetime,
    list_id: str | None = None,
    unsubscribe_url: str | None = None,
    unsubscribe_mailto: str | None = None,
) -> OutgoingEmail:
    """One email with text and HTML parts and the contract's headers.

    Written straight to bytes: this runs for every email sent, and the `email`
    package's header objects and generator cost more than everything else in
    building an email together. Every header value is checked for CR and LF
    (`ValueError`), so nothing a subscriber typed can add a header; non-ASCII
    names and subjects are RFC 2047 encoded.
    """
    from_name, from_address = _parse_sender(mail_from)
    headers = [
        ("From", _address(from_name, from_address)),
        ("To", _address(to_name, to_email)),
        ("Subject", _encoded(email.subject)),
        ("Date", format_datetime(date)),
        ("Message-ID", message_id),
        ("X-Nurture-Step", step_label),
    ]
    if list_id:
        phrase, _, identifier = list_id.rpartition(" <")
        headers.append(("List-Id", f"{_encoded(phrase)} <{identifier}" if phrase else list_id))
    if unsubscribe_url:
        # RFC 8058: the https URL takes the one-click POST; a mailto is offered too if set.
        targets = [f"<{unsubscribe_url}>"]
        if unsubscribe_mailto:
            targets.append(f"<mailto:{unsubscribe_mailto}?subject=unsubscribe>")
        headers.append(("List-Unsubscribe", ", ".join(targets)))
        headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    boundary = f"=_{uuid.uuid4().hex}"
    headers.append(("MIME-Version", "1.0"))
    headers.append(("Content-Type", f'multipart/alternative; boundary="{boundary}"'))
    head = "".join(f"{name}: {_checked(name, value)}\r\n" for name, value in headers)
    delimiter = f"\r\n--{boundary}".encode("ascii")
    data = b"".join(
        (
            head.encode("ascii"),
            delimiter,  # the blank line that ends the headers, then the first delimiter
            b"\r\n",
            _part("text/plain", email.text),
            delimiter,
            b"\r\n",
            _part("text/html", email.html),
            delimiter,
            b"--\r\n",
        )
    )
    return OutgoingEmail(sender=from_address, recipients=(to_email,), data=data)


@functools.lru_cache(maxsize=8)
def _parse_sender(mail_from: str) -> tuple[str, str]:
    """MAIL_FROM as (name, address); it is the same for every email."""
    return parseaddr(mail_from)


def _checked(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"the {name} header would contain a CR or LF character")
    return value


def _address(name: str, address: str) -> str:
    """`Name <address>`, the name quoted or RFC 2047 encoded as it needs."""
    _checked("address", name + address)
    if not ADDRESS.fullmatch(address):
        raise ValueError(f"{address!r} is not an address this mailer can send to")
    return formataddr((name, address), charset="utf-8")


def _encoded(value: str) -> str:
    """A header value, RFC 2047 encoded if it is not plain ASCII.

    A long value becomes several encoded words (at most 75 characters each),
    kept on one line like every other header: the space between encoded words
    is not part of the text.
    """
    _checked("header", value)
    if value.isascii():
        return value
    return Header(value, "utf-8").encode(linesep="\r\n").replace("\r\n ", " ")


def _part(content_type: str, body: str) -> bytes:
    """One MIME part: 7bit when it is plain short-lined ASCII, quoted-printable otherwise."""
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    raw = text.encode("utf-8")
    if raw.isascii() and max(map(len, raw.split(b"\n"))) <= MAX_LINE:
        encoding, payload = "7bit", raw
    else:
        encoding, payload = "quoted-printable", binascii.b2a_qp(raw, istext=True)
    head = f'Content-Type: {content_type}; charset="utf-8"\r\nContent-Transfer-Encoding: {encoding}'
    return head.encode("ascii") + b"\r\n\r\n" + payload.replace(b"\n", b"\r\n")


def wire_bytes(message: EmailMessage) -> bytes:
    """A message built with the `email` package, exactly as it goes over SMTP.

    Serialised here once, rather than by `smtplib.send_message`, whose generator
    rewrites body lines starting with "From " and would break a DKIM signature
    made over other bytes.
    """
    return message.as_bytes(policy=MESSAGE_POLICY.clone(linesep="\r\n"))


class TemporaryFailure(Exception):
    """Try again later: 4xx, a timeout, a refused or dropped connection."""


class ServerUnreachable(TemporaryFailure):
    """No SMTP conversation at all: refused, timed out, or dropped."""


class PermanentFailure(Exception):
    """Never try again: the server answered 5xx for this recipient."""


def _classify(error: Exception) -> Exception:
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        code, reply = next(iter(error.recipients.values()))
        return _by_code(code, reply)
    if isinstance(error, smtplib.SMTPResponseException):
        return _by_code(error.smtp_code, error.smtp_error)
    return ServerUnreachable(f"{type(error).__name__}: {error}")


def _by_code(code: int, reply: bytes | str) -> Exception:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    message = f"{code} {text}".strip()
    return PermanentFailure(message) if 500 <= code < 600 else TemporaryFailure(message)


class SMTPConnection:
    """One SMTP connection, opened on the first send and reused for the batch."""

    def __init__(self, settings: SMTPSettings):
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> SMTPConnection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        if s.tls == "ssl":
            smtp = smtplib.SMTP_SSL(
                s.host, s.port, timeout=s.timeout, context=ssl.create_default_context()
            )
        else:
            smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
            if s.tls == "starttls":
                smtp.starttls(context=ssl.create_default_context())
        if s.username:
            smtp.login(s.username, s.password or "")
        return smtp

    def send(self, email: OutgoingEmail | EmailMessage, signer: DKIMSigner | None = None) -> None:
        """Send one email, DKIM-signed if a signer is given.

        Raises TemporaryFailure or PermanentFailure. A connection that the
        server dropped between two messages is reopened once: servers close
        idle or long-lived sessions, and that is no reason to give up.
        """
        if isinstance(email, EmailMessage):
            email = OutgoingEmail.from_message(email)
        data = email.data
        if signer is not None:
            data = signer.sign(data) + data
        for attempt in (1, 2):
            try:
                if self._smtp is None:
                    self._smtp = self._connect()
                self._smtp.sendmail(email.sender, list(email.recipients), data)
                return
            except smtplib.SMTPServerDisconnected as error:
                self._smtp = None
                if attempt == 2:
                    raise _classify(error) from error
            except (smtplib.SMTPException, OSError) as error:
                if not isinstance(error, smtplib.SMTPRecipientsRefused):
                    self.close()
                raise _classify(error) from error

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                self._smtp.close()
            self._smtp = None
