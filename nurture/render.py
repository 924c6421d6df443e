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
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import css_inline
import markdown
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    nodes,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup

LAYOUT_HTML = "_layout.html"
LAYOUT_TEXT = "_layout.txt"
SNIPPETS = "_snippets/"  # reusable pieces: {% include "_snippets/NAME.md" %}
MAX_HTML_BYTES = 100 * 1024  # Gmail clips messages at about 102 KB
FRONT_MATTER_KEYS = ("subject", "preheader")
#: The characters Python-Markdown takes a backslash off (its ESCAPED_CHARS).
MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()>#+\-.!])")


class RenderError(Exception):
    """An email could not be rendered; the message says where and why."""


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    preheader: str
    html: str
    text: str
    #: Whether the HTML is known to hold no raw-text element or CDATA section (see
    #: RAW_TEXT), so that the mailer need not search it for one; None: not known.
    #: Worked out once per shape: filling one in, tracking its links or adding the
    #: open pixel cannot add such an element.
    raw_text_free: bool | None = field(default=None, compare=False)


#: Where text is not HTML, so a character reference would show as written: raw-text
#: elements (to their end tag, or to the end if there is none) and CDATA sections.
RAW_TEXT = re.compile(
    r"<(style|script|xmp|iframe|noembed|noframes|plaintext)\b.*?(?:</\1\s*>|\Z)"
    r"|<!\[CDATA\[.*?(?:\]\]>|\Z)",
    re.IGNORECASE | re.DOTALL,
)


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


def _template_location(error: Exception) -> tuple[str | None, int | None]:
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
        # Not Python's own code either: "<string>" (generated), "<frozen importlib...>".
        if not filename.endswith(".py") and not filename.startswith("<"):
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
    if not value.isprintable():  # rare: look at each character only then
        value = "".join(c if c.isprintable() else " " for c in value)
    return " ".join(value.split())


LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)(\{[^}]*\})?")
EMPHASIS = re.compile(r"(\*\*|__|\*|_)(?=\S)(.+?)(?<=\S)\1")
HEADING = re.compile(r"^#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.MULTILINE)
ESCAPE = re.compile(r"\\([\\`*_{}\[\]()>#+\-.!])")


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


#: Tags that load another template: its file is part of the email's version.
_LOADS = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)
#: Tags whose output can be used again as a value (compared, filtered), so a
#: value used inside them is not plain.
_CAPTURES = (nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.AssignBlock, nodes.Block)


