"""Previews: any email exactly as it would go out, for a sample subscriber."""

from __future__ import annotations

from email.message import EmailMessage

from nurture.config import Settings
from nurture.delivery import Composer
from nurture.models import Subscriber, utcnow
from nurture.sequences import current_sequences

SAMPLE_EMAIL = "alex@example.com"


def preview_message(
    settings: Settings, sequence: str, step: str, *, first_name: str = "Alex"
) -> EmailMessage:
    """The full message for `sequence`/`step` (or the confirmation email)."""
    composer = Composer(settings, current_sequences(settings.templates_path))
    sample = Subscriber(id=0, email=SAMPLE_EMAIL, first_name=first_name)
    message_id = f"<preview@{settings.mail_domain}>"
    if step == "confirmation":
        return composer.confirmation(sample, 0, message_id, utcnow())
    return composer.course_step(sequence, step, sample, message_id, utcnow())


def parts(message: EmailMessage) -> tuple[str, str]:
    """(text, html) of a multipart/alternative message."""
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    return (text.get_content() if text else "", html.get_content() if html else "")
