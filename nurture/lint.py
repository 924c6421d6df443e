"""`nurture lint`: find what would break a send before a send does."""

from __future__ import annotations

from email.message import EmailMessage

from nurture.config import Settings
from nurture.preview import parts, preview_message
from nurture.render import LAYOUT_HTML, LAYOUT_TEXT, RenderError
from nurture.sequences import SequenceError, load_sequences


def footer_problems(settings: Settings, message: EmailMessage) -> list[str]:
    """A course email must show the unsubscribe link and the postal address, in both parts."""
    text, html = parts(message)
    unsubscribe = (message["List-Unsubscribe"] or "").split(",")[0].strip(" <>")
    problems = []
    for name, body in ((LAYOUT_HTML, html), (LAYOUT_TEXT, text)):
        where = settings.templates_path / name
        if not unsubscribe or unsubscribe not in body:
            problems.append(
                f"{where}:1: course emails must show the unsubscribe link "
                "(keep {{ unsubscribe_url }} in the footer)"
            )
        if settings.postal_address not in body:
            problems.append(
                f"{where}:1: course emails must show the postal address "
                "(keep {{ postal_address }} in the footer)"
            )
    return problems


def lint_templates(settings: Settings) -> list[str]:
    """Every problem as `file:line: message`; an empty list when all is well."""
    try:
        sequences = load_sequences(settings.templates_path)
    except SequenceError as error:
        return [str(error)]
    problems: list[str] = []
    emails = [("-", "confirmation")] + [
        (name, step.key) for name, sequence in sequences.items() for step in sequence.steps
    ]
    for sequence, step in emails:
        for first_name in ("Alex", ""):
            try:
                message = preview_message(settings, sequence, step, first_name=first_name)
            except RenderError as error:
                problems.append(str(error))
                break
            if step != "confirmation":
                problems.extend(p for p in footer_problems(settings, message) if p not in problems)
    return problems