class _Paths(dict):
    """Template names to their paths as strings, made once (a stat runs per email)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> str:
        path = self[name] = str(self.root / name)
        return path


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
        self._shapes: dict[tuple, tuple[tuple, _Shape | None]] = {}
        self._include_cache: dict[str, tuple[int, list[str]]] = {}
        self._paths = _Paths(templates_path)
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

    def headers_for(self, name: str, values: Mapping[str, object]) -> tuple[str, str]:
        """The subject and preheader of email `name` for these values."""
        plain = {"course_url": self.course_url, **values}
        headers = self._headers(name)
        subject = _strip_controls(headers["subject"].template.render(plain))
        return subject, _strip_controls(headers["preheader"].template.render(plain))

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

        Most emails are rendered once per file version and then filled in per
        subscriber (see `_Shape`); the rest go through the whole pipeline.
        """
        if not links and _fillable(values, unsubscribe_url):
            shape = self._shape(name, values, unsubscribe_url is not None, list_title)
            if shape is not None:
                return shape.fill(values, unsubscribe_url)
        return self._render_fully(
            name, values, links=links, unsubscribe_url=unsubscribe_url, list_title=list_title
        )

    @contextmanager
    def one_version(self) -> Iterator[None]:
        """Look at each email's files once in the block rather than once per email.

        While a shape made from the files as they were when first looked at in
        the block is cached, it serves every email in the block without a stat
        of each file: a batch composed in one block costs that much less. An
        edit made meanwhile shows by the next block (sooner, if a shape has to
        be made anyway). Per thread, since a worker's threads share one renderer.
        """
        outer = getattr(self._local, "stamps", None)
        self._local.stamps = {} if outer is None else outer
        try:
            yield
        finally:
            self._local.stamps = outer

    def _shape(
        self, name: str, values: Mapping[str, object], unsubscribing: bool, list_title: str
    ) -> _Shape | None:
        """The email rendered with slots for these values, or None if it cannot be reused.

        Cached per file version (the email, what it includes and the layouts)
        and per which values are empty, since `{% if first_name %}` may choose
        other words. Before a shape is trusted it is checked against a full
        render with awkward values; one that differs is never used.
        """
        # None and "" are both empty, but `{{ first_name }}` prints them differently.
        emptiness = tuple((k, bool(v), v is None) for k, v in sorted(values.items()))
        key = (name, emptiness, unsubscribing, list_title)
        cached = self._shapes.get(key)
        pinned = getattr(self._local, "stamps", None)  # see one_version
        if cached is not None and pinned and pinned.get(name) == cached[0]:
            return cached[1]
        try:
            stamp = self._stamp(name)
        except (OSError, TemplateError):
            return None
        if pinned is not None:
            pinned[name] = stamp
        if cached is not None and cached[0] == stamp:
            return cached[1]
        shape = None
        try:
            if self._plain_uses(stamp, set(values)):
                shape = _Shape.make(self, name, values, unsubscribing, list_title)
        except Exception:
            shape = None  # whatever it is, rendering in full reports it
        self._shapes[key] = (stamp, shape)
        return shape

    def _stamp(self, name: str) -> tuple:
        """The version of everything an email is rendered from: its files' mtimes."""
        email, *loaded = self._versions(name)
        layouts = tuple(
            (n, os.stat(self._paths[n]).st_mtime_ns) for n in (LAYOUT_HTML, LAYOUT_TEXT)
        )
        return (email, *layouts, *loaded)

    def _versions(self, name: str, depth: int = 0) -> list[tuple[str, int]]:
        """`name` and the files it includes, imports or extends, directly or not, with mtimes.

        Only each file's own loads are cached (by its mtime), so a snippet
        that starts including another file brings that file in at once.
        """
        mtime = os.stat(self._paths[name]).st_mtime_ns
        cached = self._include_cache.get(name)
        if cached is None or cached[0] != mtime:
            source = self._html_env.loader.get_source(self._html_env, name)[0]
            loads = [
                node.template.value
                for node in self._html_env.parse(source).find_all(_LOADS)
                if isinstance(node.template, nodes.Const)  # others render in full
            ]
            cached = self._include_cache[name] = (mtime, loads)
        found = [(name, mtime)]
        if depth < 5:
            for loaded in cached[1]:
                found += self._versions(loaded, depth + 1)
        return found

    def _plain_uses(self, stamp: tuple, names: set[str]) -> bool:
        """Whether every use of `names` is plain: `{{ x }}`, `{{ x or "..." }}`, `{% if x %}`.

        Then the output depends only on whether each value is empty, and the
        value itself can be put in afterwards. A filter, a call, a comparison,
        an include or import with a computed name, or a use inside a macro, a
        call or filter block, a `{% set %}` block or a block (whose output can
        be compared or filtered: `caller()`, `self.name()`) makes the email
        render in full.
        """
        sources = [self._html_env.loader.get_source(self._html_env, n)[0] for n, _ in stamp]
        sources += [h.source for h in self._headers(stamp[0][0]).values()]
        for source in sources:
            tree = self._html_env.parse(source)
            if any(not isinstance(i.template, nodes.Const) for i in tree.find_all(_LOADS)):
                return False
            captured = {id(n) for c in tree.find_all(_CAPTURES) for n in c.find_all(nodes.Name)}
            if any(n.name in names and id(n) in captured for n in tree.find_all(nodes.Name)):
                return False
            plain: set[int] = set()
            for output in tree.find_all(nodes.Output):
                for child in output.nodes:
                    if isinstance(child, nodes.Or) and isinstance(child.right, nodes.Const):
                        child = child.left
                    plain.add(id(child))
            for branch in tree.find_all(nodes.If):
                test = branch.test.node if isinstance(branch.test, nodes.Not) else branch.test
                plain.add(id(test))
            if any(n.name in names and id(n) not in plain for n in tree.find_all(nodes.Name)):
                return False
        return True

    def _render_fully(
        self,
        name: str,
        values: Mapping[str, object],
        *,
        links: Mapping[str, str] | None = None,
        unsubscribe_url: str | None = None,
        list_title: str = "",
    ) -> RenderedEmail:
        """The whole pipeline: Jinja twice, Markdown, the layouts, CSS inlining."""
        trusted = {"course_url": self.course_url, **(links or {})}
        context = {**values, **{k: Markup(v) for k, v in trusted.items()}}
        plain = {**values, **trusted}
        try:
            subject, preheader = self.headers_for(name, plain)
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
        except Exception as error:
            where, line = _template_location(error)
            if isinstance(error, TemplateError):
                message = error.message or str(error)
            elif where and Path(where).resolve().is_relative_to(self.templates_path.resolve()):
                # A template's expression failed as Python ({{ 1 / 0 }}, a huge range).
                message = f"{type(error).__name__}: {error}"
            else:
                raise  # not raised by a template's code: ours, with its traceback
            raise RenderError(f"{where or name}:{line or 1}: {message}") from error
        inlined = css_inline.inline(page)
        if len(inlined.encode()) > MAX_HTML_BYTES:
            raise RenderError(
                f"{self.templates_path / name}:1: the HTML is over 100 KB after inlining; "
                "Gmail clips it"
            )
        return RenderedEmail(subject=subject, preheader=preheader, html=inlined, text=text)


