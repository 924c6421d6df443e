"""Building MIME messages and sending them over SMTP.

`build_message` makes the multipart/alternative message with every header the
contract promises. `SMTPConnection` is one pooled connection for a batch, and
sorts failures into temporary (try again later) and permanent (never again),
which is all the delivery code needs to know about SMTP.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from urllib.parse import parse_qs, unquote, urlsplit

from nurture.dkim import DKIMSigner
from nurture.render import RenderedEmail

#: Headers are not folded below SMTP's own 998-character limit: a folded
#: List-Unsubscribe URL trips up some receivers' parsers.
MESSAGE_POLICY = policy.default.clone(max_line_length=998)


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
) -> EmailMessage:
    """One email with text and HTML parts and the contract's headers.

    The headers are set through `email.headerregistry`, which refuses CR and LF
    in any value, so nothing a subscriber typed can add a header.
    """
    message = EmailMessage(policy=MESSAGE_POLICY)
    from_name, from_address = parseaddr(mail_from)
    message["From"] = Address(display_name=from_name, addr_spec=from_address)
    message["To"] = Address(display_name=to_name, addr_spec=to_email)
    message["Subject"] = email.subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    message["X-Nurture-Step"] = step_label
    if list_id:
        message["List-Id"] = list_id
    if unsubscribe_url:
        # RFC 8058: the https URL takes the one-click POST; a mailto is offered too if set.
        targets = [f"<{unsubscribe_url}>"]
        if unsubscribe_mailto:
            targets.append(f"<mailto:{unsubscribe_mailto}?subject=unsubscribe>")
        message["List-Unsubscribe"] = ", ".join(targets)
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(email.text)
    message.add_alternative(email.html, subtype="html")
    return message


def wire_bytes(message: EmailMessage) -> bytes:
    """The message exactly as it goes over SMTP (before dot-stuffing).

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

    def send(self, message: EmailMessage, signer: DKIMSigner | None = None) -> None:
        """Send one message, DKIM-signed if a signer is given.

        Raises TemporaryFailure or PermanentFailure. A connection that the
        server dropped between two messages is reopened once: servers close
        idle or long-lived sessions, and that is no reason to give up.
        """
        data = wire_bytes(message)
        if signer is not None:
            data = signer.sign(data) + data
        sender = message["From"].addresses[0].addr_spec
        recipients = [address.addr_spec for address in message["To"].addresses]
        for attempt in (1, 2):
            try:
                if self._smtp is None:
                    self._smtp = self._connect()
                self._smtp.sendmail(sender, recipients, data)
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
