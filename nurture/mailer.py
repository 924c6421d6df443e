"""Building MIME messages and sending them over SMTP.

`build_message` makes the multipart/alternative message with every header the
contract promises. `SMTPConnection` is one pooled connection for a batch, and
sorts failures into temporary (try again later) and permanent (never again),
which is all the delivery code needs to know about SMTP.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import re
import secrets
import smtplib
import ssl
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes, policy
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, parseaddr
from urllib.parse import parse_qs, unquote, urlsplit

from nurture.dkim import DKIMSigner
from nurture.render import RAW_TEXT, RenderedEmail

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
        # Not the URL itself: it may hold the password, and this goes to the log.
        raise SMTPURLError("SMTP_URL must look like smtp://host:port or smtps://host:port")
    query = parse_qs(parts.query)
    tls = query.get("tls", ["ssl" if parts.scheme == "smtps" else ""])[0] or None
    if tls not in (None, "starttls", "ssl"):
        raise SMTPURLError(f"SMTP_URL's tls must be starttls or ssl, not {tls!r}")
    default_port = 465 if tls == "ssl" else 587 if tls == "starttls" else 25
    try:
        port = parts.port or default_port
    except ValueError:  # not a number, or past 65535
        raise SMTPURLError("SMTP_URL's port must be a number from 1 to 65535") from None
    timeout = query.get("timeout", ["30"])[0]
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise SMTPURLError(f"SMTP_URL's timeout must be a number of seconds, not {timeout!r}")
    return SMTPSettings(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
        timeout=seconds,
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
    from_address, from_header = _sender(mail_from)
    headers = [
        ("From", from_header),
        ("To", _address(to_name, to_email)),
        ("Subject", _encoded(email.subject)),
        ("Date", _date_header(date)),
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
    boundary = f"=_{secrets.token_hex(16)}"
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
            _part("text/html", _ascii_html(email.html, email.raw_text_free)),
            delimiter,
            b"--\r\n",
        )
    )
    return OutgoingEmail(sender=from_address, recipients=(to_email,), data=data)


def _date_header(date: datetime) -> str:
    """The Date header, which counts whole seconds: one second's emails share it."""
    return _format_date(date.replace(microsecond=0))


@functools.lru_cache(maxsize=4)
def _format_date(date: datetime) -> str:
    return format_datetime(date)


@functools.lru_cache(maxsize=8)
def _sender(mail_from: str) -> tuple[str, str]:
    """MAIL_FROM's address, and the From header for it; the same for every email."""
    name, address = parseaddr(mail_from)
    return address, _address(name, address)


def _checked(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"the {name} header would contain a CR or LF character")
    return value


def _address(name: str, address: str) -> str:
    """`Name <address>`, the name quoted or RFC 2047 encoded as it needs.

    A name is encoded when it is not ASCII, and also when it holds `=?`: as
    typed, `=?utf-8?b?SGk=?=` is an encoded word itself, which mail clients
    would show decoded (as "Hi", or as text with a line break in it). Encoded,
    it shows as typed. A long name becomes several encoded words of at most
    75 characters each (RFC 2047), kept on one line; one that fits in a
    single word is written exactly as `formataddr` writes it.
    """
    _checked("address", name + address)
    if not ADDRESS.fullmatch(address):
        raise ValueError(f"{address!r} is not an address this mailer can send to")
    if name.isascii() and "=?" not in name:
        return formataddr((name, address))
    words = Header(name, "utf-8", maxlinelen=75).encode(linesep="\r\n").replace("\r\n ", " ")
    return f"{words} <{address}>"


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


def _ascii_html(html: str, raw_text_free: bool | None = None) -> str:
    """The HTML with any non-ASCII character written as a character reference.

    `&#8220;` shows exactly as `“` does, and an ASCII part with short lines
    goes as 7bit: smaller than quoted-printable (which also turns every `=`
    of every attribute into `=3D`) and cheaper to write. Left as it is when
    non-ASCII text sits in a style, script or other raw-text element or a
    CDATA section, where a reference would not be read as one. That search is
    skipped when the renderer already knows there is none (`raw_text_free`).
    """
    if html.isascii():
        return html
    if not raw_text_free and any(not m.group().isascii() for m in RAW_TEXT.finditer(html)):
        return html
    return html.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _part(content_type: str, body: str) -> bytes:
    """One MIME part: 7bit when it is plain short-lined ASCII, quoted-printable otherwise."""
    text = body.replace("\r\n", "\n").replace("\r", "\n") if "\r" in body else body
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
    """Try again later: 4xx, a timeout, a refused or dropped connection, or a 5xx
    that does not say the address is bad (see `_classify`)."""