#: Stand-ins for per-subscriber values: lower-case letters and digits, which
#: Jinja, Markdown, the layouts and the CSS inliner all pass through untouched.
SLOT_PREFIX = "nurtureslot"
SLOT = SLOT_PREFIX + "{}x"
UNSUBSCRIBE_SLOT = f"https://{SLOT_PREFIX}.invalid/unsubscribe"
#: Awkward values a shape must render exactly as a full render does.
PROBE_VALUE = 'Zoë O\'Brien-Smith & <Ann> "Jo" *x* _y_ [z](w) #1 \\ | 100%.'
PROBE_UNSUBSCRIBE = "https://probe.example/unsubscribe/a_b-c.D9~x"
URL_SAFE = re.compile(r"[A-Za-z0-9:/._~%?=+-]*")


def _fillable(values: Mapping[str, object], unsubscribe_url: str | None) -> bool:
    """Values that a filled-in shape reproduces exactly; others render in full.

    Printable text with single spaces between words and none around them (a
    space next to `*` changes what Markdown makes of it, and a subject's spaces
    are collapsed), and an unsubscribe URL of plain URL characters. Not a
    value of only `=` (alone on a line, Markdown reads it as underlining a
    heading), nor one with a slot in it (filling in would replace it too).
    """
    for value in values.values():
        if value is None or value == "":
            continue
        if (
            not isinstance(value, str)
            or not value.isprintable()
            or value != " ".join(value.split())
            or not value.strip("=")
            or SLOT_PREFIX in value
        ):
            return False
    return unsubscribe_url is None or bool(URL_SAFE.fullmatch(unsubscribe_url))


def _html_text(value: str) -> str:
    """A value as the CSS inliner writes it in an HTML text node."""
    return html.escape(value, quote=False).replace("\xa0", "&nbsp;")


@dataclass(frozen=True)
class _Shape:
    """An email rendered once with slots, filled in per subscriber by string replacement.

    Markdown and CSS inlining are most of the cost of an email and give the
    same result for every subscriber but for the values, so they run once per
    file version.
    """

    subject: str
    preheader: str
    html: str
    text: str
    slots: tuple[tuple[str, str], ...]  # (value name, slot)
    raw_text_free: bool = False

    @classmethod
    def make(cls, renderer: Renderer, name, values, unsubscribing: bool, list_title: str):
        slots = tuple(
            (key, SLOT.format(index)) for index, (key, value) in enumerate(sorted(values.items()))
        )
        slotted = {key: (slot if values[key] else values[key]) for key, slot in slots}
        try:
            rendered = renderer._render_fully(
                name,
                slotted,
                unsubscribe_url=UNSUBSCRIBE_SLOT if unsubscribing else None,
                list_title=list_title,
            )
        except RenderError:
            return None  # rendering in full reports the error
        used = tuple((key, slot) for key, slot in slots if values[key])
        free = RAW_TEXT.search(rendered.html) is None
        shape = cls(rendered.subject, rendered.preheader, rendered.html, rendered.text, used, free)
        probe = {key: (PROBE_VALUE if values[key] else values[key]) for key in values}
        unsubscribe = PROBE_UNSUBSCRIBE if unsubscribing else None
        full = renderer._render_fully(
            name, probe, unsubscribe_url=unsubscribe, list_title=list_title
        )
        if shape.fill(probe, unsubscribe) != full:
            return None
        return shape

    def fill(self, values, unsubscribe_url) -> RenderedEmail:
        """The email for these values (the same emptiness as the shape was made for)."""
        subject, preheader, page, text = self.subject, self.preheader, self.html, self.text
        for key, slot in self.slots:
            value = values[key]
            subject = subject.replace(slot, value)
            preheader = preheader.replace(slot, value)
            page = page.replace(slot, _html_text(value))
            text = text.replace(slot, value)
        if unsubscribe_url is not None:
            page = page.replace(UNSUBSCRIBE_SLOT, unsubscribe_url)
            text = text.replace(UNSUBSCRIBE_SLOT, unsubscribe_url)
        return RenderedEmail(
            subject=_strip_controls(subject) if self.slots else subject,
            preheader=_strip_controls(preheader) if self.slots else preheader,
            html=page,
            text=text,
            raw_text_free=self.raw_text_free,
        )
