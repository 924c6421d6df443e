"""`nurture lint`: find what would break a send, or hurt it, before a send does.

Errors (exit 1): a manifest or template that does not load or render, an
unknown name or snippet, a missing subject or preheader, HTML over 100 KB, a
link that is not an absolute http(s) URL or that points at this machine outside
development, a layout without the unsubscribe link or postal address.
Warnings (exit 0): a subject over 78 characters, which many inboxes cut off.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import urlsplit

from nurture.config import Settings
from nurture.preview import parts, preview_message
from nurture.render import LAYOUT_HTML, LAYOUT_TEXT, RenderError
from nurture.sequences import Sequence, SequenceError, load_sequences

SUBJECT_WARN = 78
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
HREF = re.compile(r'href="([^"]*)"')


@dataclass(frozen=True)
class Problem:
    message: str  # `file:line: text`
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.message} (warning)" if self.warning else self.message


def footer_problems(settings: Settings, message: EmailMessage) -> list[Problem]:
    """A course email must show the unsubscribe link and the postal address, in both parts."""
    text, page = parts(message)
    unsubscribe = (message["List-Unsubscribe"] or "").split(",")[0].strip(" <>")
    problems = []
    for name, body in ((LAYOUT_HTML, page), (LAYOUT_TEXT, text)):
        where = settings.templates_path / name
        if not unsubscribe or unsubscribe not in body:
            problems.append(
                Problem(
                    f"{where}:1: course emails must show the unsubscribe link "
                    "(keep {{ unsubscribe_url }} in the footer)"
                )
            )
        if settings.postal_address not in body:
            problems.append(
                Problem(
                    f"{where}:1: course emails must show the postal address "
                    "(keep {{ postal_address }} in the footer)"
                )
            )
    return problems


def _line_of(path, needle: str) -> int:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 1
    return next((n for n, line in enumerate(lines, 1) if needle in line), 1)


def link_problems(settings: Settings, message: EmailMessage, source) -> list[Problem]:
    """Every link must be an absolute http(s) URL, and not this machine in production."""
    _, page = parts(message)
    unsubscribe = (message["List-Unsubscribe"] or "").split(",")[0].strip(" <>")
    problems = []
    for url in {html.unescape(u) for u in HREF.findall(page)} - {unsubscribe}:
        if not url or url.startswith(settings.base_url + "/"):
            # Our own links (BASE_URL is checked once, below); an empty href is the
            # layout's missing unsubscribe link, which footer_problems names.
            continue
        target = urlsplit(url)
        needle = "course_url" if url == settings.course_url else url
        where = f"{source}:{_line_of(source, needle)}"
        if target.scheme not in ("http", "https") or not target.hostname:
            problems.append(Problem(f"{where}: link {url!r} is not an absolute http(s) URL"))
        elif not settings.is_dev and target.hostname in LOCAL_HOSTS:
            problems.append(Problem(f"{where}: link {url!r} points at this machine"))
    return problems


def _email_problems(settings: Settings, sequence: Sequence | None, step: str) -> list[Problem]:
    name = "-" if sequence is None else sequence.name
    source = (
        settings.templates_path / "confirmation.md"
        if sequence is None
        else sequence.path / sequence.step(step).file
    )
    problems: list[Problem] = []
    for first_name in ("Alex", ""):
        try:
            message = preview_message(settings, name, step, first_name=first_name)
        except RenderError as error:
            return [Problem(str(error))]
        if len(message["Subject"]) > SUBJECT_WARN:
            problems.append(
                Problem(
                    f"{source}:2: the subject has {len(message['Subject'])} characters; "
                    f"inboxes cut it off after about {SUBJECT_WARN}",
                    warning=True,
                )
            )
        problems += link_problems(settings, message, source)
        if sequence is not None:
            problems += footer_problems(settings, message)
    return problems


def lint_templates(settings: Settings) -> list[Problem]:
    """Every problem, errors and warnings, each once."""
    try:
        sequences = load_sequences(settings.templates_path)
    except SequenceError as error:
        return [Problem(str(error))]
    problems = []
    if not settings.is_dev and urlsplit(settings.base_url).hostname in LOCAL_HOSTS:
        problems.append(
            Problem(f"BASE_URL={settings.base_url}: links in emails would point at this machine")
        )
    problems += _email_problems(settings, None, "confirmation")
    for sequence in sequences.values():
        for step in sequence.steps:
            problems += _email_problems(settings, sequence, step.key)
    return list(dict.fromkeys(problems))