class ServerUnreachable(TemporaryFailure):
    """No SMTP conversation at all: refused, timed out, or dropped."""


class SessionRefused(ServerUnreachable):
    """The server answers but refuses us, not a recipient: the same for every email.

    Its greeting, EHLO, STARTTLS, login or our sender address was refused (a
    blocklisted IP, a rotated password, a missing `?tls=starttls`, a sender the
    relay does not allow). Like an unreachable server it defers the batch.
    """


class PermanentFailure(Exception):
    """Never try again: the server refused this recipient's address (a bounce)."""


#: An enhanced status code (RFC 3463) at the start of a reply's text: 5.1.1 and so on.
ENHANCED_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")

#: Refusals of the session rather than of a recipient or a message.
_SESSION_ERRORS = (
    smtplib.SMTPConnectError,
    smtplib.SMTPHeloError,
    smtplib.SMTPAuthenticationError,
    smtplib.SMTPSenderRefused,
)


def _classify(error: Exception, *, connecting: bool = False) -> Exception:
    """Sort an SMTP error into what happens next to the email and its recipient.

    Only a refusal of the address itself bounces (suppresses) the recipient:
    a 5xx to RCPT, unless its enhanced status names a cause other than the
    address or mailbox, or a 5xx to the message whose enhanced status does
    (5.1.x, 5.2.1). A 5xx for anything else (a policy, the content, our
    account) is the sender's to fix, so the email is tried again, with
    backoff, until the retry horizon. A 5xx while `connecting` (greeting,
    EHLO, STARTTLS, login) or to our sender is a `SessionRefused`; a 4xx
    while connecting, like no answer at all, a `ServerUnreachable`.
    """
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        code, reply = next(iter(error.recipients.values()))
        return _by_code(code, reply, recipient=True)
    if isinstance(error, smtplib.SMTPResponseException):
        code, reply = error.smtp_code, error.smtp_error
        if (connecting or isinstance(error, _SESSION_ERRORS)) and 500 <= code < 600:
            return SessionRefused(_text(code, reply))
        if connecting:  # 421 and the like: no conversation now, for any email
            return ServerUnreachable(_text(code, reply))
        return _by_code(code, reply, recipient=False)
    if connecting and (
        isinstance(error, ssl.SSLError)
        or (
            isinstance(error, smtplib.SMTPException)
            and not isinstance(error, smtplib.SMTPServerDisconnected)
        )
    ):
        # No STARTTLS or no login method on offer, a TLS handshake that fails (a
        # certificate for another name, TLS against a plain port): the settings do
        # not fit the server. (Every SMTPException is an OSError too, so this comes
        # before the network's errors.)
        return SessionRefused(f"{type(error).__name__}: {error}")
    return ServerUnreachable(f"{type(error).__name__}: {error}")


def _text(code: int, reply: bytes | str) -> str:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    return f"{code} {text}".strip()


