"""`nurture lint`: find what would break a send before a send does."""

from __future__ import annotations

from nurture.config import Settings
from nurture.preview import preview_message
from nurture.render import RenderError
from nurture.sequences import SequenceError, load_sequences


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
                preview_message(settings, sequence, step, first_name=first_name)
            except RenderError as error:
                problems.append(str(error))
                break
    return problems
