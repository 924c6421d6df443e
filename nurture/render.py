"""Turn an email file into subject, preheader, HTML and plain text.

One source gives both parts: the body is Markdown with Jinja in it. Jinja runs
sandboxed with undefined names as errors. It runs once for each part: for the
HTML part every value a subscriber typed is escaped for Markdown and HTML, for
the text part it goes in as typed. The shared layout (`_layout.html`,
`_layout.txt`) wraps every email and carries the footer, so no email can forget
the unsubscribe link or the postal address. CSS is inlined, since most mail
clients drop <style> blocks.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import css_inline
import markdown
from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError, select_autoescape
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup

LAYOUT_HTML = "_layout.html"
LAYOUT_TEXT = "_layout.txt"
SNIPPETS = "_snippets/"  # reusable pieces: {% include "_snippets/NAME.md" %}
MAX_HTML_BYTES = 100 * 1024  # Gmail clips messages at about 102 KB
FRONT_MATTER_KEYS = ("subject", "preheader")
MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()>#+\-.!|])")


class RenderError(Exception):
    """An email could not be rendered; the message says where and why."""


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    preheader: str
    html: str
    text: str


def split_front_matter(source: str, filename: str = "<email>") -> tuple[dict[str, str], str]:
    """Split `---` front matter from the body.

    The front matter's lines are replaced by blank lines in the body, so that
    Jinja's line numbers match the file the marketer edits.
    """
    lines = source.split("\n")
    if not lines or lines[0].strip() != "---":
        raise RenderError(f"{filename}:1: an email starts with a '---' line, then subject:")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise RenderError(f"{filename}:1: the front matter has no closing '---' line") from None
    fields: dict[str, str] = {}
    for number in range(1, end):
        line = lines[number]
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep or key not in FRONT_MATTER_KEYS:
            raise RenderError(
                f"{filename}:{number + 1}: expected 'subject: ...' or 'preheader: ...'"
            )
        fields[key] = value.strip()
    for key in FRONT_MATTER_KEYS:
        if not fields.get(key):
            raise RenderError(f"{filename}:1: the front matter has no {key}")
    return fields, "\n" * (end + 1) + "\n".join(lines[end + 1 :])


def _template_location(error: TemplateError) -> tuple[str | None, int | None]:
    """Where in a template an error happened.

    Syntax errors carry their file and line. Errors while rendering (an
    undefined name, a blocked attribute) do not, but Jinja rewrites the
    traceback so that its innermost template frame names the file and line.
    """
    where, line = getattr(error, "filename", None), getattr(error, "lineno", None)
    if line is not None:
        return where, line
    traceback = error.__traceback__
    while traceback is not None:
        filename = traceback.tb_frame.f_code.co_filename
        if not filename.endswith(".py"):
            where, line = filename, traceback.tb_lineno
        traceback = traceback.tb_next
    return where, line


class _EmailLoader(FileSystemLoader):
    """Loads email files without their front matter, keeping line numbers."""

    def get_source(self, environment, template):
        source, filename, uptodate = super().get_source(environment, template)
        if template.endswith(".md") and not template.startswith(SNIPPETS):
            _, source = split_front_matter(source, filename)
        return source, filename, uptodate


def _escape_for_markdown(value: object) -> object:
    """Make a subscriber's value inert in Markdown and HTML (trusted Markup passes)."""
    if value is None or isinstance(value, Markup | int | float):
        return value
    return _escape_markdown_only(html.escape(str(value), quote=False))


def _escape_markdown_only(value: object) -> object:
    """Make a subscriber's value inert in Markdown, for the plain-text part."""
    if value is None or isinstance(value, Markup | int | float):
        return value
    return MARKDOWN_SPECIALS.sub(r"\\\1", str(value))


def _strip_controls(value: str) -> str:
    """A subject is one header line: no CR, LF or other control characters."""
    return " ".join("".join(c if c.isprintable() else " " for c in value).split())


LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)(\{[^}]*\})?")
EMPHASIS = re.compile(r"(\*\*|__|\*|_)(?=\S)(.+?)(?<=\S)\1")
HEADING = re.compile(r"^#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.MULTILINE)
ESCAPE = re.compile(r"\\([\\`*_{}\[\]()>#+\-.!|])")


def markdown_to_text(source: str) -> str:
    """Plain text that reads naturally: links spelled out, no markup left."""
    # Escaped characters and URLs are set aside first, so no later pass reads
    # them as markup (an underscore in a URL is not emphasis).
    kept: list[str] = []

    def keep(value: str) -> str:
        kept.append(value)
        return f"\x00{len(kept) - 1}\x00"

    def link(match: re.Match) -> str:
        label, url, attrs = match.group(1), keep(match.group(2)), match.group(3) or ""
        return f"{label}: {url}" if "button" in attrs else f"{label} ({url})"

    text = ESCAPE.sub(lambda m: keep(m.group(1)), source)
    text = LINK.sub(link, text)
    text = HEADING.sub(lambda m: m.group(1).upper(), text)
    text = EMPHASIS.sub(r"\2", text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


HREF = re.compile(r'href="(https?://[^"]+)"')


def rewrite_links(
    email: RenderedEmail, rewrite: Callable[[str], str], keep: frozenset[str] = frozenset()
) -> RenderedEmail:
    """The same email with every http(s) link but those in `keep` rewritten.

    Used for click tracking: the HTML's hrefs and the same URLs spelled out in
    the text part both go through `rewrite`.
    """
    urls = {html.unescape(u) for u in HREF.findall(email.html)} - keep
    page, text = email.html, email.text
    for url in sorted(urls, key=len, reverse=True):
        target = rewrite(url)
        page = page.replace(f'href="{html.escape(url)}"', f'href="{html.escape(target)}"')
        text = re.sub(re.escape(url) + r"(?=[\s)>\]]|$)", lambda _m, t=target: t, text)
    return replace(email, html=page, text=text)


def button(label: str, url: str) -> Markup:
    """The call to action: `{{ button("Read about the course", course_url) }}`."""
    return Markup(f"[{label}]({url}){{.button}}")


def quote(text: str, author: str = "") -> Markup:
    """A pull quote: `{{ quote("Words", "Who said them") }}`."""
    lines = [f"> {line}" for line in str(text).splitlines() or [""]]
    if author:
        lines += [">", f"> — {author}"]
    return Markup("\n".join(lines))


#: Helpers every email can use without importing anything.
SNIPPET_FUNCTIONS = {"button": button, "quote": quote}


def add_open_pixel(email: RenderedEmail, url: str) -> RenderedEmail:
    """The email with a 1x1 image that reports an open.

    Opens are an estimate: many clients block images, and privacy proxies fetch
    every image whether or not anyone reads the email.
    """
    pixel = f'<img src="{html.escape(url)}" width="1" height="1" alt="" style="display:block">'
    page = email.html.replace("</body>", pixel + "</body>", 1)
    return replace(email, html=page)


@dataclass(frozen=True)
class _Header:
    source: str
    template: Template


class Renderer:
    """Renders the email files under one templates folder."""

    def __init__(self, templates_path: Path, *, postal_address: str, course_url: str):
        self.templates_path = templates_path
        self.postal_address = postal_address
        self.course_url = course_url
        loader = _EmailLoader(str(templates_path))
        common = dict(loader=loader, undefined=StrictUndefined, auto_reload=True)
        self._html_env = SandboxedEnvironment(
            **common, finalize=_escape_for_markdown, autoescape=False
        )
        self._text_env = SandboxedEnvironment(**common, autoescape=False)
        self._text_body_env = SandboxedEnvironment(
            **common, finalize=_escape_markdown_only, autoescape=False
        )
        self._header_cache: dict[str, tuple[int, dict[str, _Header]]] = {}
        self._local = threading.local()
        for env in (self._html_env, self._text_env, self._text_body_env):
            env.globals.update(SNIPPET_FUNCTIONS)
        self._layout_env = SandboxedEnvironment(
            **common, autoescape=select_autoescape(["html"], default_for_string=False)
        )

    def front_matter(self, name: str) -> dict[str, str]:
        return {key: template.source for key, template in self._headers(name).items()}

    def _headers(self, name: str) -> dict[str, _Header]:
        """The subject and preheader templates of an email file, compiled once per version."""
        path = self.templates_path / name
        try:
            stamp = path.stat().st_mtime_ns
            cached = self._header_cache.get(name)
            if cached and cached[0] == stamp:
                return cached[1]
            fields, _ = split_front_matter(path.read_text(encoding="utf-8"), str(path))
        except OSError as error:
            raise RenderError(f"{path}: cannot read: {error.strerror}") from None
        headers = {
            key: _Header(value, self._text_env.from_string(value)) for key, value in fields.items()
        }
        self._header_cache[name] = (stamp, headers)
        return headers

    def _markdown(self) -> markdown.Markdown:
        """A Markdown converter for this thread: building one costs more than converting."""
        converter = getattr(self._local, "markdown", None)
        if converter is None:
            converter = self._local.markdown = markdown.Markdown(extensions=["attr_list", "nl2br"])
        return converter

    def render(
        self,
        name: str,
        values: Mapping[str, object],
        *,
        links: Mapping[str, str] | None = None,
        unsubscribe_url: str | None = None,
        list_title: str = "",
    ) -> RenderedEmail:
        """Render email file `name` (relative to the templates folder).

        `values` come from the subscriber and are escaped in the HTML part;
        `links` are URLs the system made (confirmation, course page) and go in
        as they are. With `unsubscribe_url`, the footer offers to unsubscribe.
        """
        trusted = {"course_url": self.course_url, **(links or {})}
        context = {**values, **{k: Markup(v) for k, v in trusted.items()}}
        plain = {**values, **trusted}
        try:
            headers = self._headers(name)
            subject = _strip_controls(headers["subject"].template.render(plain))
            preheader = _strip_controls(headers["preheader"].template.render(plain))
            body_markdown = self._html_env.get_template(name).render(context)
            body_text = markdown_to_text(self._text_body_env.get_template(name).render(context))
            layout = {
                "subject": subject,
                "preheader": preheader,
                "unsubscribe_url": unsubscribe_url,
                "postal_address": self.postal_address,
                "list_title": list_title,
            }
            body_html = self._markdown().reset().convert(body_markdown)
            page = self._layout_env.get_template(LAYOUT_HTML).render(layout, body=Markup(body_html))
            text = self._layout_env.get_template(LAYOUT_TEXT).render(layout, body=body_text)
        except TemplateError as error:
            where, line = _template_location(error)
            raise RenderError(f"{where or name}:{line or 1}: {error.message or error}") from error
        inlined = css_inline.inline(page)
        if len(inlined.encode()) > MAX_HTML_BYTES:
            raise RenderError(
                f"{self.templates_path / name}:1: the HTML is over 100 KB after inlining; "
                "Gmail clips it"
            )
        return RenderedEmail(subject=subject, preheader=preheader, html=inlined, text=text)