def _by_code(code: int, reply: bytes | str, *, recipient: bool) -> Exception:
    message = _text(code, reply)
    if not 500 <= code < 600:
        return TemporaryFailure(message)
    enhanced = ENHANCED_STATUS.match(message[len(str(code)) :])
    if enhanced is None:
        bounce = recipient  # a bare 5xx to RCPT refuses the address
    else:
        subject, detail = enhanced.group(2), enhanced.group(3)
        bounce = subject == "1" or (subject, detail) == ("2", "1")
    if bounce:
        return PermanentFailure(message)
    return TemporaryFailure(f"refused, not for the address: {message}")


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
        try:
            if s.tls == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if s.username:
                smtp.login(s.username, s.password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def send(self, email: OutgoingEmail | EmailMessage, signer: DKIMSigner | None = None) -> None:
        """Send one email, DKIM-signed if a signer is given.

        Raises PermanentFailure (a bounce) or TemporaryFailure; of those,
        ServerUnreachable and SessionRefused hold for every email. A connection that the
        server dropped between two messages is reopened once: servers close
        idle or long-lived sessions, and that is no reason to give up.
        """
        if isinstance(email, EmailMessage):
            email = OutgoingEmail.from_message(email)
        data = email.data
        if signer is not None:
            data = signer.sign(data) + data
        for attempt in (1, 2):
            if self._smtp is None:
                try:
                    self._smtp = self._connect()
                except (smtplib.SMTPException, OSError) as error:
                    raise _classify(error, connecting=True) from error
            try:
                _transfer(self._smtp, email.sender, email.recipients, data)
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


#: A line of the body that starts with a dot gets a second one (RFC 5321 4.5.2).
_LEADING_DOT = re.compile(rb"(?m)^\.")


def _transfer(smtp: smtplib.SMTP, sender: str, recipients: tuple[str, ...], data: bytes) -> None:
    """One message's transaction, pipelined when the server offers it (RFC 2920).

    MAIL, RCPT and DATA go out in one write and their replies are read
    together, then the body: two round trips instead of smtplib's four, which
    halves the CPU an email costs on both ends of a fast connection. Only
    addresses `build_message` would write go this way (no SIZE or other
    options are needed for them); anything else, and any server without
    PIPELINING, goes through `sendmail`. Failures raise smtplib's own
    exceptions, as `sendmail` does.
    """
    smtp.ehlo_or_helo_if_needed()
    addresses = (sender, *recipients)
    if not smtp.has_extn("pipelining") or not all(map(ADDRESS.fullmatch, addresses)):
        smtp.sendmail(sender, list(recipients), data)
        return
    commands = [f"MAIL FROM:<{sender}>\r\n"]
    commands += [f"RCPT TO:<{recipient}>\r\n" for recipient in recipients]
    smtp.send("".join(commands).encode("ascii") + b"DATA\r\n")
    replies, hung_up = _replies(smtp, len(recipients) + 2)
    mail, *answers = replies
    refused = {
        recipient: answer
        for recipient, answer in zip(recipients, answers, strict=False)
        if answer[0] not in (250, 251)
    }
    if hung_up:  # what the server said before it closed is the reason (RFC 5321: 421 closes)
        if mail[0] != 250:
            raise smtplib.SMTPSenderRefused(*mail, sender)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)
        raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
    code, reply = answers[-1]
    if code == 354 and (mail[0] != 250 or len(refused) == len(recipients)):
        # A server that took DATA after refusing the envelope gets an empty message,
        # which it must refuse too; then the transaction is reset.
        smtp.send(b".\r\n")
        smtp.getreply()
        code = 0
    if mail[0] != 250 or len(refused) == len(recipients) or code != 354:
        closing = 421 in (mail[0], code, *(answer[0] for answer in refused.values()))
        _end_transaction(smtp, closing)
        if mail[0] != 250:
            raise smtplib.SMTPSenderRefused(*mail, sender)
        if len(refused) == len(recipients):
            raise smtplib.SMTPRecipientsRefused(refused)
        raise smtplib.SMTPDataError(code, reply)
    body = _LEADING_DOT.sub(b"..", data) if data.startswith(b".") or b"\n." in data else data
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    smtp.send(body + b".\r\n")
    code, reply = smtp.getreply()
    if code != 250:
        _end_transaction(smtp, code == 421)
        raise smtplib.SMTPDataError(code, reply)


def _replies(smtp: smtplib.SMTP, count: int) -> tuple[list[tuple[int, bytes]], bool]:
    """Up to `count` pipelined replies, and whether the server hung up before the last.

    A server that refuses may close the connection at once (it must after a
    421, and many do after a 5xx): the replies read before that are kept, so
    the refusal is reported as itself rather than as a lost connection. A
    server that closes before saying anything raises as smtplib does.
    """
    replies: list[tuple[int, bytes]] = []
    try:
        while len(replies) < count:
            replies.append(smtp.getreply())
    except smtplib.SMTPServerDisconnected:
        if not replies:
            raise
        return replies, True
    return replies, False


def _end_transaction(smtp: smtplib.SMTP, closing: bool) -> None:
    """After a refusal: reset for the next message, or close if the server is closing (421)."""
    if closing:
        smtp.close()
        return
    with contextlib.suppress(smtplib.SMTPServerDisconnected):
        smtp.rset()
