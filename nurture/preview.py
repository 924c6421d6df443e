"""Previews: any email exactly as it would go out, for a sample subscriber."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid
from html.parser import HTMLParser

from nurture.config import Settings
from nurture.delivery import composer_for
from nurture.dkim import dkim_signer
from nurture.mailer import OutgoingEmail, SMTPConnection, parse_smtp_url
from nurture.models import Subscriber, utcnow
from nurture.sequences import current_sequences

SAMPLE_EMAIL = "alex@example.com"


def preview_email(
    settings: Settings, sequence: str, step: str, *, first_name: str = "Alex"
) -> OutgoingEmail:
    """The email for `sequence`/`step` (or the confirmation email), as it would be sent."""
    composer = composer_for(settings, current_sequences(settings.templates_path))
    sample = Subscriber(id=0, email=SAMPLE_EMAIL, first_name=first_name)
    message_id = f"<preview@{settings.mail_domain}>"
    if step == "confirmation":
        return composer.confirmation(sample, 0, message_id, utcnow())
    return composer.course_step(sequence, step, sample, message_id, utcnow())


def preview_message(
    settings: Settings, sequence: str, step: str, *, first_name: str = "Alex"
) -> EmailMessage:
    """The same email parsed, for the preview pages and lint to look into."""
    return preview_email(settings, sequence, step, first_name=first_name).message()


def parts(message: EmailMessage) -> tuple[str, str]:
    """(text, html) of a multipart/alternative message."""
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    return (text.get_content() if text else "", html.get_content() if html else "")


#: About as much of the body as an inbox shows after the subject.
INBOX_PREVIEW_CHARS = 110


class _BodyText(HTMLParser):
    """The text of an HTML body as an inbox reads it for its preview line: hidden or
    not, in order, without the head, styles or scripts."""

    SKIPPED = frozenset({"head", "title", "style", "script"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.words: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        self._skipping += tag in self.SKIPPED

    def handle_endtag(self, tag):
        self._skipping -= tag in self.SKIPPED and self._skipping > 0

    def handle_data(self, data):
        if not self._skipping:
            self.words += data.split()


def inbox_preview(html: str) -> str:
    """The line an inbox shows after the subject: the start of the body's text, which
    is the preheader when the layout puts it first, as ours does."""
    parser = _BodyText()
    parser.feed(html)
    text = " ".join(parser.words)
    return text if len(text) <= INBOX_PREVIEW_CHARS else text[:INBOX_PREVIEW_CHARS] + "…"


def send_test(
    settings: Settings, sequence: str, step: str, to: str, *, first_name: str = "Alex"
) -> EmailMessage:
    """Send one email now, as it would go out, to `to`, marked as a test.

    For marketers checking a change in a real inbox; it bypasses the schedule
    and the database entirely. Raises mailer.TemporaryFailure or
    PermanentFailure with the server's reason.
    """
    message = preview_message(settings, sequence, step, first_name=first_name)
    subject = message["Subject"]
    del message["To"], message["Subject"], message["Message-ID"]
    message["To"] = to
    message["Subject"] = f"[Test] {subject}"
    message["Message-ID"] = make_msgid(domain=settings.mail_domain)
    message["X-Nurture-Test"] = "1"
    with SMTPConnection(parse_smtp_url(settings.smtp_url)) as smtp:
        smtp.send(message, signer=dkim_signer(settings))
    return message
